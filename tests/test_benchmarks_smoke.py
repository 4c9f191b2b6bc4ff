"""The benchmark suite at smoke size: every scenario finishes and prints a markdown table.

No timing assertions. Each scenario script runs with the exact arguments
``benchmarks/run_all.py --tiny`` gives it, but inside this process (``main(argv)``):
``run_all`` runs each in a fresh process so that imports do not skew real timings, and
at smoke size that would only pay the import of torch, transformers and PEFT once per
script. The scripts still start their own measured child processes. ``run_all.py``
itself is checked end to end with a stand-in scenario, and its document rewriting,
summary parsing and physical limits are checked directly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TABLE = re.compile(r"^\|[^\n]*\|\n\|( *:?-{3,}:? *\|)+$", re.M)


def load_script(name: str) -> ModuleType:
    """The module of ``benchmarks/<name>`` (imported by its own name, as the scripts import each other)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module = importlib.import_module(Path(name).stem)
    assert Path(module.__file__).resolve() == (BENCH / name).resolve(), f"{name} is shadowed by {module.__file__}"
    return module


run_all = load_script("run_all.py")
SCENARIOS = {s.key: s for s in run_all.SCENARIOS}


@pytest.fixture
def clean_process():
    """The scripts set environment variables and torch threads for their runs: put them back."""
    import torch

    environ, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


def tiny_args(**overrides) -> argparse.Namespace:
    values = {"tiny": True, "threads": 1, "profile": True, "llama_cpp": None}
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_scenario_runs_at_smoke_size_and_prints_a_table(key, clean_process, monkeypatch):
    scenario = SCENARIOS[key]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if scenario.script:
            argv = run_all.scenario_command(scenario, tiny_args())[2:]  # drop python and the script
            main = load_script(scenario.script).main
            monkeypatch.setattr(sys, "argv", [str(BENCH / scenario.script), *argv])  # for a main() without argv
            status = main(argv) if inspect.signature(main).parameters else main()
        else:
            status = run_all.bench_command(True, 1)
    text = out.getvalue()
    assert status in (0, None), text[-2000:]
    assert TABLE.search(text) or "adapterkit bench:" in text, f"{key} printed no table:\n{text[-2000:]}"
    assert "Traceback" not in text


def test_tiny_commands_are_smoke_sized():
    for scenario in run_all.SCENARIOS:
        command = run_all.scenario_command(scenario, tiny_args(profile=False))
        if scenario.script:
            assert command[2] == "--tiny" and "--profile" not in command
        else:
            assert command[-2:] == ["1", "1"]  # tiny, threads


def test_full_commands_pass_threads_profile_and_llama_cpp():
    args = argparse.Namespace(tiny=False, threads=7, profile=True, llama_cpp=Path("/opt/llama.cpp"))
    convert = run_all.scenario_command(SCENARIOS["convert"], args)
    assert "--tiny" not in convert and convert[-2:] == ["--llama-cpp", "/opt/llama.cpp"]
    assert ["--threads", "7"] == convert[convert.index("--threads"):convert.index("--threads") + 2]
    assert "--profile" in convert
    merge = run_all.scenario_command(SCENARIOS["merge"], args)
    assert "--threads" not in merge and "--profile" not in merge  # merge keeps its own thread policy


OUTPUTS = """### a scenario
| a | b |
|---|---|
| 1 | 2 |

- validate wall time: **0.046x** `import peft` (target <= 0.1x: meets)
- apply from disk: **0.424x** `PeftModel.from_pretrained`
- AdapterPool, segment kernel: overhead **0.52x** PEFT's (target <= 0.33x: misses); throughput 1.1x PEFT's
- pool.load (adapterkit folder): **0.40x** hotswap_adapter (target <= 0.5x: meets); 0.2x load_adapter
- unmerged overhead over the base, batch 8 x 128: n/a; PEFT's overhead is not above the noise
- unmerged overhead over the base, batch 1 x 128: n/a (target <= 0.5x: not measurable); the noise
- convert wall time: **0.182x** llama.cpp's quoted number (not measured in this run) (target <= 0.25x: meets)
- 1000 registered, zipf: paging, time per token: **1.19x** 16 resident (target <= 1.25x: meets); note
"""


