"""Merge benchmark: ``adapterkit merge`` side by side with PEFT's merge_and_unload.

Each run is a separate process; wall time and peak RSS come from the kernel
(``os.wait4``). Runs alternate (adapterkit, PEFT, plain copy, adapterkit, ...),
so that page cache and thermal state favour no one. The result is a markdown
table with min / median / max and the ratios to PEFT.

- adapterkit: the ``adapterkit merge`` command (``merge_into_base``: streaming, numpy,
  no torch) from an adapterkit folder.
- PEFT: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained`` (same shard size) from the same adapter in PEFT's format.
- copy: ``safetensors.numpy.load_file`` + ``save_file`` of every shard (the floor
  of any tool that rewrites the weights), plus the other files.

Usage::

    python benchmarks/bench_merge.py                 # SmolLM2-135M, float32, 200 MB shards
    python benchmarks/bench_merge.py --base PATH     # another local HF causal LM folder
    python benchmarks/bench_merge.py --tiny          # a tiny random llama (seconds; CI smoke)

Targets (issue): adapterkit <= 0.3x PEFT's wall time and <= 0.35x its peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CHILD_ENV = common.CHILD_ENV  # the environment of every measured child process

ADAPTERKIT_MERGE = """
import sys
from adapterkit.cli.merge import command
command([sys.argv[1], "--base", sys.argv[2], "-o", sys.argv[3]])
"""

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
adapter, base, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
"""

COPY = """
import shutil, sys
from pathlib import Path
from safetensors.numpy import load_file, save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
for path in sorted(base.iterdir()):
    if path.suffix == ".safetensors":
        save_file(load_file(path), out / path.name, metadata={"format": "pt"})
    elif path.is_file():
        shutil.copyfile(path, out / path.name)
"""


# ---- measuring (shared with bench_compose.py) -----------------------------------

def run_child(code: str, *args: Any) -> dict[str, Any]:
    """``python -c code args`` in a fresh process measured by the kernel (:func:`common.run_process`:
    wall and CPU seconds, peak RSS in MB), with its last stdout line."""
    result = common.run_code(code, *args)
    lines = result["stdout"].strip().splitlines()
    return {**result, "stdout": lines[-1] if lines else ""}


def set_child_threads(threads: int | None) -> str:
    """Give every measured process the same thread count (BLAS, OpenMP, MKL, torch); a label for the report."""
    if threads is None:
        return "threads: library defaults"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        CHILD_ENV[name] = str(threads)
    return f"threads: {threads} per process for every tool (OMP/OpenBLAS/MKL_NUM_THREADS)"


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], unit: str) -> str:
    lo, mid, hi = stats(values)
    digits = 2 if unit == "s" else 0
    return f"{lo:.{digits}f} / **{mid:.{digits}f}** / {hi:.{digits}f} {unit}"


def ratio_line(label: str, ours: list[float], theirs: list[float], target: float | None = None) -> str:
    """The ratio of the medians; with ``target``, whether it is met (targets are for the real model)."""
    value = statistics.median(ours) / statistics.median(theirs)
    if target is None:
        return f"- {label}: **{value:.3f}x** PEFT"
    verdict = "meets" if value <= target else "misses"
    return f"- {label}: **{value:.3f}x** PEFT (target <= {target}x: {verdict})"


# ---- setup ------------------------------------------------------------------------

