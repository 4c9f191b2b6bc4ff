"""Run every benchmark scenario side by side with its peer and rewrite docs/benchmarks.md.

One command::

    python benchmarks/run_all.py                 # the real SmolLM2-135M; rewrites docs/benchmarks.md
    python benchmarks/run_all.py --no-write      # print only
    python benchmarks/run_all.py --tiny          # every scenario at smoke size (CI); never writes the doc
    python benchmarks/run_all.py --only forward,inject --no-write
    python benchmarks/run_all.py --llama-cpp ~/src/llama.cpp   # measure llama.cpp's converter too

Every scenario script runs in its own process (so that one scenario's imports and
allocations do not skew the next), one after the other; its markdown (stdout) is
pasted into the document between the markers ``<!-- run_all:begin -->`` and
``<!-- run_all:end -->``, with the machine (CPU model, cores, torch version, threads,
date) and the physical limits measured here (a safetensors copy of the base; a float32
1024 x 1024 matmul). Prose outside the markers is kept. Numbers come from the scripts'
output only; nothing is typed.

The summary table collects every ratio line with a target (``- label: **0.12x** PEFT
(target <= 0.5x: meets)``) from the scripts' output. The exit status is 1 when a
scenario failed (a missed target is reported, not a failure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

DOC = common.REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
RATIO = re.compile(r"^- (?P<label>[^:\n]+): (?P<pre>[^*\n]*?)(?:\*\*(?P<value>-?[\d.]+)x\*\*|(?P<na>n/a))"
                   r"(?P<of>[^;\n]*?)(?: ?\(target <= (?P<target>[\d.]+)x: "
                   r"(?P<verdict>meets|misses|not measurable)\))?(?:;|$)", re.M)


@dataclass
class Scenario:
    key: str
    script: str  # a file in benchmarks/, or "" for run_all's own adapterkit-bench scenario
    title: str
    threads: bool = False  # takes --threads (torch threads)
    profile: bool = False  # takes --profile
    tiny_args: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)


SCENARIOS = [
    Scenario("validate", "bench_validate.py", "Start-up: whole-process `adapterkit validate` vs `import peft`",
             threads=True, profile=True),
    Scenario("inject", "bench_inject.py", "Injection: `adapterkit.inject` vs `get_peft_model`", threads=True,
             profile=True),
    Scenario("forward", "bench_forward.py", "Forward latency: unmerged adapter overhead over the base", threads=True,
             profile=True),
    Scenario("train_step", "bench_train_step.py", "Training step: LoRA vs PEFT LoRA vs full fine-tuning",
             threads=True, profile=True),
    Scenario("pool", "bench_pool.py", "Serving: mixed batches and hot-swap (AdapterPool vs PEFT)", threads=True,
             profile=True, tiny_args=["--adapters", "2", "--repeats", "1", "--swap-repeats", "1"]),
    Scenario("merge", "bench_merge.py", "Merge into the base, to disk", tiny_args=["--repeats", "1"]),
    Scenario("compose", "bench_compose.py", "Compose: svd / ties / linear", tiny_args=["--strategies", "svd"]),
    Scenario("convert", "bench_convert.py", "Convert PEFT -> GGUF vs llama.cpp's converter", threads=True,
             profile=True),
    Scenario("qlora_memory", "bench_qlora_memory.py", "QLoRA: 4-bit base memory"),
    Scenario("onnx", "bench_onnx.py", "ONNX export: ONNX Runtime vs torch eager, switching adapters", threads=True),
    Scenario("bench", "", "`adapterkit bench`: one LoRA and one bottleneck adapter, everything at once",
             threads=True),
]

# run_all's own scenario, `adapterkit bench` (a child process like the others)
BENCH_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import run_all; "
               "run_all.bench_command(sys.argv[2] == '1', int(sys.argv[3]))")


def bench_command(tiny: bool, threads: int) -> None:
    """Print ``adapterkit bench`` of an r=16 LoRA adapter and a bottleneck adapter (reduction 16), in markdown."""
    import shutil
    import tempfile

    common.quiet()
    work = Path(tempfile.mkdtemp(prefix="bench-command-"))
    try:
        base = common.base_of(argparse.Namespace(tiny=tiny, base=None), work)
        _, lora = common.make_lora_pair(base, work)
        import adapterkit
        from adapterkit.cli.bench import command
        from adapterkit.testing import perturb

        model = common.load_model(base)
        handle = adapterkit.inject(model, "bottleneck", {"reduction_factor": 16})
        perturb(handle.parameters(), scale=0.02)
        bottleneck = adapterkit.save(handle.to_adapter(), work / "adapterkit-bottleneck")
        del model, handle
        settings = ["--repeats", "1", "--seq-len", "32"] if tiny else ["--repeats", "5"]
        for label, path in (("LoRA r=16, alpha 32, 7 linear kinds", lora),
                            ("bottleneck seq_bn, reduction 16", bottleneck)):
            print(f"#### `adapterkit bench`: {label}\n\n```text", flush=True)
            try:
                command([str(path), "--base", str(base), "--threads", str(threads), *settings], standalone_mode=False)
            finally:
                print("```\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


COPY_CHILD = """
import json, sys, time, shutil, tempfile
from pathlib import Path
from safetensors.numpy import load_file, save_file
base = Path(sys.argv[1])
out = Path(tempfile.mkdtemp(prefix="bench-copy-"))
try:
    read = write = 0.0
    size = 0
    for path in sorted(base.glob("*.safetensors")):
        start = time.perf_counter()
        tensors = load_file(path)
        read += time.perf_counter() - start
        start = time.perf_counter()
        save_file(tensors, out / path.name, metadata={"format": "pt"})
        write += time.perf_counter() - start
        size += path.stat().st_size
        del tensors
    print(json.dumps({"read": read, "write": write, "bytes": size}))
