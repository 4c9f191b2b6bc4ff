"""Injection benchmark: ``adapterkit.inject`` / ``apply`` beside PEFT's ``get_peft_model`` / ``from_pretrained``.

LoRA r=16, alpha 32 on all seven linear kinds of SmolLM2-135M (q, k, v, o, gate,
up, down: 210 modules). Every call gets a freshly copied base (``copy.deepcopy`` of
one loaded model, untimed), in one process; contenders alternate (A B C D A B ...):

- ``adapterkit.inject(model, "lora", r=16, alpha=32, target_modules=[...])``: a new,
  trainable adapter (A kaiming-uniform, B zeros);
- ``peft.get_peft_model(model, LoraConfig(...))``: the same, PEFT's default init;
- ``adapterkit.apply(adapterkit.load(folder), model)``: a saved adapter from disk
  (read, checksums, inject, copy the weights);
- ``PeftModel.from_pretrained(model, folder)``: the same adapter in PEFT's format.

Usage::

    python benchmarks/bench_inject.py              # SmolLM2-135M
    python benchmarks/bench_inject.py --tiny       # a tiny seeded llama (CI smoke)
    python benchmarks/bench_inject.py --profile    # + cProfile of adapterkit.inject

Target (issue): ``adapterkit.inject`` <= 0.5x ``get_peft_model`` (PEFT here: 0.43 s).
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.5
R, ALPHA = 16, 32


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    args = common.parser(__doc__, repeats=7, tiny_repeats=2).parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    import adapterkit

    with common.workdir(args, "bench-inject-") as work:
        base = common.base_of(args, work)
        common.progress(f"making an r={R} LoRA adapter (7 linear kinds) on {base}")
        peft_dir, native_dir = common.make_lora_pair(base, work, r=R, alpha=ALPHA)
        template = common.load_model(base)
        state: dict[str, Any] = {}

        def fresh(_: str = "") -> None:
            state.pop("model", None)
            state.pop("result", None)
            gc.collect()
            state["model"] = copy.deepcopy(template)

        def ours_inject() -> None:
            state["result"] = adapterkit.inject(state["model"], "lora", r=R, alpha=ALPHA,
                                                target_modules=common.LINEAR_KINDS)

        def peft_inject() -> None:
            state["result"] = get_peft_model(state["model"], LoraConfig(r=R, lora_alpha=ALPHA,
                                                                        target_modules=common.LINEAR_KINDS))

        def ours_apply() -> None:
            state["result"] = adapterkit.apply(adapterkit.load(native_dir), state["model"])

        def peft_apply() -> None:
            state["result"] = PeftModel.from_pretrained(state["model"], str(peft_dir))

        contenders = {
            "adapterkit.inject": ours_inject,
            "PEFT get_peft_model": peft_inject,
            "adapterkit.apply(adapterkit.load(folder))": ours_apply,
            "PEFT PeftModel.from_pretrained": peft_apply,
        }
        with torch.no_grad(), common.quiet_gc():
            times = common.alternate(contenders, repeats, between=fresh)
            modules = count_modules(contenders, fresh, state)
            profile = ""
            if args.profile:
                fresh()
                profile = common.profile_top(ours_inject)
        common.emit(report(args, base, times, modules, threads, repeats, profile))
    return 0


def count_modules(contenders: dict[str, Any], fresh: Any, state: dict[str, Any]) -> dict[str, int]:
    """Adapted modules per contender (a check that both sides do the same work): wrappers holding a ``base_layer``."""
    import torch

    counts = {}
    for name, fn in contenders.items():
        fresh()
        fn()
        model = state["model"]
        counts[name] = sum(1 for m in model.modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Module))
    return counts


def report(args: Any, base: Path, times: dict[str, list[float]], modules: dict[str, int], threads: int,
           repeats: int, profile: str) -> str:
    lines = common.report_head(f"inject: LoRA r={R} on the seven linear kinds", common.base_label(args, base),
                               threads, repeats, "A fresh copy of the base for every call (untimed).")
    rows = [[name, modules.get(name, "-"), common.fmt(values, "s", 4)] for name, values in times.items()]
    lines.append(common.table(["call", "modules adapted", "seconds"], rows))
    lines += [
        "",
        common.ratio_line("inject", common.ratio(times["adapterkit.inject"], times["PEFT get_peft_model"]),
                          None if args.tiny else TARGET, of="`get_peft_model`"),
        common.ratio_line("apply from disk", common.ratio(times["adapterkit.apply(adapterkit.load(folder))"],
                                                          times["PEFT PeftModel.from_pretrained"]),
                          of="`PeftModel.from_pretrained`"),
    ]
    if profile:
        lines += ["", "#### profile: one `adapterkit.inject` (own time)", "", profile]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