def fake_result(key: str = "forward", stdout: str = OUTPUTS, status: int = 0) -> dict:
    return {"scenario": SCENARIOS[key], "status": status, "stdout": stdout, "stderr": "boom\n", "seconds": 1.0,
            "cpu": 1.0}


def test_summary_collects_every_ratio_with_a_target():
    text = "\n".join(run_all.summary([fake_result(), fake_result("merge", "no ratios", status=1)]))
    assert "| forward | validate wall time | **0.046x** `import peft` | <= 0.1x | meets |" in text
    assert "| forward | AdapterPool, segment kernel: overhead | **0.520x** PEFT's | <= 0.33x | **misses** |" in text
    assert "| forward | pool.load (adapterkit folder) | **0.400x** hotswap_adapter | <= 0.5x | meets |" in text
    assert "| forward | unmerged overhead over the base, batch 1 x 128 | n/a | <= 0.5x | not measurable |" in text
    assert ("| forward | convert wall time | **0.182x** llama.cpp's quoted number (not measured in this run) "
            "| <= 0.25x | meets |") in text
    assert "| forward | 1000 registered, zipf: paging, time per token | **1.190x** 16 resident | <= 1.25x | meets |" in text
    assert "apply from disk" not in text and "batch 8 x 128" not in text  # no target, no row
    assert "Not met here: forward: AdapterPool, segment kernel: overhead (misses)" in text
    assert "Failed scenarios: merge (exit 1)" in text


def test_sections_demote_headings_and_show_failures():
    text = "\n".join(run_all.section(fake_result(stdout="## top\n```text\n## not a heading\n```\n### keep")))
    assert "### top" in text and "## not a heading" in text and "### keep" in text
    failed = "\n".join(run_all.section(fake_result(stdout="", status=3)))
    assert "This scenario failed (exit status 3)" in failed and "boom" in failed


def test_write_doc_replaces_only_between_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# prose\n\nkept\n\n{run_all.BEGIN}\nold numbers\n{run_all.END}\n\n## notes\nkept too\n")
    run_all.write_doc(doc, "new numbers\n")
    assert doc.read_text() == f"# prose\n\nkept\n\n{run_all.BEGIN}\nnew numbers\n{run_all.END}\n\n## notes\nkept too\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one"):
        run_all.write_doc(doc, "x")
    assert doc.read_text() == "no markers\n"


def test_update_replaces_one_section_and_rebuilds_the_summary(tmp_path):
    """--update --paste: one scenario's section in place (or inserted in scenario order); the rest is kept."""
    forward, pool, serve = SCENARIOS["forward"], SCENARIOS["pool"], SCENARIOS["serve"]
    block = "\n".join([
        "_Generated by `python benchmarks/run_all.py` on 2026-11-28; do not edit between the markers._", "",
        "### Machine", "", "|  |  |", "|---|---|", "| CPU | x |", "| load average | 1 |", "",
        "### Targets", "", "| old table |", "", "### Physical limits of this machine", "", "| limits |", "",
        f"## {forward.title}", "", "- speed: **0.3x** PEFT (target <= 0.5x: meets)", "",
        "```text", "## not a section", "```", "",
        f"## {pool.title}", "", "- swap: **0.9x** PEFT (target <= 0.5x: misses)", ""])
    pasted = {"scenario": serve, "status": 0, "stdout": "## paged\n- paging: **0.1x** PEFT (target <= 0.25x: meets)",
              "stderr": "", "pasted": True}
    once = run_all.update_block(block, [pasted], {"serve": "pasted"})
    assert once.index(f"## {forward.title}") < once.index(f"## {pool.title}") < once.index(f"## {serve.title}")
    assert "## not a section" in once and "| limits |" in once and "| old table |" not in once
    assert "### paged" in once and "its output pasted by `run_all.py --paste`" in once
    assert "| forward | speed | **0.300x** PEFT | <= 0.5x | meets |" in once
    assert "| serve | paging | **0.100x** PEFT | <= 0.25x | meets |" in once
    assert "Not met here: pool: swap (misses)" in once
    assert "| load average | 1 |\n| updated: serve | pasted |\n" in once
    pasted["stdout"] = "- paging: **0.2x** PEFT (target <= 0.25x: meets)"
    twice = run_all.update_block(once, [pasted], {"serve": "again"})
    assert twice.count(f"## {serve.title}") == 1 and twice.count("| updated: serve |") == 1
    assert "**0.200x**" in twice and "**0.100x**" not in twice and "| updated: serve | again |" in twice
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"prose\n{run_all.BEGIN}\n{block}\n{run_all.END}\n")
    assert run_all.read_block(doc).startswith("_Generated by")


