"""to-lora benchmark: ``adapterkit.to_lora`` side by side with PEFT's ``convert_to_lora`` on a DoRA adapter.

One random DoRA adapter (r=16, alpha 32, every linear layer: the seven Llama
kinds, 210 modules on SmolLM2-135M; B ~ N(0, 0.02) and a magnitude 1 % off the
weight norm, so that the update is not low-rank) is lowered to LoRA at rank 16
by both tools. Each run is a fresh process, runs alternate (adapterkit, PEFT,
...); wall time, CPU time and peak RSS of the whole process come from the kernel.
"op" is the lowering call alone, timed inside the process: ``to_lora(...)``
(numpy, base weights read one tensor at a time) versus ``convert_to_lora(...)``
(torch; it needs the PeftModel, so the process also loads the base model). The
process columns add imports, loading and saving. Each module's relative
Frobenius error ``||D - B A|| / ||D||`` of both results is measured here against
the DoRA update ``D = merged(W) - W`` (float64). PEFT 0.21.2's ``convert_to_lora``
takes each layer's ``get_delta_weight``, which for a DoRA layer is the LoRA part
``scale * B @ A`` alone (the magnitude is left out), so its error is that of
lowering a different update.

LoHa is not in adapterkit yet, so the LoHa half of the issue's benchmark is not
measured.

Usage::

    python benchmarks/bench_to_lora.py            # SmolLM2-135M
    python benchmarks/bench_to_lora.py --tiny     # a tiny seeded llama (CI smoke)

Target (issue): <= 0.5x PEFT's time, error no worse than PEFT's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.5
RANK = 16

ADAPTERKIT = """
import json, sys, time
from adapterkit import load, save, to_lora
src, out, base, rank = sys.argv[1:5]
adapter = load(src)
start = time.perf_counter()
lowered = to_lora(adapter, rank=int(rank), base=base)
op = time.perf_counter() - start
save(lowered.adapter, out)
print(json.dumps({"op": op}))
"""

PEFT = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from peft.tuners.lora import convert_to_lora
from safetensors.torch import save_file
src, out, base, rank = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), src)
start = time.perf_counter()
config, state = convert_to_lora(model, int(rank), progressbar=False)
op = time.perf_counter() - start
import os
os.makedirs(out, exist_ok=True)
save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "adapter_model.safetensors"))
print(json.dumps({"op": op}))
"""


