"""to-lora benchmark: ``adapterkit.to_lora`` side by side with PEFT's ``convert_to_lora`` on a DoRA and a LoHa adapter.

Two random adapters on every linear layer (the seven Llama kinds, 210 modules on
SmolLM2-135M), each lowered to LoRA at rank 16 by both tools:

- DoRA r=16, alpha 32 (B ~ N(0, 0.02) and a magnitude 1 % off the weight norm, so
  that the update is not low-rank);
- LoHa r=8, alpha 16, ``init_weights=False`` (all four factors random, PEFT's
  Kaiming-uniform: PEFT zero-inits ``hada_w2_b`` by default): the update
  ``(w1_a w1_b) * (w2_a w2_b)`` has rank up to 64, so rank 16 truncates it.

Each run is a fresh process, runs alternate (adapterkit, PEFT, ...); wall time,
CPU time and peak RSS of the whole process come from the kernel. "op" is the
lowering call alone, timed inside the process: ``to_lora(...)`` (numpy; a DoRA's
base weights read one tensor at a time, a LoHa needs none) versus
``convert_to_lora(...)`` (torch; it needs the PeftModel, so the process also loads
the base model). The process columns add imports, loading and saving. Each
module's relative Frobenius error ``||D - B A|| / ||D||`` of both results is
measured here against the adapter's own update ``D`` (float64), which
:func:`adapterkit.core.plugin.capabilities.module_delta` gives for any method:
``merged(W) - W`` for DoRA (it needs the base weight), the dense Hadamard product
for LoHa (it does not). PEFT 0.21.2's ``convert_to_lora`` takes each layer's
``get_delta_weight``: for a LoHa layer that is the whole update (the two tools
lower the same matrix), for a DoRA layer it is the LoRA part ``scale * B @ A``
alone (the magnitude is left out), so PEFT's DoRA error is that of lowering a
different update.

Usage::

    python benchmarks/bench_to_lora.py                  # SmolLM2-135M, DoRA and LoHa
    python benchmarks/bench_to_lora.py --method loha    # one method only
    python benchmarks/bench_to_lora.py --tiny           # a tiny seeded llama (CI smoke)

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
RANK = 16  # the LoRA rank both tools lower to (4 with --tiny), and the DoRA's own rank
LOHA_RANK = 8  # the LoHa's r: its update has rank up to r² = 64
METHODS = {"dora": "DoRA", "loha": "LoHa"}

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


def make_loha(base: Path, folder: Path) -> tuple[Path, Path]:
    """The LoHa adapter (every factor random: ``init_weights=False``) as (PEFT folder, adapterkit folder)."""
    import torch
    from peft import LoHaConfig, get_peft_model

    import adapterkit

    peft_dir, native_dir = folder / "peft-loha", folder / "adapterkit-loha"
    torch.manual_seed(0)
    config = LoHaConfig(r=LOHA_RANK, alpha=2 * LOHA_RANK, target_modules=common.LINEAR_KINDS, init_weights=False)
    model = get_peft_model(common.load_model(base), config)
    model.save_pretrained(peft_dir)
    adapterkit.convert(peft_dir, native_dir, to="adapterkit", from_format="peft", overwrite=True)
    return peft_dir, native_dir


MAKERS = {"dora": (make_dora, f"r={RANK}, alpha {2 * RANK}"),
          "loha": (make_loha, f"r={LOHA_RANK}, alpha {2 * LOHA_RANK}")}


def errors(native_dir: Path, base: Path, ours: Path, theirs: Path) -> tuple[list[float], list[float]]:
    """Each module's relative Frobenius error of both results against the adapter's own update (float64).

    The update comes from ``module_delta``, for any method: the base weight is read (one tensor) only
    when the method needs it (a MergedWeight method such as DoRA).
    """
    import numpy as np
    from safetensors.numpy import load_file

    import adapterkit
    from adapterkit.core.format import safetensors_io
    from adapterkit.core.format.base_model import read_base_model
    from adapterkit.core.plugin.capabilities import module_delta
    from adapterkit.core.plugin.registry import default_registry

    source = adapterkit.load(native_dir)
    method = default_registry().method(source.method)
    config = method.resolve_config(source.config)
    info = None
    mine, other = load_file(ours / "adapter.safetensors"), load_file(theirs / "adapter_model.safetensors")
    ours_err, peft_err = [], []
    for module, target in sorted(source.targets.items()):
        tensors = source.module_tensors(module)
        d = module_delta(method, module, target, config, tensors)
        if d is None:  # the update needs the base weight
            info = info or read_base_model(base)
            key = info.resolve(f"{module}.weight")
            w = safetensors_io.read_tensor(safetensors_io.read_header(base / info.weights[key].file), key)
            d = module_delta(method, module, target, config, tensors, w)
        d = np.asarray(d, dtype=np.float64)
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
    p = common.parser(__doc__, repeats=3, tiny_repeats=1, profile=False)
    p.add_argument("--method", choices=[*METHODS, "both"], default="both",
                   help="the adapter lowered: dora, loha or both (default both)")
    args = p.parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    rank = 4 if args.tiny else RANK
    methods = list(METHODS) if args.method == "both" else [args.method]
    reports = []
    with common.workdir(args, "bench-to-lora-") as work:
        base = common.base_of(args, work)
        for key in methods:
            make, shape = MAKERS[key]
            common.progress(f"making a {METHODS[key]} adapter ({shape}, 7 linear kinds) on {base}")
            peft_dir, native_dir = make(base, work)
            ours_out, peft_out = work / f"out-adapterkit-{key}", work / f"out-peft-{key}"
            contenders = {"adapterkit to_lora": (ADAPTERKIT, native_dir, ours_out),
                          "PEFT convert_to_lora": (PEFT, peft_dir, peft_out)}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
            for index in range(repeats):
                for name, (code, src, out) in contenders.items():
                    shutil.rmtree(out, ignore_errors=True)
                    run = common.run_code(code, src, out, base, rank)
                    run["op"] = json.loads(run["stdout"])["op"]
                    runs[name].append(run)
                    common.progress(f"{METHODS[key]} run {index + 1}/{repeats} {name}: op {run['op']:.2f} s, "
                                    f"wall {run['wall']:.2f} s, {run['rss_mb']:.0f} MB")
            ours_err, peft_err = errors(native_dir, base, ours_out, peft_out)
            reports.append(report(args, key, base, runs, threads, repeats, rank, ours_err, peft_err))
    common.emit("\n\n".join(reports))
    return 0


NOTES = {
    "dora": "PEFT's DoRA `get_delta_weight` is the LoRA part alone (the magnitude left out): its error is measured "
            "against the real DoRA update, which adapterkit lowers.",
    "loha": "PEFT's LoHa `get_delta_weight` is the whole Hadamard update: both tools lower the same matrix.",
}


def report(args: Any, key: str, base: Path, runs: dict[str, list[dict[str, Any]]], threads: int, repeats: int,
           rank: int, ours_err: list[float], peft_err: list[float]) -> str:
    import statistics

    name = METHODS[key]
    note = ("No warm-up round here: each run is a fresh process (wall, CPU and peak RSS from the kernel); "
            "op: the lowering call alone. "
            "adapterkit's numpy runs single-threaded (one BLAS thread per module); PEFT's torch uses the "
            f"torch threads below. {NOTES[key]}")
    lines = common.report_head(f"to-lora: a {name} {MAKERS[key][1].split(',')[0]} adapter on {len(ours_err)} "
                               f"modules lowered to LoRA rank {rank}", common.base_label(args, base), threads,
                               repeats, note)
    rows = [[tool, common.fmt([r["op"] for r in values]), common.fmt([r["wall"] for r in values]),
             common.fmt([r["cpu"] for r in values]), common.fmt([r["rss_mb"] for r in values], "MB", 0)]
            for tool, values in runs.items()]
    lines.append(common.table(["tool", "op time", "process wall", "process CPU", "peak RSS"], rows))
    lines += ["", common.table(
        ["tool", "relative error per module: min / **median** / max", "RMS over modules"],
        [[tool, f"{min(e):.4e} / **{statistics.median(e):.4e}** / {max(e):.4e}",
          f"{(sum(x * x for x in e) / len(e)) ** 0.5:.4e}"] for tool, e in
         (("adapterkit to_lora", ours_err), ("PEFT convert_to_lora", peft_err))])]
    ours, peft = runs["adapterkit to_lora"], runs["PEFT convert_to_lora"]
    worse = sum(o > p * (1 + 1e-4) + 1e-7 for o, p in zip(ours_err, peft_err))
    target = None if args.tiny else TARGET
    label = f"to-lora {name}"
    lines += [
        "",
        common.ratio_line(f"{label} op time", common.ratio([r["op"] for r in ours], [r["op"] for r in peft]), target),
        common.ratio_line(f"{label} process wall", common.ratio([r["wall"] for r in ours], [r["wall"] for r in peft])),
        common.ratio_line(f"{label} peak RSS", common.ratio([r["rss_mb"] for r in ours], [r["rss_mb"] for r in peft])),
        common.ratio_line(f"{label} median error", common.ratio(ours_err, peft_err), None,
                          note=f"modules where adapterkit's error is worse than PEFT's: {worse} of {len(ours_err)}"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