def test_paste_needs_a_scenario_run_and_a_file():
    for paste in ("serve=/no/such/file", "nope=x"):
        result = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "serve", "--update", "--paste",
                                 paste, "--no-write"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "--paste" in result.stderr


def test_the_real_doc_has_the_markers():
    text = (ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1
    assert text.index(run_all.BEGIN) < text.index(run_all.END)


def test_physical_limits_at_smoke_size():
    text = "\n".join(run_all.physical_limits(tiny_args(threads=2)))
    assert TABLE.search(text)
    assert "safetensors copy of the base" in text and "GFLOP/s" in text
    assert "1 thread(s)" in text and "2 thread(s)" in text


STAND_IN = """
print("### stand-in")
print("| x |")
print("|---|")
print("- speed: **0.2x** PEFT (target <= 0.5x: meets)")
"""


def test_run_all_end_to_end_with_a_stand_in_scenario(tmp_path):
    """The orchestration (a child per scenario, summary, document) without paying for the real scenarios."""
    script = tmp_path / "bench_stand_in.py"
    script.write_text(STAND_IN)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"prose\n{run_all.BEGIN}\n{run_all.END}\nmore prose\n")
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import run_all; "
            f"run_all.HERE = run_all.Path({str(tmp_path)!r}); "
            "run_all.SCENARIOS = [run_all.Scenario('stand_in', 'bench_stand_in.py', 'A stand-in')]; "
            "sys.exit(run_all.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "--no-limits", "--doc", str(doc)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = doc.read_text()
    assert written.startswith(f"prose\n{run_all.BEGIN}\n") and written.endswith(f"{run_all.END}\nmore prose\n")
    assert "## A stand-in" in written and "### stand-in" in written
    assert "| stand_in | speed | **0.200x** PEFT | <= 0.5x | meets |" in written
    assert "### Machine" in written and "torch threads" in written
    assert result.stdout in written


def test_unknown_scenario_is_a_usage_error():
    result = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nope", "--no-write"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown scenario" in result.stderr


def test_onnx_precision_study_at_smoke_size(clean_process):
    """benchmarks/onnx_precision.py (a precision study, outside run_all): on the tiny llama every float32
    computation agrees within 1e-6, and the table says so."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = load_script("onnx_precision.py").main(["--tiny", "--threads", "1"])
    text = out.getvalue()
    assert status == 0 and TABLE.search(text), text
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in text.splitlines() if line.count("|") == 6}
    for label in ("ONNX Runtime vs torch float32", "torch float32 vs float64", "ONNX Runtime vs torch float64"):
        assert 0 < max(float(v) for v in rows[label]) < 1e-6, rows[label]
    assert "| 2/2 |" in text


def test_serving_benchmark_reports_uniform_and_skewed_traffic(clean_process):
    """benchmarks/bench_serve.py --tiny: paged pools under uniform and Zipf traffic, PEFT loaded and swapping,
    the same logits as PEFT, and the decode-step table."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = load_script("bench_serve.py").main(["--tiny", "--threads", "1"])
    text = out.getvalue()
    assert status == 0 and TABLE.search(text), text
    for label in ("| AdapterPool, 40 registered / 4 slots, uniform |", "| AdapterPool, 40 registered / 4 slots, zipf |",
                  "| PEFT swapping, 40 registered, zipf |", "| PEFT, 10 loaded, adapter_names=, uniform |",
                  "| 4 resident adapters (AdapterPool) |", "| base model alone |",
                  "- decode step, 4 adapters, gather, eager: **"):
        assert label in text, label
    target = [m for m in run_all.RATIO.finditer(text) if m["target"]]  # what run_all collects into the summary
    assert {m["target"] for m in target} == {"1.25", "0.25"}, [m.group(0) for m in target]
    assert all(m["label"].startswith("40 registered / 4 slots, zipf") for m in target)
    differences = [float(m) for m in re.findall(r"max abs logit difference to PEFT on \d+ rows ([\d.e+-]+)", text)]
    assert len(differences) == 3 and max(differences) <= 1e-5, differences