def make_dora(base: Path, folder: Path) -> tuple[Path, Path]:
    """The DoRA adapter as (PEFT folder, adapterkit folder), same weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    import adapterkit

    peft_dir, native_dir = folder / "peft-dora", folder / "adapterkit-dora"
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=common.LINEAR_KINDS, lora_dropout=0.0,
                        use_dora=True, init_lora_weights=False)
    model = get_peft_model(common.load_model(base), config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.02)
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.01 * torch.randn_like(magnitude))
    model.save_pretrained(peft_dir)
    adapterkit.convert(peft_dir, native_dir, to="adapterkit", from_format="peft", overwrite=True)
    return peft_dir, native_dir


def errors(native_dir: Path, base: Path, ours: Path, theirs: Path) -> tuple[list[float], list[float]]:
    """Each module's relative Frobenius error of both results against the DoRA update (float64)."""
    import numpy as np
    from safetensors.numpy import load_file

    import adapterkit
    from adapterkit.core.format import safetensors_io
    from adapterkit.core.format.base_model import read_base_model
    from adapterkit.core.plugin.registry import default_registry

    source = adapterkit.load(native_dir)
    method = default_registry().method(source.method)
    config = method.resolve_config(source.config)
    info = read_base_model(base)
    mine, other = load_file(ours / "adapter.safetensors"), load_file(theirs / "adapter_model.safetensors")
    ours_err, peft_err = [], []
    for module, target in sorted(source.targets.items()):
        key = info.resolve(f"{module}.weight")
        w = safetensors_io.read_tensor(safetensors_io.read_header(base / info.weights[key].file), key)
        w = w.astype(np.float64)
        d = np.asarray(method.merged_weight(module, target, config, source.module_tensors(module), w)) - w
        norm = np.linalg.norm(d)
        a, b = mine[f"{module}.lora.A"].astype(np.float64), mine[f"{module}.lora.B"].astype(np.float64)
        ours_err.append(float(np.linalg.norm(d - b @ a) / norm))
        prefix = f"base_model.model.{module}"
        a = other[f"{prefix}.lora_A.weight"].astype(np.float64)
        b = other[f"{prefix}.lora_B.weight"].astype(np.float64)
        peft_err.append(float(np.linalg.norm(d - b @ a) / norm))
    return ours_err, peft_err


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    args = common.parser(__doc__, repeats=3, tiny_repeats=1, profile=False).parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    rank = 4 if args.tiny else RANK
    with common.workdir(args, "bench-to-lora-") as work:
        base = common.base_of(args, work)
        common.progress(f"making a DoRA adapter (r={RANK}, 7 linear kinds) on {base}")
        peft_dir, native_dir = make_dora(base, work)
        ours_out, peft_out = work / "out-adapterkit", work / "out-peft"
        contenders = {"adapterkit to_lora": (ADAPTERKIT, native_dir, ours_out),
                      "PEFT convert_to_lora": (PEFT, peft_dir, peft_out)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for index in range(repeats):
            for name, (code, src, out) in contenders.items():
                shutil.rmtree(out, ignore_errors=True)
                run = common.run_code(code, src, out, base, rank)
                run["op"] = json.loads(run["stdout"])["op"]
                runs[name].append(run)
                common.progress(f"run {index + 1}/{repeats} {name}: op {run['op']:.2f} s, wall {run['wall']:.2f} s, "
                                f"{run['rss_mb']:.0f} MB")
        ours_err, peft_err = errors(native_dir, base, ours_out, peft_out)
        common.emit(report(args, base, runs, threads, repeats, rank, ours_err, peft_err))
    return 0


def report(args: Any, base: Path, runs: dict[str, list[dict[str, Any]]], threads: int, repeats: int, rank: int,
           ours_err: list[float], peft_err: list[float]) -> str:
    import statistics

    note = ("No warm-up round here: each run is a fresh process (wall, CPU and peak RSS from the kernel); "
            "op: the lowering call alone. "
            "adapterkit's numpy runs single-threaded (one BLAS thread per module); PEFT's torch uses the "
            "torch threads below. LoHa is not in adapterkit yet: only the DoRA half of the issue's benchmark.")
    lines = common.report_head(f"to-lora: a DoRA r={RANK} adapter on {len(ours_err)} modules lowered to LoRA "
                               f"rank {rank}", common.base_label(args, base), threads, repeats, note)
    rows = [[name, common.fmt([r["op"] for r in values]), common.fmt([r["wall"] for r in values]),
             common.fmt([r["cpu"] for r in values]), common.fmt([r["rss_mb"] for r in values], "MB", 0)]
            for name, values in runs.items()]
    lines.append(common.table(["tool", "op time", "process wall", "process CPU", "peak RSS"], rows))
    lines += ["", common.table(
        ["tool", "relative error per module: min / **median** / max", "RMS over modules"],
        [[name, f"{min(e):.4e} / **{statistics.median(e):.4e}** / {max(e):.4e}",
          f"{(sum(x * x for x in e) / len(e)) ** 0.5:.4e}"] for name, e in
         (("adapterkit to_lora", ours_err), ("PEFT convert_to_lora", peft_err))])]
    ours, peft = runs["adapterkit to_lora"], runs["PEFT convert_to_lora"]
    worse = sum(o > p * (1 + 1e-4) + 1e-7 for o, p in zip(ours_err, peft_err))
    target = None if args.tiny else TARGET
    lines += [
        "",
        common.ratio_line("to-lora op time", common.ratio([r["op"] for r in ours], [r["op"] for r in peft]), target),
        common.ratio_line("to-lora process wall", common.ratio([r["wall"] for r in ours], [r["wall"] for r in peft])),
        common.ratio_line("to-lora peak RSS", common.ratio([r["rss_mb"] for r in ours], [r["rss_mb"] for r in peft])),
        common.ratio_line("to-lora median error", common.ratio(ours_err, peft_err), None,
                          note=f"modules where adapterkit's error is worse than PEFT's: {worse} of {len(ours_err)}"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
