"""ONNX export benchmark: ONNX Runtime (CPU) vs torch eager, and the cost of switching adapters.

Same inputs for every contender (seeded random ids, all-ones mask), batch 1 x 128
and 8 x 128 tokens, float32, no KV cache, logits only. Contenders alternate after a
warm-up round; min / **median** / max.

- merged: ``adapterkit export onnx --mode merged`` (LoRA r 16 on every linear
  layer, folded into the weights) in ``onnxruntime.InferenceSession``, against
  torch eager with the same adapter merged (same arithmetic) and applied
  unmerged (``adapterkit.apply``: what a torch user runs).
- swappable: ``--mode swappable`` with two adapters (r 16 and r 8): a request with
  no adapter, with the same adapter every time, and with the adapter switched on
  every request (A, B, A, B...; ``LoraAdapter`` objects loaded once), plus the time
  to load an ``.onnx_adapter`` file into a ``LoraAdapter``. The switch cost is the
  median of switched requests minus the median with one adapter.

Usage::

    python benchmarks/bench_onnx.py            # SmolLM2-135M
    python benchmarks/bench_onnx.py --tiny     # a tiny seeded llama (seconds; CI smoke)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

SEQ = 128
BATCHES = (1, 8)


def make_adapter(base: Path, folder: Path, name: str, r: int, seed: int) -> Path:
    """A trained-like LoRA on every linear kind (A as initialised, B ~ N(0, 0.02)), saved in adapterkit format."""
    import torch

    import adapterkit

    model = C.load_model(base)
    handle = adapterkit.inject(model, "lora", r=r, alpha=2 * r, target_modules=C.LINEAR_KINDS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return adapterkit.save(handle.to_adapter(), folder / name, overwrite=True)


def session(model_path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    C.quiet()
    args = C.parser(__doc__, repeats=7, tiny_repeats=2, profile=False).parse_args()
    threads = C.set_threads(args.threads)
    repeats = C.repeats_of(args)
    import numpy as np
    import onnxruntime as ort
    import torch

    import adapterkit
    from adapterkit.core.export.onnx import export_onnx

    with C.workdir(args, "bench-onnx-") as work:
        base = C.base_of(args, work)
        C.progress("making two adapters")
        first = make_adapter(base, work, "lora-r16", 16, seed=0)
        second = make_adapter(base, work, "lora-r8", 8, seed=1)
        export_times = {}
        C.progress("exporting (merged)")
        start = time.perf_counter()
        merged = export_onnx(first, base, work / "merged", overwrite=True)
        export_times["merged"] = time.perf_counter() - start
        C.progress("exporting (swappable)")
        start = time.perf_counter()
        swappable = export_onnx([first, second], base, work / "swappable", mode="swappable", overwrite=True)
        export_times["swappable"] = time.perf_counter() - start

        applied = C.load_model(base)
        adapterkit.apply(adapterkit.load(first), applied)
        folded = C.load_model(base)
        adapterkit.apply(adapterkit.load(first), folded)
        adapterkit.attached(folded)["default"].merge()
        merged_session = session(merged / "model.onnx", threads)
        swap_session = session(swappable / "model.onnx", threads)
        loras = {}
        for path in (first, second):
            lora = ort.LoraAdapter()
            lora.Load(str(swappable / "adapters" / f"{path.name}.onnx_adapter"))
            loras[path.name] = lora

        def with_adapter(name: str) -> Any:
            options = ort.RunOptions()
            options.add_active_adapter(loras[name])
            return options

        fixed = with_adapter(first.name)
        alternating = [with_adapter(first.name), with_adapter(second.name)]
        turn = [0]

        def switched(feeds: dict[str, Any]) -> Any:
            turn[0] ^= 1
            return swap_session.run(None, feeds, alternating[turn[0]])

        def eager(model: Any, inputs: dict[str, Any]) -> Any:
            with torch.inference_mode():
                return model(**inputs, use_cache=False).logits

        rows, swap_rows, medians = [], [], {}
        for batch in BATCHES:
            inputs = C.token_inputs(applied, batch, SEQ, seed=batch)
            feeds = {k: v.numpy() for k, v in inputs.items()}
            diff = float(np.abs(merged_session.run(None, feeds)[0] - eager(applied, inputs).numpy()).max())
            C.progress(f"timing {batch}x{SEQ} (ONNX Runtime vs torch: max |diff| {diff:.1e})")
            times = C.alternate({
                "onnxruntime, merged": lambda: merged_session.run(None, feeds),
                "torch eager, merged": lambda: eager(folded, inputs),
                "torch eager, adapter applied": lambda: eager(applied, inputs),
            }, repeats)
            for name, values in times.items():
                rows.append([name, f"{batch}x{SEQ}", C.fmt(values)])
            medians[batch] = {k: statistics.median(v) for k, v in times.items()}
            swap = C.alternate({
                "swappable, no adapter": lambda: swap_session.run(None, feeds),
                "swappable, one adapter": lambda: swap_session.run(None, feeds, fixed),
                "swappable, switched every request": lambda: switched(feeds),
            }, repeats)
            for name, values in swap.items():
                swap_rows.append([name, f"{batch}x{SEQ}", C.fmt(values)])
            medians[batch].update({k: statistics.median(v) for k, v in swap.items()})
        load_times = C.alternate({"load": lambda: ort.LoraAdapter().Load(
            str(swappable / "adapters" / f"{first.name}.onnx_adapter"))}, max(repeats, 5))["load"]

    label = C.base_label(args, base)
    lines = C.report_head("ONNX export: ONNX Runtime vs torch eager", label, threads, repeats,
                          extra=f"LoRA r 16 (alpha 32) on {', '.join(C.LINEAR_KINDS)}.")
    lines += [C.table(["contender", "tokens", "latency (min / median / max)"], rows), ""]
    for batch in BATCHES:
        m = medians[batch]
        value = C.ratio(m["onnxruntime, merged"], m["torch eager, merged"])
        lines.append(C.ratio_line(f"ONNX Runtime merged latency, {batch}x{SEQ}", value, of="torch eager (merged)"))
    lines += ["", "#### Swappable mode: one model, adapters as inputs", "",
              C.table(["request", "tokens", "latency (min / median / max)"], swap_rows), ""]
    for batch in BATCHES:
        m = medians[batch]
        cost = m["swappable, switched every request"] - m["swappable, one adapter"]
        over = m["swappable, one adapter"] - m["onnxruntime, merged"]
        lines.append(f"- {batch}x{SEQ}: switch cost (median switched - median one adapter) **{cost * 1e3:+.2f} ms**; "
                     f"adapter as inputs vs merged: {over * 1e3:+.2f} ms per request")
    lines += [f"- loading an .onnx_adapter file into a LoraAdapter: {C.fmt([t * 1e3 for t in load_times], 'ms', 2)}",
              f"- export wall time: merged {export_times['merged']:.1f} s, swappable (2 adapters) "
              f"{export_times['swappable']:.1f} s (load, trace, write, verify in ONNX Runtime)"]
    C.emit("\n".join(lines))


if __name__ == "__main__":
    main()
