"""Compose benchmark: ``adapterkit compose`` side by side with PEFT's add_weighted_adapter.

Two random LoRA adapters (r=16, all linear layers, alphas 32 and 16) on one
base; weights 0.7 / 0.3; strategies svd (rank 16), ties (density 0.5) and
linear. Each run is a fresh process, runs alternate (adapterkit, PEFT, ...),
wall time / CPU time / peak RSS come from the kernel (see bench_merge.py).
"op" is the combining call alone, timed inside the process:
``compose(...)`` (numpy) versus ``add_weighted_adapter(...)`` (torch); the
process columns add imports, loading and saving (PEFT also loads the base
model, which add_weighted_adapter needs). The combined delta weights of both
tools are compared at the end.

Usage::

    python benchmarks/bench_compose.py               # SmolLM2-135M
    python benchmarks/bench_compose.py --base PATH
    python benchmarks/bench_compose.py --tiny        # fast smoke run (CI)

Target (issue): svd in <= 0.05x PEFT's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import (  # noqa: E402
    default_base,
    fmt,
    make_adapters,
    ratio_line,
    run_child,
    set_child_threads,
    tiny_base,
)

WEIGHTS = [0.7, 0.3]
STRATEGIES: dict[str, dict[str, Any]] = {"svd": {}, "ties": {"density": 0.5}, "linear": {}}

ADAPTERKIT_COMPOSE = """
import json, sys, time
from adapterkit.core.store.adapters import load, save
from adapterkit.core.ops.compose import compose
strategy, out, a, b, options, weights = sys.argv[1:7]
adapters = [load(a), load(b)]
start = time.perf_counter()
result = compose(adapters, strategy, weights=json.loads(weights), **json.loads(options))
op = time.perf_counter() - start
save(result, out)
print(json.dumps({"op": op}))
"""

PEFT_COMPOSE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
strategy, out, base, a, b, options, weights = sys.argv[1:8]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
start = time.perf_counter()
model.add_weighted_adapter(["a", "b"], json.loads(weights), "merged", combination_type=strategy, **json.loads(options))
op = time.perf_counter() - start
model.save_pretrained(out, selected_adapters=["merged"])
print(json.dumps({"op": op}))
"""


def max_delta_difference(ours: Path, theirs: Path) -> float:
    """Largest |difference| between the two results' delta weights (both have scale 1)."""
    import numpy as np
    from safetensors.numpy import load_file

    mine = load_file(ours / "adapter.safetensors")
    (peft_file,) = theirs.rglob("adapter_model.safetensors")
    other = load_file(peft_file)
    worst = 0.0
    for key in mine:
        if not key.endswith(".lora.A"):
            continue
        module = key[: -len(".lora.A")]
        peft_a = other[f"base_model.model.{module}.lora_A.weight"]
        peft_b = other[f"base_model.model.{module}.lora_B.weight"]
        delta = mine[f"{module}.lora.B"] @ mine[key]
        worst = max(worst, float(np.abs(delta - peft_b @ peft_a).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="local HF causal LM folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="tiny random llama: a fast smoke run")
    parser.add_argument("--repeats", type=int, help="runs per tool and strategy (default 3; 1 with --tiny)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of svd,ties,linear")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads of every measured process (default 1; 0 = library defaults)")
    args = parser.parse_args(argv)
    threads = set_child_threads(args.threads or None)
    repeats = args.repeats or (1 if args.tiny else 3)
    strategies = [s for s in args.strategies.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-compose-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = tiny_base(work) if args.tiny else (args.base or default_base())
        print(f"preparing two r=16 adapters on {base}", file=sys.stderr)
        adapters = make_adapters(base, work, ("a", "b"))
        (peft_a, ak_a), (peft_b, ak_b) = adapters["a"], adapters["b"]
        weights = json.dumps(WEIGHTS)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        diffs: dict[str, float] = {}
        for strategy in strategies:
            options = STRATEGIES[strategy]
            ours_out, peft_out = work / f"out-adapterkit-{strategy}", work / f"out-peft-{strategy}"
            runs: dict[str, list[dict[str, Any]]] = {"adapterkit compose": [], "PEFT add_weighted_adapter": []}
            for index in range(repeats):
                for name in runs:
                    shutil.rmtree(ours_out if name.startswith("adapterkit") else peft_out, ignore_errors=True)
                    if name.startswith("adapterkit"):
                        run = run_child(ADAPTERKIT_COMPOSE, strategy, ours_out, ak_a, ak_b, json.dumps(options),
                                        weights)
                    else:
                        run = run_child(PEFT_COMPOSE, strategy, peft_out, base, peft_a, peft_b, json.dumps(options),
                                        weights)
                    run["op"] = json.loads(run["stdout"])["op"]
                    runs[name].append(run)
                    print(f"{strategy} run {index + 1}/{repeats} {name}: op {run['op']:.3f} s, "
                          f"wall {run['wall']:.2f} s, "
                          f"{run['rss_mb']:.0f} MB", file=sys.stderr)
            results[strategy] = runs
            diffs[strategy] = max_delta_difference(ours_out, peft_out)
        print(report(results, diffs, base, repeats, threads, targets=not args.tiny))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, list[dict[str, Any]]]], diffs: dict[str, float], base: Path,
           repeats: int, threads: str, targets: bool = True) -> str:
    import platform

    lines = [
        f"### compose: two LoRA r=16 adapters (all linear layers) on {base.name}, weights {WEIGHTS}",
        "",
        f"{repeats} run(s) per tool and strategy, alternating, each in a fresh process; min / **median** / max. "
        "op: the combining call alone; wall, CPU, RSS: the whole process.",
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end; {threads}.",
        "",
        "| strategy | tool | op time | process wall | process CPU | peak RSS | max delta diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for strategy, runs in results.items():
        for name, values in runs.items():
            diff = f"{diffs[strategy]:.1e}" if name.startswith("adapterkit") else ""
            lines.append(
                f"| {strategy} | {name} | {fmt([r['op'] for r in values], 's')} "
                f"| {statistics.median(r['wall'] for r in values):.2f} s "
                f"| {statistics.median(r['cpu'] for r in values):.2f} s "
                f"| {statistics.median(r['rss_mb'] for r in values):.0f} MB | {diff} |"
            )
    lines.append("")
    for strategy, runs in results.items():
        ours, peft = runs["adapterkit compose"], runs["PEFT add_weighted_adapter"]
        target = 0.05 if strategy == "svd" and targets else None
        lines.append(ratio_line(f"{strategy} op time", [r["op"] for r in ours], [r["op"] for r in peft], target))
        lines.append(ratio_line(f"{strategy} process wall", [r["wall"] for r in ours], [r["wall"] for r in peft]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