def tiny_base(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    source = folder / "tiny-source"
    LlamaForCausalLM(config).save_pretrained(source)
    (source / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    return source


def sharded_base(source: Path, folder: Path, shard: str) -> Path:
    """``source`` re-saved in float32 with ``max_shard_size=shard``, its other files copied."""
    import torch
    from transformers import AutoModelForCausalLM

    out = folder / "base"
    shutil.rmtree(out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size=shard)
    for path in source.iterdir():
        if path.is_file() and not (out / path.name).exists() and path.suffix not in (".safetensors", ".bin"):
            shutil.copyfile(path, out / path.name)
    (out / "adapterkit-prepared.json").unlink(missing_ok=True)
    return out


def make_adapters(base: Path, folder: Path, names: tuple[str, ...] = ("a",),
                  r: int = 16) -> dict[str, tuple[Path, Path]]:
    """Random LoRA adapters (all linear layers, rank ``r``): name -> (PEFT folder, adapterkit folder)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterkit.core.format.adapter import Adapter
    from adapterkit.core.store.adapters import save
    from adapterkit.core.format.manifest import Manifest

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    out = {}
    for index, name in enumerate(names):
        alpha = 2 * r if index == 0 else r
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
        if index == 0:
            model = get_peft_model(model, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    module.lora_B[name].weight.normal_(0, 0.02)  # a trained-like, small update
        peft_dir, tmp = folder / f"peft-{name}", folder / f"peft-save-{name}"
        model.save_pretrained(tmp, selected_adapters=[name])  # a non-default adapter lands in tmp/<name>
        shutil.rmtree(peft_dir, ignore_errors=True)
        shutil.move(str(tmp if name == "default" else tmp / name), peft_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        targets, tensors = {}, {}
        for path, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                weight = module.get_base_layer().weight
                targets[path] = {"kind": "linear", "shape": list(weight.shape), "r": r, "alpha": alpha}
                tensors[f"{path}.lora.A"] = module.lora_A[name].weight.detach().numpy().copy()
                tensors[f"{path}.lora.B"] = module.lora_B[name].weight.detach().numpy().copy()
        manifest = Manifest(method="lora", config={"r": r, "alpha": alpha}, targets=targets, dtype="float32",
                            base_model={"model_type": model.base_model.model.config.model_type})
        ak_dir = folder / f"adapterkit-{name}"
        save(Adapter(manifest, tensors), ak_dir, overwrite=True)
        out[name] = (peft_dir, ak_dir)
    return out


def max_weight_difference(ours: Path, theirs: Path) -> float:
    """Largest |difference| over every tensor the two merged folders share (float32)."""
    import numpy as np
    from safetensors.numpy import load_file

    mine: dict[str, Any] = {}
    for path in ours.glob("*.safetensors"):
        mine.update(load_file(path))
    worst = 0.0
    for path in theirs.glob("*.safetensors"):
        for key, value in load_file(path).items():
            if key in mine:
                worst = max(worst, float(np.abs(mine[key].astype(np.float32) - value.astype(np.float32)).max()))
    return worst


def default_base() -> Path:
    from adapterkit.core.demo.real_models import smollm2_path

    return smollm2_path(echo=lambda text: print(text, file=sys.stderr))


# ---- main -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="local HF causal LM folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="tiny random llama: a fast smoke run")
    parser.add_argument("--repeats", type=int, help="runs per tool (default 3; 2 with --tiny)")
    parser.add_argument("--shard", default=None, help='max_shard_size of the base (default "200MB")')
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads of every measured process (default 1: fair and stable on a shared "
                             "machine; 0 = each library's default)")
    args = parser.parse_args(argv)
    threads = set_child_threads(args.threads or None)
    repeats = args.repeats or (2 if args.tiny else 3)
    shard = args.shard or ("100KB" if args.tiny else "200MB")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = tiny_base(work) if args.tiny else (args.base or default_base())
        print(f"preparing: {source} -> float32, max_shard_size={shard}", file=sys.stderr)
        base = sharded_base(source, work, shard)
        (peft_adapter, ak_adapter), = make_adapters(base, work, ("default",)).values()
        size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
        shards = len(list(base.glob("*.safetensors")))
        tools = {
            "adapterkit merge": lambda: run_child(ADAPTERKIT_MERGE, ak_adapter, base, work / "out-adapterkit"),
            "PEFT merge_and_unload": lambda: run_child(PEFT_MERGE, peft_adapter, base, work / "out-peft", shard),
            "safetensors copy": lambda: run_child(COPY, base, work / "out-copy"),
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
        for index in range(repeats):
            for name, run in tools.items():
                for out in ("out-adapterkit", "out-peft", "out-copy"):
                    shutil.rmtree(work / out, ignore_errors=True)
                results[name].append(run())
                last = results[name][-1]
                print(f"run {index + 1}/{repeats} {name}: {last['wall']:.2f} s wall, {last['cpu']:.2f} s CPU, "
                      f"{last['rss_mb']:.0f} MB", file=sys.stderr)
                if index == repeats - 1 and name == "PEFT merge_and_unload":
                    shutil.copytree(work / "out-peft", work / "keep-peft", dirs_exist_ok=True)
        diff = max_weight_difference(work / "out-adapterkit", work / "keep-peft")
        print(report(results, base, size_mb, shards, repeats, diff, threads, targets=not args.tiny))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, Any]]], base: Path, size_mb: float, shards: int, repeats: int,
           diff: float, threads: str, targets: bool = True) -> str:
    import platform

    ours, peft = results["adapterkit merge"], results["PEFT merge_and_unload"]
    lines = [
        f"### merge: {base.name} ({size_mb:.3g} MB float32 in {shards} shards), LoRA r=16 on all linear layers",
        "",
        f"{repeats} runs per tool, alternating, each in a fresh process; min / **median** / max.",
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (wall times grow with the load; CPU times much less); "
        f"{threads}.",
        "",
        "| tool | wall time | CPU time (user + sys) | peak RSS |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        lines.append(f"| {name} | {fmt([r['wall'] for r in runs], 's')} | {fmt([r['cpu'] for r in runs], 's')} "
                     f"| {fmt([r['rss_mb'] for r in runs], 'MB')} |")
    lines += [
        "",
        ratio_line("wall time", [r["wall"] for r in ours], [r["wall"] for r in peft], 0.3 if targets else None),
        ratio_line("CPU time", [r["cpu"] for r in ours], [r["cpu"] for r in peft], 0.3 if targets else None),
        ratio_line("peak RSS", [r["rss_mb"] for r in ours], [r["rss_mb"] for r in peft], 0.35 if targets else None),
        f"- largest weight difference between the two merged models: {diff:.2e}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
