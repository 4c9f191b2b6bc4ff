"""The end-to-end demo (adapterkit.core.demo.run, ``adapterkit demo``) on the real SmolLM2-135M."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterkit.cli.main import cli
from adapterkit.core.demo import run as demo


@pytest.fixture(scope="session")
def demo_cache(smollm2_dir) -> Path:
    """The cache root holding SmolLM2-135M, prepared once per session (the conftest's smollm2_dir)."""
    return smollm2_dir.parent.parent


@pytest.fixture(scope="module")
def demo_run(demo_cache, tmp_path_factory) -> tuple[dict, list[str]]:
    lines: list[str] = []
    result = demo.run_demo(tmp_path_factory.mktemp("demo") / "out", steps=10, seed=0, echo=lines.append,
                           cache_dir=demo_cache)
    return result, lines


# ---- fast -------------------------------------------------------------------------


def test_number_words():
    assert [demo.number_words(n) for n in (0, 13, 20, 47, 99)] == ["zero", "thirteen", "twenty", "forty-seven", "ninety-nine"]
    with pytest.raises(ValueError):
        demo.number_words(100)


def test_task_split_is_seeded_and_held_out():
    train, held_out = demo.make_task(seed=0)
    assert demo.make_task(seed=0) == (train, held_out)
    assert demo.make_task(seed=1) != (train, held_out)
    assert len(held_out) == demo.VALIDATION_SIZE and set(demo.SAMPLES) <= set(held_out)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 100


def test_cli_refuses_existing_outputs_before_training(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter.json").write_text("{}")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "output already exists" in result.output and "--overwrite" in result.output


def test_cli_usage_errors_exit_2():
    assert CliRunner().invoke(cli, ["demo", "--steps", "0"]).exit_code == 2


def test_cli_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from adapterkit.cli.main import cli; "
            "r = CliRunner().invoke(cli, ['demo', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--steps' in r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- slow: trains the real model (about a minute on two cores) ------------------------


@pytest.mark.slow
def test_demo_loss_drops_and_the_adapter_survives_the_toolchain(demo_run):
    result, lines = demo_run
    assert result["ok"], result["checks"]
    assert result["loss_before"] > 3.0  # the base model does not know the format
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert result["valid"]
    assert result["peft_max_abs_diff"] <= 1e-4
    assert result["merged_max_abs_diff"] <= 5e-3  # float32 rounding of W + dW over 30 layers (logits ~ 20)
    assert result["roundtrip_identical"]
    assert result["gguf_identical"]
    assert result["merged_disk_max_abs_diff"] <= 5e-3
    assert result["onnx_max_abs_diff"] is not None and result["onnx_max_abs_diff"] <= 1e-3
    bench = result["bench"]
    assert 0 < bench["adapter_bytes"] < 0.05 * bench["base_bytes"]
    assert bench["base_ms"] > 0 and bench["unmerged_ms"] > 0 and bench["merged_ms"] > 0
    assert bench["spread_percent"] >= 0
    assert len(result["training_losses"]) == 10
    assert any(line.startswith("Before training") for line in lines)
    assert any(line.startswith("After training") for line in lines)


@pytest.mark.slow
def test_demo_outputs_are_complete_folders(demo_run):
    result, _ = demo_run
    out = result["out_dir"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "gguf", "merged", "onnx", "peft", "roundtrip"]
    manifest = json.loads((out / "adapter" / "adapter.json").read_text())
    training = manifest["provenance"]["training"]
    assert training["steps"] == 10 and training["loss_after"] < training["loss_before"]
    assert manifest["base_model"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["task"] == "causal-lm"
    assert (out / "peft" / "adapter_config.json").is_file()
    assert (out / "roundtrip" / "adapter.json").is_file()
    assert (out / "gguf" / "adapter.gguf").is_file()
    assert (out / "merged" / "config.json").is_file() and any((out / "merged").glob("*.safetensors"))
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "export.json").is_file()


@pytest.mark.slow
def test_cli_prints_inspect_and_fails_on_a_failed_check(demo_run, monkeypatch):
    result, _ = demo_run
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: result)
    ok = CliRunner().invoke(cli, ["demo"])
    assert ok.exit_code == 0, ok.output
    assert "adapterkit inspect" in ok.output and "lora" in ok.output and "SmolLM2-135M" in ok.output
    failed = {**result, "checks": {**result["checks"], "round trip identical": False}}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: failed)
    bad = CliRunner().invoke(cli, ["demo"])
    assert bad.exit_code == 1
    assert "round trip identical" in bad.output
