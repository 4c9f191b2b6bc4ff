"""Start-up benchmark: a whole ``adapterkit validate`` process side by side with ``python -c "import peft"``.

Checking one adapter in CI should cost what reading its header costs, not what
importing a deep-learning stack costs. Each run is a fresh process started from a
tiny launcher (wall time, CPU time and peak RSS from the kernel, ``os.wait4``);
runs alternate (A B C D A B C D ...). Contenders:

- ``adapterkit validate ADAPTER`` (the console script) on an r=16 LoRA adapter on all
  seven linear kinds of SmolLM2-135M (210 modules, adapterkit folder);
- the same with ``--base BASE`` (reads the base's config and safetensors headers);
- ``adapterkit validate PEFT_FOLDER`` (the same adapter in PEFT's format);
- ``python -c "import peft"``: the least a PEFT-based check costs (PEFT's own
  loading of the adapter comes on top);
- ``python -c "pass"``: the interpreter's floor.

Usage::

    python benchmarks/bench_validate.py             # SmolLM2-135M
    python benchmarks/bench_validate.py --tiny      # a tiny seeded llama (CI smoke)
    python benchmarks/bench_validate.py --profile   # + cProfile of validate (in-process)

Target (issue): ``adapterkit validate`` <= 0.1x ``import peft`` (PEFT here: 6.8 s).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.1


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    args = common.parser(__doc__, repeats=5, tiny_repeats=1).parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    with common.workdir(args, "bench-validate-") as work:
        base = common.base_of(args, work)
        common.progress(f"making an r=16 LoRA adapter (7 linear kinds) on {base}")
        peft_dir, native_dir = common.make_lora_pair(base, work)
        cli = common.console_script()
        contenders = {
            "adapterkit validate ADAPTER": [*cli, "validate", native_dir],
            "adapterkit validate ADAPTER --base BASE": [*cli, "validate", native_dir, "--base", base],
            "adapterkit validate PEFT_FOLDER": [*cli, "validate", peft_dir],
            'python -c "import peft"': [sys.executable, "-c", "import peft"],
            'python -c "pass"': [sys.executable, "-c", "pass"],
        }
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        first = 1 if args.tiny else 0  # round 0 warms the page cache and the bytecode caches (skipped with --tiny)
        for round_ in range(first, 1 + repeats):
            for name, argv_ in contenders.items():
                run = common.run_process(argv_)
                if round_:
                    runs[name].append(run)
                common.progress(f"{'warm-up' if not round_ else f'run {round_}/{repeats}'} {name}: "
                                f"{run['wall']:.3f} s, {run['rss_mb']:.0f} MB")
        modules = len(json.loads((native_dir / "adapter.json").read_text())["targets"])
        profile = profile_validate(native_dir) if args.profile else ""
        common.emit(report(args, base, runs, threads, repeats, modules, profile))
    return 0


def profile_validate(adapter: Path) -> str:
    """cProfile of one whole ``adapterkit validate`` in a fresh process (imports included)."""
    return common.profile_cli("validate", adapter)


def report(args, base: Path, runs: dict[str, list[dict]], threads: int, repeats: int, modules: int,
           profile: str) -> str:
    note = "Each run a fresh process (wall, CPU and peak RSS from the kernel)." + (" --tiny: no warm-up." if args.tiny
                                                                                   else "")
    lines = common.report_head(f"validate: whole-process start-up, LoRA r=16 on {modules} modules",
                               common.base_label(args, base), None, repeats, note)
    rows = []
    for name, values in runs.items():
        rows.append([name, common.fmt([r["wall"] for r in values], "s"), common.fmt([r["cpu"] for r in values], "s"),
                     common.fmt([r["rss_mb"] for r in values], "MB", 0)])
    lines.append(common.table(["process", "wall time", "CPU time (user + sys)", "peak RSS"], rows))
    ours = [r["wall"] for r in runs["adapterkit validate ADAPTER"]]
    peft = [r["wall"] for r in runs['python -c "import peft"']]
    target = None if args.tiny else TARGET
    lines += [
        "",
        common.ratio_line("validate wall time", common.ratio(ours, peft), target, of='`import peft`'),
        common.ratio_line("validate --base wall time",
                          common.ratio([r["wall"] for r in runs["adapterkit validate ADAPTER --base BASE"]], peft),
                          of='`import peft`'),
        common.ratio_line("validate peak RSS", common.ratio([r["rss_mb"] for r in runs["adapterkit validate ADAPTER"]],
                                                            [r["rss_mb"] for r in runs['python -c "import peft"']]),
                          of='`import peft`'),
    ]
    if profile:
        lines += ["", "#### profile: `adapterkit validate ADAPTER` (cumulative time, imports included)", "", profile]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