finally:
    shutil.rmtree(out, ignore_errors=True)
"""

MATMUL_CHILD = """
import json, sys, time, torch
threads, n, iters = int(sys.argv[1]), 1024, int(sys.argv[2])
torch.set_num_threads(threads)
a, b = torch.randn(n, n), torch.randn(n, n)
for _ in range(3):
    a @ b
best = []
for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    best.append(2 * n ** 3 * iters / (time.perf_counter() - start) / 1e9)
print(json.dumps({"gflops": best, "threads": torch.get_num_threads()}))
"""


# ---- running ----------------------------------------------------------------------------

def scenario_command(s: Scenario, args: argparse.Namespace) -> list[str]:
    if not s.script:
        return [sys.executable, "-c", BENCH_CHILD, str(HERE), "1" if args.tiny else "0", str(args.threads)]
    command = [sys.executable, str(HERE / s.script)]
    if args.tiny:
        command += ["--tiny", *s.tiny_args]
    else:
        command += s.args
    if s.threads:
        command += ["--threads", str(args.threads)]
    if s.profile and args.profile:
        command += ["--profile"]
    if s.key == "convert" and args.llama_cpp:
        command += ["--llama-cpp", str(args.llama_cpp)]
    return command


def run_scenario(s: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    command = scenario_command(s, args)
    common.progress(f"== {s.key}: {' '.join(command[:2] if s.script else ['adapterkit bench'])} ...")
    env = {**os.environ, **common.CHILD_ENV}
    start, cpu_start = time.perf_counter(), _children_cpu()
    try:
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=args.timeout, cwd=common.REPO)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        status, out, err = "timeout", _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {args.timeout} s)"
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if args.verbose or status != 0:
        sys.stderr.write(err[-3000:] if status != 0 else err)
    common.progress(f"== {s.key}: {'ok' if status == 0 else f'FAILED ({status})'} in {seconds:.0f} s "
                    f"({cpu:.0f} s CPU)")
    return {"scenario": s, "status": status, "stdout": out.strip(), "stderr": err, "seconds": seconds, "cpu": cpu}


def _children_cpu() -> float:
    """CPU seconds (user + sys) of every finished child process so far (grandchildren included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def physical_limits(args: argparse.Namespace) -> list[str]:
    """A safetensors copy of the base (read + write, peak RSS) and float32 matmul GFLOP/s, each in a fresh process."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    try:
        base = common.base_of(argparse.Namespace(tiny=args.tiny, base=None), work)
        repeats = 1 if args.tiny else 3
        copies = [common.run_code(COPY_CHILD, base) for _ in range(1 + repeats)][1:]  # the first warms the cache
        data = [json.loads(run["stdout"].strip().splitlines()[-1]) for run in copies]
        size_mb = data[0]["bytes"] / 1e6
        iters = 2 if args.tiny else 20
        matmul = {t: json.loads(common.run_code(MATMUL_CHILD, t, iters)["stdout"].strip().splitlines()[-1])
                  for t in sorted({1, args.threads})}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reads, writes = [d["read"] for d in data], [d["write"] for d in data]
    rows = [
        [f"safetensors copy of the base ({size_mb:.0f} MB): read (`load_file`, page cache warm)",
         common.fmt(reads, "s"), f"{size_mb / common.stats(reads)[1]:.0f} MB/s"],
        ["safetensors copy of the base: write (`save_file`)", common.fmt(writes, "s"),
         f"{size_mb / common.stats(writes)[1]:.0f} MB/s"],
        ["safetensors copy of the base: whole process", common.fmt([r["wall"] for r in copies], "s"),
         f"peak RSS {common.stats([r['rss_mb'] for r in copies])[1]:.0f} MB"],
    ]
    for threads, result in matmul.items():
        rows.append([f"float32 1024 x 1024 matmul, {threads} thread(s)", "-",
                     f"{common.fmt(result['gflops'], 'GFLOP/s', 1)}"])
    return ["### Physical limits of this machine", "",
            "What any tool is bounded by here: reading and writing the base's weights once, and dense float32 "
            "arithmetic (min / **median** / max).", "",
            common.table(["measure", "time", "rate / memory"], rows)]


# ---- the document ---------------------------------------------------------------------------

def machine_block(args: argparse.Namespace, started: dt.datetime, load_start: float | None) -> list[str]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        load_end = round(os.getloadavg()[0], 2)
    except OSError:
        load_end = None
    rows = [
        ["CPU", f"{common.cpu_model()} ({platform.machine()}), {os.cpu_count()} cores"],
        ["torch threads", f"{args.threads} (every scenario that runs torch in-process; merge and compose keep "
                          "their own default: 1 BLAS thread per process)"],
        ["software", f"Python {platform.python_version()}, torch {version('torch')}, transformers "
                     f"{version('transformers')}, peft {version('peft')}, adapterkit {version('adapterkit')} "
                     f"(commit {commit})"],
        ["date", f"{started.strftime('%Y-%m-%d %H:%M')}, {(dt.datetime.now() - started).seconds // 60} min in all"],
        ["load average", f"{load_start} at the start, {load_end} at the end (the numbers mean little above ~0.5)"],
        ["model", "tiny seeded llama (smoke size: these numbers mean nothing)" if args.tiny
         else "SmolLM2-135M-Instruct, float32 (adapterkit.core.real_models.smollm2_path)"],
    ]
    return ["### Machine", "", common.table(["", ""], rows)]


def summary(results: list[dict[str, Any]]) -> list[str]:
    rows, missed = [], []
    for result in results:
        for match in RATIO.finditer(result["stdout"]):
            if not match.group("target"):
                continue
            label = (match.group("label") + (": " + match.group("pre").strip() if match.group("pre").strip() else ""))
            verdict = match.group("verdict")
            value = "n/a" if match.group("na") else f"**{float(match.group('value')):.3f}x**"
            rows.append([result["scenario"].key, label, f"{value} {match.group('of').strip()}".strip(),
                         f"<= {match.group('target')}x", "**misses**" if verdict == "misses" else verdict])
            if verdict != "meets":
                missed.append(f"{result['scenario'].key}: {label} ({verdict})")
    failed = [r for r in results if r["status"] != 0]
    lines = ["### Targets", ""]
    if rows:
        lines.append(common.table(["scenario", "measure", "adapterkit / peer (ratio of medians)", "target", "verdict"],
                                  rows))
    else:
        lines.append("No ratio with a target was printed (with `--tiny` the scripts print none).")
    if missed:
        lines += ["", "Not met here: " + "; ".join(missed) + ". The profile under each scenario shows where the time "
                  "goes (see also the notes below the results)."]
    if failed:
        lines += ["", "Failed scenarios: " + ", ".join(f"{r['scenario'].key} (exit {r['status']})" for r in failed)]
    return lines


def section(result: dict[str, Any]) -> list[str]:
    s = result["scenario"]
    command = "python -m adapterkit bench (run_all.py)" if not s.script else f"python benchmarks/{s.script}"
    lines = [f"## {s.title}", "", f"`{command}`: {result['seconds']:.0f} s wall, {result['cpu']:.0f} s CPU in all "
             "(setup included).", ""]
    out = _demote(result["stdout"])
    if out:
        lines.append(out)
    if result["status"] != 0:
        tail = "\n".join(result["stderr"].strip().splitlines()[-15:])
        lines += ["", f"**This scenario failed (exit status {result['status']}).** The end of its error output:", "",
                  "```text", tail, "```"]
    return lines


def _demote(markdown: str) -> str:
    """Scripts' headings go below this document's ``## scenario`` heading: ``#`` and ``##`` become ``###``."""
    out, fence = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and re.match(r"^#{1,2} ", line):
            line = "### " + line.lstrip("#").lstrip()
        out.append(line)
    return "\n".join(out)


def render(args: argparse.Namespace, results: list[dict[str, Any]], limits: list[str], started: dt.datetime,
           load_start: float | None) -> str:
    lines = [f"_Generated by `python benchmarks/run_all.py{' --tiny' if args.tiny else ''}` on "
             f"{started.strftime('%Y-%m-%d')}; do not edit between the markers._", ""]
    lines += machine_block(args, started, load_start) + [""] + summary(results) + [""] + limits + [""]
    for result in results:
        lines += section(result) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(path: Path, generated: str) -> None:
    from adapterkit.core.io import atomic_write_bytes

    text = path.read_text("utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs exactly one {BEGIN} ... {END} pair; nothing written")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_bytes(path, (head + BEGIN + "\n" + generated + END + tail).encode("utf-8"))


# ---- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tiny", action="store_true", help="every scenario at smoke size (CI); never writes the doc")
    parser.add_argument("--no-write", action="store_true", help="print the generated section; leave the doc alone")
    parser.add_argument("--only", help=f"comma-separated scenarios ({','.join(s.key for s in SCENARIOS)})")
    parser.add_argument("--skip", help="comma-separated scenarios to leave out")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="leave out the profiles (by default the scripts that can print one do)")
    parser.add_argument("--no-limits", dest="limits", action="store_false", help="skip the physical limits")
    parser.add_argument("--llama-cpp", type=Path, metavar="DIR", help="a llama.cpp checkout, for bench_convert.py")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scenario (default 3600)")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to rewrite (default docs/benchmarks.md)")
    parser.add_argument("-v", "--verbose", action="store_true", help="pass the scripts' progress output through")
    args = parser.parse_args(argv)
    keys = [s.key for s in SCENARIOS]
    chosen = [k for k in (args.only.split(",") if args.only else keys) if k]
    unknown = [k for k in chosen + (args.skip.split(",") if args.skip else []) if k and k not in keys]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {keys}")
    skip = set(args.skip.split(",")) if args.skip else set()
    scenarios = [s for s in SCENARIOS if s.key in chosen and s.key not in skip]

    common.quiet()
    started = dt.datetime.now()
    try:
        load_start = round(os.getloadavg()[0], 2)
    except OSError:
        load_start = None
    limits = physical_limits(args) if args.limits else []
    results = [run_scenario(s, args) for s in scenarios]
    generated = render(args, results, limits, started, load_start)
    sys.stdout.write(generated)
    if args.tiny or args.no_write:
        common.progress("(not written: " + ("--tiny" if args.tiny else "--no-write") + ")")
    else:
        write_doc(args.doc, generated)
        common.progress(f"wrote {args.doc}")
    return 0 if all(r["status"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
