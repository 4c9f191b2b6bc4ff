"""Forward-latency benchmark: the base alone, an unmerged adapterkit LoRA, an unmerged PEFT LoRA, a merged one.

The overhead of an unmerged adapter over its base is what serving many adapters
without merging costs; the question users ask. One r=16, alpha 32 LoRA adapter
on all seven linear kinds (210 modules in SmolLM2-135M), the same weights on both
sides (made with PEFT, converted to adapterkit). Four models in one process:

- the base alone (no adapter code at all);
- ``adapterkit.apply(adapterkit.load(folder), base)`` (unmerged);
- ``PeftModel.from_pretrained(base, folder)`` (unmerged);
- the adapterkit model merged (``handle.merge()``): the floor, the base's cost.

Batches 1 x 128 and 8 x 128 seeded random tokens, ``torch.inference_mode``,
``use_cache=False``, float32; contenders alternate (A B C D A B C D ...) after a
warm-up round.

Usage::

    python benchmarks/bench_forward.py                  # SmolLM2-135M
    python benchmarks/bench_forward.py --batch-sizes 1,4,16 --seq-len 256
    python benchmarks/bench_forward.py --tiny           # a tiny seeded llama (CI smoke)
    python benchmarks/bench_forward.py --profile        # + cProfile / torch profiler of one unmerged forward

Target (issue): at batch 1 x 128 adapterkit's overhead over the base <= 0.5x PEFT's
(PEFT here: +0.028 s, +12.5 %).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.5
R, ALPHA = 16, 32
BASE, OURS, PEFT, MERGED = "base alone", "adapterkit unmerged", "PEFT unmerged", "adapterkit merged"


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    parser = common.parser(__doc__, repeats=11, tiny_repeats=2)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    import torch
    from peft import PeftModel

    import adapterkit
    from adapterkit.core.runtime.inject import attached

    with common.workdir(args, "bench-forward-") as work:
        base = common.base_of(args, work)
        common.progress(f"making an r={R} LoRA adapter (7 linear kinds) on {base}")
        peft_dir, native_dir = common.make_lora_pair(base, work, r=R, alpha=ALPHA)
        models = {
            BASE: common.load_model(base),
            OURS: adapterkit.apply(adapterkit.load(native_dir), common.load_model(base)),
            PEFT: PeftModel.from_pretrained(common.load_model(base), str(peft_dir)).eval(),
            MERGED: adapterkit.apply(adapterkit.load(native_dir), common.load_model(base)),
        }
        attached(models[MERGED])["default"].merge()
        results, diffs, profile = {}, {}, []
        with torch.inference_mode():
            for batch in batches:
                inputs = common.token_inputs(models[BASE], batch, args.seq_len)
                calls = {name: (lambda m=model: m(**inputs, use_cache=False).logits) for name, model in models.items()}
                reference = calls[PEFT]()
                diffs[batch] = {name: float((calls[name]() - reference).abs().max()) for name in (OURS, MERGED)}
                common.progress(f"batch {batch} x {args.seq_len}: timing {len(calls)} contenders x {repeats} rounds")
                results[batch] = common.alternate(calls, repeats)
            if args.profile:
                inputs = common.token_inputs(models[BASE], batches[0], args.seq_len)
                profile = common.profiles(lambda: models[OURS](**inputs, use_cache=False),
                                          f"one unmerged adapterkit forward, batch {batches[0]} x {args.seq_len}")
        common.emit(report(args, base, results, diffs, threads, repeats, profile))
    return 0


def report(args: Any, base: Path, results: dict[int, dict[str, list[float]]], diffs: dict[int, dict[str, float]],
           threads: int, repeats: int, profile: list[str]) -> str:
    lines = common.report_head(
        f"forward: LoRA r={R} (7 linear kinds) unmerged vs merged vs the base, seq-len {args.seq_len}",
        common.base_label(args, base), threads, repeats,
        "`torch.inference_mode`, `use_cache=False`; overhead = median - the base's median.")
    rows = []
    for batch, times in results.items():
        base_mid = statistics.median(times[BASE])
        for name, values in times.items():
            mid = statistics.median(values)
            over = "-" if name == BASE else f"{mid - base_mid:+.4f} s ({100 * (mid / base_mid - 1):+.1f} %)"
            diff = f"{diffs[batch][name]:.1e}" if name in diffs[batch] else "-"
            rows.append([f"{batch} x {args.seq_len}", name, common.fmt(values, "s", 4),
                         f"{batch * args.seq_len / mid:.0f}", over, diff])
    lines.append(common.table(["batch", "model", "seconds", "tokens/s (median)", "overhead over the base",
                               "max abs logit diff to PEFT"], rows))
    lines.append("")
    for index, (batch, times) in enumerate(results.items()):
        base_mid = statistics.median(times[BASE])
        ours = statistics.median(times[OURS]) - base_mid
        peft = statistics.median(times[PEFT]) - base_mid
        target = TARGET if (index == 0 and batch == 1 and args.seq_len == 128 and not args.tiny) else None
        note = ("PEFT's overhead is not above the noise: the ratio means nothing" if peft <= 0
                else f"overheads {ours:+.4f} s vs {peft:+.4f} s")
        lines.append(common.ratio_line(f"unmerged overhead over the base, batch {batch} x {args.seq_len}",
                                       ours / peft if peft > 0 else float("nan"), target, of="PEFT's overhead",
                                       note=note))
    return "\n".join(lines + profile)


if __name__ == "__main__":
    raise SystemExit(main())
