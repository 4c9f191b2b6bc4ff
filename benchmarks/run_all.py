"""Run every benchmark scenario side by side with its peer and rewrite docs/benchmarks.md.

One command::

    python benchmarks/run_all.py                 # the real SmolLM2-135M; rewrites docs/benchmarks.md
    python benchmarks/run_all.py --no-write      # print only
    python benchmarks/run_all.py --tiny          # every scenario at smoke size (CI); never writes the doc
    python benchmarks/run_all.py --only forward,inject --no-write
    python benchmarks/run_all.py --only serve --update        # rewrite only that scenario's section
    python benchmarks/run_all.py --only serve --update --paste serve=serve.md   # a separate run's saved output
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

``--update`` keeps the document's other sections: the scenarios run replace their own
sections (or are inserted in scenario order), the summary table is rebuilt from every
section then in the document, and the machine table gains an ``updated: <scenario>`` row
(date, commit, load average). ``--paste KEY=FILE`` takes a scenario's section from FILE,
the saved standard output of its script run separately (a long run with its own options:
the script prints its command line, machine and load), instead of running it.
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
    Scenario("serve", "bench_serve.py", "Serving at scale: paged adapters under traffic, decode steps (AdapterPool vs "
             "PEFT)", threads=True),
    Scenario("merge", "bench_merge.py", "Merge into the base, to disk", tiny_args=["--repeats", "1"]),
    Scenario("compose", "bench_compose.py", "Compose: svd / ties / linear", tiny_args=["--strategies", "svd"]),
    Scenario("to_lora", "bench_to_lora.py", "to-lora: DoRA lowered to LoRA vs PEFT's convert_to_lora",
             threads=True),
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

def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_block(args: argparse.Namespace, started: dt.datetime, load_start: float | None) -> list[str]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit, load_end = _commit(), _load()
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
         else "SmolLM2-135M-Instruct, float32 (adapterkit.core.demo.real_models.smollm2_path)"],
    ]
    return ["### Machine", "", common.table(["", ""], rows)]


def updated_rows(results: list[dict[str, Any]], started: dt.datetime, load_start: float | None) -> dict[str, str]:
    """What the machine table says of each scenario an ``--update`` rewrote."""
    commit, load_end = _commit(), _load()
    rows = {}
    for result in results:
        if result.get("pasted"):
            rows[result["scenario"].key] = (f"{started.strftime('%Y-%m-%d')}: pasted from a separate run (commit "
                                            f"{commit}); its own lines give the machine, load and command")
        else:
            rows[result["scenario"].key] = (f"{started.strftime('%Y-%m-%d %H:%M')}, commit {commit}, load average "
                                            f"{load_start} at the start, {load_end} at the end; the other sections "
                                            "are those of the run above")
    return rows


def summary(results: list[dict[str, Any]]) -> list[str]:
    rows, missed = [], []
    for result in results:
        for match in RATIO.finditer(result["stdout"]):
            if not match.group("target"):
                continue
            pre = match.group("pre").strip().rstrip(":").strip()  # "- a: b: **1x**": the label is "a: b"
            label = match.group("label") + (": " + pre if pre else "")
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
    if result.get("pasted"):
        timing = "run separately, its output pasted by `run_all.py --paste` (its command line and time at its end)."
    else:
        timing = f"{result['seconds']:.0f} s wall, {result['cpu']:.0f} s CPU in all (setup included)."
    lines = [f"## {s.title}", "", f"`{command}`: {timing}", ""]
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


def _sections(block: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A generated block's head (machine, targets, limits) and its scenario sections, (title, lines) in order."""
    head: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fence = False
    for line in block.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            sections.append((line[3:].strip(), [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            head.append(line)
    return head, sections


def _subsection(lines: list[str], title: str) -> tuple[int, int] | None:
    """Where ``### title`` starts and ends (the next ``### `` heading, or the end) in ``lines``."""
    if title not in lines:
        return None
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
    return start, end


def update_block(block: str, results: list[dict[str, Any]], updated: dict[str, str]) -> str:
    """``block`` (a generated results block) with the sections of ``results`` replaced or inserted.

    The summary table is rebuilt from every section of the new block; the machine table gains
    one ``updated: <key>`` row per scenario (``updated``: key -> what the row says).
    """
    head, sections = _sections(block)
    by_title = {s.title: s for s in SCENARIOS}
    fresh = {r["scenario"].title: section(r) for r in results}
    merged = dict(sections)
    for title, lines in fresh.items():
        merged[title] = [*lines, ""]
    order = [s.title for s in SCENARIOS]
    titles = sorted(merged, key=lambda t: order.index(t) if t in order else len(order))  # stable: others stay
    kept = []
    for title in titles:
        scenario = by_title.get(title)
        if scenario is not None:
            text = "\n".join(merged[title])
            failed = re.search(r"This scenario failed \(exit status (\S+?)\)", text)
            kept.append({"scenario": scenario, "stdout": text, "status": failed.group(1) if failed else 0})
    targets = _subsection(head, "### Targets")
    if targets is not None:
        start, end = targets
        head = [*head[:start], *summary(kept), "", *head[end:]]
    machine = _subsection(head, "### Machine")
    if machine is not None:
        start, end = machine
        last = start + max(i for i, line in enumerate(head[start:end]) if line.startswith("|"))
        for key, text in updated.items():
            row = f"| updated: {key} | {text} |"
            same = [i for i in range(start, end) if head[i].startswith(f"| updated: {key} |")]
            if same:
                head[same[0]] = row
            else:
                head.insert(last + 1, row)
                last += 1
    out = [*head]
    for title in titles:
        out += merged[title]
    return "\n".join(out).rstrip() + "\n"


def _split_doc(path: Path) -> tuple[str, str, str]:
    """The document before the begin marker, between the markers, after the end marker."""
    text = path.read_text("utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs exactly one {BEGIN} ... {END} pair; nothing written")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head, block, tail


def read_block(path: Path) -> str:
    return _split_doc(path)[1].lstrip("\n")


def write_doc(path: Path, generated: str) -> None:
    from adapterkit.core.io import atomic_write_bytes

    head, _, tail = _split_doc(path)
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
    parser.add_argument("--update", action="store_true",
                        help="rewrite only the sections of the scenarios run (and the summary); keep the others")
    parser.add_argument("--paste", action="append", default=[], metavar="KEY=FILE",
                        help="take scenario KEY's section from FILE (its script's saved output) instead of running it")
    parser.add_argument("-v", "--verbose", action="store_true", help="pass the scripts' progress output through")
    args = parser.parse_args(argv)
    keys = [s.key for s in SCENARIOS]
    chosen = [k for k in (args.only.split(",") if args.only else keys) if k]
    unknown = [k for k in chosen + (args.skip.split(",") if args.skip else []) if k and k not in keys]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {keys}")
    skip = set(args.skip.split(",")) if args.skip else set()
    scenarios = [s for s in SCENARIOS if s.key in chosen and s.key not in skip]
    pasted = {}
    for item in args.paste:
        key, _, file = item.partition("=")
        if key not in [s.key for s in scenarios] or not file:
            parser.error(f"--paste {item}: expected KEY=FILE with KEY one of the scenarios run "
                         f"({','.join(s.key for s in scenarios)})")
        if not Path(file).is_file():
            parser.error(f"--paste {item}: no such file {file}")
        pasted[key] = Path(file).read_text("utf-8").strip()
    if args.update and args.tiny:
        parser.error("--update rewrites the document, which --tiny never does")

    common.quiet()
    started = dt.datetime.now()
    load_start = _load()
    limits = physical_limits(args) if args.limits and not args.update else []
    results = [{"scenario": s, "status": 0, "stdout": pasted[s.key], "stderr": "", "pasted": True}
               if s.key in pasted else run_scenario(s, args) for s in scenarios]
    if args.update:
        generated = update_block(read_block(args.doc), results, updated_rows(results, started, load_start))
    else:
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
