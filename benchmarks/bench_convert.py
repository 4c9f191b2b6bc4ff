"""Conversion benchmark: ``adapterkit convert`` PEFT -> GGUF side by side with llama.cpp's ``convert_lora_to_gguf.py``.

One r=16, alpha 32 LoRA adapter on all seven linear kinds of SmolLM2-135M (210
modules, float32), saved by PEFT. Each run is a fresh process started from a tiny
launcher (wall time, CPU time and peak RSS from the kernel); runs alternate.

- adapterkit: ``adapterkit convert PEFT_DIR OUT --to gguf --base BASE`` (the console
  script; reads the base's config.json and safetensors headers, never its weights).
- llama.cpp: ``python LLAMA_CPP/convert_lora_to_gguf.py --base BASE --outfile OUT
  --outtype f32 PEFT_DIR``, only when ``--llama-cpp DIR`` points at a llama.cpp
  checkout (its converter and ``gguf-py`` are not ours to ship). Both files are then
  read back with ``gguf`` and their tensors compared.

Without ``--llama-cpp`` the llama.cpp side is the number quoted in the issue
(3.8 s, 334 MB on this model), labelled "quoted, not measured".

A llama.cpp checkout is also inside the source distribution of llama-cpp-python on
PyPI (``vendor/llama.cpp``); nothing needs building, only these files::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp \\
        llama_cpp_python-0.3.36/vendor/llama.cpp/{convert_lora_to_gguf.py,convert_hf_to_gguf.py,conversion,gguf-py}
    python benchmarks/bench_convert.py --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp

Usage::

    python benchmarks/bench_convert.py                          # SmolLM2-135M, quoted llama.cpp number
    python benchmarks/bench_convert.py --llama-cpp ~/llama.cpp  # measured side by side
    python benchmarks/bench_convert.py --tiny                   # a tiny seeded llama (CI smoke)
    python benchmarks/bench_convert.py --profile                # + cProfile of one adapterkit convert

Target (issue): <= 0.25x llama.cpp's converter.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.25
QUOTED = {"wall": 3.8, "rss_mb": 334.0}  # the measurement of convert_lora_to_gguf.py on SmolLM2-135M
OURS, THEIRS = "adapterkit convert --to gguf", "llama.cpp convert_lora_to_gguf.py"


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    parser = common.parser(__doc__, repeats=5, tiny_repeats=1)
    parser.add_argument("--llama-cpp", type=Path, metavar="DIR",
                        help="a llama.cpp checkout (convert_lora_to_gguf.py + gguf-py) to measure side by side")
    args = parser.parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    converter = check_llama_cpp(args.llama_cpp) if args.llama_cpp else None
    with common.workdir(args, "bench-convert-") as work:
        base = common.base_of(args, work)
        common.progress(f"making an r=16 LoRA adapter (7 linear kinds) on {base}")
        peft_dir, _ = common.make_lora_pair(base, work)
        outs = {OURS: work / "out-adapterkit", THEIRS: work / "out-llama-cpp"}
        commands = {OURS: [*common.console_script(), "convert", peft_dir, outs[OURS], "--to", "gguf", "--base", base]}
        if converter is not None:
            commands[THEIRS] = [sys.executable, converter, "--base", base, "--outfile", outs[THEIRS] / "adapter.gguf",
                                "--outtype", "f32", peft_dir]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
        first = 1 if args.tiny else 0  # round 0 warms the page cache and the bytecode caches (skipped with --tiny)
        for round_ in range(first, 1 + repeats):
            for name, command in commands.items():
                shutil.rmtree(outs[name], ignore_errors=True)
                if name == THEIRS:
                    outs[name].mkdir(parents=True)
                run = common.run_process(command)
                if round_:
                    runs[name].append(run)
                common.progress(f"{'warm-up' if not round_ else f'run {round_}/{repeats}'} {name}: "
                                f"{run['wall']:.2f} s, {run['rss_mb']:.0f} MB")
        sizes = {name: common.folder_bytes(outs[name]) for name in commands}
        diff = compare(outs[OURS], outs[THEIRS]) if converter is not None else None
        profile = profile_convert(peft_dir, work / "out-profile", base) if args.profile else ""
        common.emit(report(args, base, runs, sizes, diff, threads, repeats, profile))
    return 0


def check_llama_cpp(folder: Path) -> Path:
    script = folder / "convert_lora_to_gguf.py"
    missing = [str(p) for p in (script, folder / "gguf-py") if not p.exists()]
    if missing:
        raise SystemExit(f"--llama-cpp {folder}: not a llama.cpp checkout (missing {', '.join(missing)})")
    return script


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor names in common and the largest |difference| between the two GGUF files."""
    import numpy as np
    from gguf import GGUFReader

    def tensors(path: Path) -> dict[str, Any]:
        (file,) = path.rglob("*.gguf")
        return {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(file).tensors}

    a, b = tensors(ours), tensors(theirs)
    common_names = sorted(set(a) & set(b))
    worst = max((float(np.abs(a[n].reshape(-1) - b[n].reshape(-1)).max()) for n in common_names
                 if a[n].size == b[n].size), default=float("nan"))
    return {"common": len(common_names), "ours": len(a), "theirs": len(b), "max_abs_diff": worst}


