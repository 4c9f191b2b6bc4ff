"""``adapterkit bench`` and :func:`adapterkit.core.bench.measure.bench_adapter` on tiny models.

No timing assertions: the numbers depend on the machine. The tests check that the
report has every field, with the right shape and the right absences (a bottleneck
adapter cannot merge and has no pool), that ``--json`` parses and ``--plot`` writes a PNG.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.bench import command
from adapterkit.testing import perturb, tiny_llama

SMALL = {"repeats": 1, "warmup": 0, "seq_len": 8, "batch_sizes": (1, 2), "train_batch": 2, "threads": 1}
REPORT_FIELDS = {"adapter", "base", "format", "method", "config", "merge_refusal", "machine", "settings", "parameters",
                 "sizes", "load", "forward", "train_step", "pool"}
TIMING_FIELDS = {"min", "median", "max", "runs"}


def _save(folder: Path, method: str, config: dict) -> Path:
    model = tiny_llama(0)
    handle = adapterkit.inject(model, method, config)
    perturb(handle.parameters(), scale=0.05)
    return adapterkit.save(handle.to_adapter(), folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    return {"lora": _save(root / "lora", "lora", {"r": 4, "alpha": 8}),
            "bottleneck": _save(root / "bottleneck", "bottleneck", {"reduction_factor": 4})}


@pytest.fixture(scope="module")
def reports(adapters, tiny_base_dirs) -> dict[str, object]:
    from adapterkit.core.bench.measure import bench_adapter

    return {name: bench_adapter(path, tiny_base_dirs["llama"], **SMALL) for name, path in adapters.items()}


def _is_timing(value: object, runs: int = 1) -> bool:
    return isinstance(value, dict) and set(value) == TIMING_FIELDS and len(value["runs"]) == runs \
        and value["min"] <= value["median"] <= value["max"]


def test_lora_report_has_every_field(reports, adapters):
    data = reports["lora"].to_dict()
    json.dumps(data)  # JSON-ready
    assert set(data) == REPORT_FIELDS
    assert data["method"] == "lora" and data["format"] == "adapterkit" and data["merge_refusal"] is None
    assert data["adapter"] == str(adapters["lora"])
    machine = {"cpu", "cores", "threads", "torch", "transformers", "python", "date", "load_average"}
    assert machine <= set(data["machine"])
    assert data["settings"]["threads"] == 1 and data["settings"]["batch_sizes"] == [1, 2]
    params = data["parameters"]
    assert params["adapter"] == params["trainable"] > 0 and params["base"] > params["adapter"]
    assert params["total"] == params["base"] + params["trainable"]
    sizes = data["sizes"]
    assert sizes["adapter_file_bytes"] > sizes["adapter_tensor_bytes"] > 0
    assert sizes["full_copies_bytes"] == sizes["copies"] * sizes["base_bytes"]
    assert sizes["adapter_copies_bytes"] == sizes["copies"] * sizes["adapter_file_bytes"]
    assert all(_is_timing(data["load"][key]) for key in ("base_load", "adapter_read", "apply"))
    assert [f["batch"] for f in data["forward"]] == [1, 2]
    for forward in data["forward"]:
        assert forward["seq_len"] == 8
        assert all(_is_timing(forward[key]) for key in ("base", "unmerged", "merged"))
        assert forward["unmerged_overhead_seconds"] == pytest.approx(
            forward["unmerged"]["median"] - forward["base"]["median"])
        assert isinstance(forward["merged_overhead_fraction"], float)
    train = data["train_step"]
    assert train["batch"] == 2 and train["optimizer"] == "AdamW" and _is_timing(train["seconds"])
    assert train["trainable_tensors"] == 2 * len(json.loads((adapters["lora"] / "adapter.json").read_text())["targets"])
    assert isinstance(train["peak_rss_delta_bytes"], int) and train["peak_rss_delta_bytes"] >= 0


def test_lora_report_measures_the_pool_when_it_exists(reports):
    pool = reports["lora"].to_dict()["pool"]
    if importlib.util.find_spec("adapterkit.core.runtime.pool") is None:
        assert pool["available"] is False and "import" in pool["reason"]
        return
    assert pool["available"] is True and pool["reason"] is None
    assert _is_timing(pool["hot_swap"]) and pool["hot_swap_source"] == "file"
    mixed = pool["mixed_batch"]
    assert _is_timing(mixed["base"]) and _is_timing(mixed["pool"])
    assert mixed["pool_tokens_per_second"] > 0 and mixed["base_tokens_per_second"] > 0


def test_bottleneck_report_shows_the_unmerged_overhead_and_why_it_cannot_merge(reports):
    data = reports["bottleneck"].to_dict()
    assert set(data) == REPORT_FIELDS and data["method"] == "bottleneck"
    assert "cannot be merged" in data["merge_refusal"]
    for forward in data["forward"]:
        assert forward["merged"] is None and forward["merged_overhead_seconds"] is None
        assert _is_timing(forward["unmerged"]) and isinstance(forward["unmerged_overhead_fraction"], float)
    assert data["pool"] == {"available": False, "reason": "the adapter pool serves adapters with low-rank factors; "
                                                          "method 'bottleneck' gives none"}
    assert _is_timing(data["train_step"]["seconds"])


def test_text_report_names_every_block(reports):
    from adapterkit.core.bench.render import format_text

    lora, bottleneck = format_text(reports["lora"]), format_text(reports["bottleneck"])
    for text in (lora, bottleneck):
        for phrase in ("parameters", "10 full copies of this base", "10 adapters", "load the base",
                       "apply onto a fresh base", "forward latency", "training step", "adapter pool"):
            assert phrase in text, phrase
    assert "cannot merge" in bottleneck and "not merged: a bottleneck adapter cannot be merged" in bottleneck
    assert "cannot merge" not in lora


def test_plot_writes_a_png(reports, tmp_path):
    from adapterkit.core.bench.render import plot

    for name, report in reports.items():
        out = plot(report, tmp_path / f"{name}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_memory_adapter_has_no_file_timings(tiny_base_dirs):
    from adapterkit.core.bench.measure import bench_adapter

    model = tiny_llama(0)
    handle = adapterkit.inject(model, "lora", r=2, target_modules=["q_proj"])
    report = bench_adapter(handle.to_adapter(), tiny_base_dirs["llama"], **{**SMALL, "batch_sizes": (1,)}, pool=False)
    data = report.to_dict()
    assert data["adapter"] == "<in memory>" and data["load"]["adapter_read"] is None
    assert data["sizes"]["adapter_file_bytes"] is None and data["sizes"]["adapter_copies_bytes"] > 0
    assert data["pool"] == {"available": False, "reason": "not requested"}


def test_bad_settings_are_usage_errors(adapters, tiny_base_dirs):
    from adapterkit.core.bench.measure import bench_adapter
    from adapterkit.core.errors import UsageError

    for bad in ({"repeats": 0}, {"batch_sizes": ()}, {"batch_sizes": (1, 0)}, {"warmup": -1}, {"seq_len": True}):
        with pytest.raises(UsageError):
            bench_adapter(adapters["lora"], tiny_base_dirs["llama"], **{**SMALL, **bad})


# ---- the command ---------------------------------------------------------------------------

ARGS = ["--repeats", "1", "--seq-len", "8", "--batch-sizes", "1", "--threads", "1"]


def test_cli_json_parses(adapters, tiny_base_dirs):
    result = CliRunner().invoke(command, [str(adapters["bottleneck"]), "--base", str(tiny_base_dirs["llama"]), *ARGS,
                                          "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == REPORT_FIELDS and data["forward"][0]["merged"] is None


def test_cli_text_and_plot(adapters, tiny_base_dirs, tmp_path):

    png = tmp_path / "chart.png"
    result = CliRunner().invoke(command, [str(adapters["lora"]), "--base", str(tiny_base_dirs["llama"]), *ARGS,
                                          "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "forward latency" in result.output and f"wrote {png}" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--repeats", "0"], []])
def test_cli_usage_errors_exit_2(adapters, tiny_base_dirs, args):
    base = [] if not args else ["--base", str(tiny_base_dirs["llama"])]  # [] : --base is missing
    result = CliRunner().invoke(command, [str(adapters["lora"]), *base, *args])
    assert result.exit_code == 2, result.output


def test_cli_user_error_is_one_line_exit_1(adapters, tiny_base_dirs, monkeypatch):
    """Through the top-level group (the lead registers "bench" in COMMANDS; make sure it is here)."""
    from adapterkit.cli import main

    monkeypatch.setitem(main.COMMANDS, "bench", main.COMMANDS.get("bench", ("adapterkit.cli.bench", "Benchmark.")))
    result = CliRunner().invoke(main.cli, ["bench", str(adapters["lora"]), "--base", str(tiny_base_dirs["gpt2"]),
                                           *ARGS])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output


def test_importing_the_command_does_not_import_torch():
    code = ("import sys, adapterkit.cli.bench; "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