def profile_convert(peft_dir: Path, out: Path, base: Path) -> str:
    """cProfile of one whole ``adapterkit convert`` in a fresh process, top entries by cumulative time."""
    shutil.rmtree(out, ignore_errors=True)
    return common.profile_cli("convert", peft_dir, out, "--to", "gguf", "--base", base)


def report(args: argparse.Namespace, base: Path, runs: dict[str, list[dict[str, Any]]], sizes: dict[str, int],
           diff: dict[str, Any] | None, threads: int, repeats: int, profile: str) -> str:
    note = "Each run a fresh process (wall, CPU and peak RSS from the kernel)." + (" --tiny: no warm-up." if args.tiny
                                                                                   else "")
    lines = common.report_head("convert: PEFT LoRA r=16 (7 linear kinds) -> GGUF", common.base_label(args, base),
                               None, repeats, note)
    rows = []
    for name, values in runs.items():
        rows.append([name, common.fmt([r["wall"] for r in values], "s"), common.fmt([r["cpu"] for r in values], "s"),
                     common.fmt([r["rss_mb"] for r in values], "MB", 0), f"{sizes[name] / 1e6:.2f} MB"])
    measured = THEIRS in runs
    if not measured:
        rows.append([f"{THEIRS} (**quoted, not measured**)", f"{QUOTED['wall']:.1f} s", "-",
                     f"{QUOTED['rss_mb']:.0f} MB", "-"])
    lines.append(common.table(["process", "wall time", "CPU time (user + sys)", "peak RSS", "output"], rows))
    ours_wall = [r["wall"] for r in runs[OURS]]
    ours_rss = [r["rss_mb"] for r in runs[OURS]]
    lines.append("")
    if measured:
        target = None if args.tiny else TARGET
        lines += [
            common.ratio_line("convert wall time", common.ratio(ours_wall, [r["wall"] for r in runs[THEIRS]]), target,
                              of="llama.cpp"),
            common.ratio_line("convert peak RSS", common.ratio(ours_rss, [r["rss_mb"] for r in runs[THEIRS]]), target,
                              of="llama.cpp"),
            f"- the two GGUF files: {diff['common']} tensor names in common (adapterkit {diff['ours']}, "
            f"llama.cpp {diff['theirs']}), max abs difference {diff['max_abs_diff']:.1e}",
        ]
    elif not args.tiny:
        of = "llama.cpp's quoted number (not measured in this run)"
        lines += [
            common.ratio_line("convert wall time", common.ratio(ours_wall, QUOTED["wall"]), TARGET, of=of),
            common.ratio_line("convert peak RSS", common.ratio(ours_rss, QUOTED["rss_mb"]), TARGET, of=of),
            "- llama.cpp's converter was not run: pass `--llama-cpp DIR` (a llama.cpp checkout) to measure it here.",
        ]
    else:
        lines.append("- llama.cpp's converter was not run (`--llama-cpp DIR` measures it); the quoted number is for "
                     "SmolLM2-135M, not for the tiny model: no ratio.")
    if profile:
        lines += ["", "#### profile: one whole `adapterkit convert --to gguf` (cumulative time, imports included)", "",
                  profile]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
