"""`python -m adapterkit` with the installed adapterkit-lokr, as a user runs it (subprocesses)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from lokr_helpers import CONFIGS


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama base (with a tokenizer) and a saved LoKr adapter of it, made once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lokrcli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "lokr", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=0.3)
    adapter = adapterkit.save(handle.to_adapter(), root / "lokr")
    yield root, base, adapter
    torch.set_num_threads(threads)


def test_plugins_lists_lokr():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    entry = next(e for e in json.loads(result.stdout) if e["name"] == "lokr")
    assert entry["distribution"] == "adapterkit-lokr" and entry["module"] == "adapterkit_lokr"
    assert entry["methods"] == ["lokr"] and entry["codecs"] == ["peft:LOKR", "kohya:LOKR"] and entry["errors"] == []
    assert entry["method_capabilities"]["lokr"]["capabilities"] == ["DeltaWeight"]
    assert entry["method_capabilities"]["lokr"]["merge"] is True


def test_validate_inspect_convert_merge(work):
    root, base, adapter = work
    result = run_cli("validate", str(adapter), "--base", str(base))
    assert result.returncode == 0 and "(adapterkit, lokr)" in result.stdout, result.stdout + result.stderr
    result = run_cli("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    expected = sum(int(np.prod(v.shape)) for v in adapterkit.load(adapter).tensors.values())
    assert info["method"] == "lokr" and info["parameters"] == expected
    # to PEFT and back
    result = run_cli("convert", str(adapter), str(root / "peft"), "--to", "peft")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    import peft

    inputs = sample_inputs()
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(root / "peft")).eval(), inputs)
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), inputs)
    assert (theirs - ours).abs().max().item() <= 1e-5
    result = run_cli("validate", str(root / "peft"))  # no base needed
    assert result.returncode == 0 and "(peft, lokr)" in result.stdout, result.stdout + result.stderr
    # merge: a full model folder whose logits are the adapted model's
    result = run_cli("merge", str(adapter), "--base", str(base), "-o", str(root / "merged"))
    assert result.returncode == 0, result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    merged = outputs(AutoModelForCausalLM.from_pretrained(root / "merged").eval(), inputs)
    assert (merged - ours).abs().max().item() <= 1e-5


def test_train(work, tmp_path):
    _, base, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = run_cli("train", "--base", str(base), "--method", "lokr", "--data", str(data), "-o", str(out),
                     "--targets", "q_proj,v_proj", "--rank", "1", "--config", "decompose_both=true",
                     "--config", "init_weights=false", "--max-steps", "2", "--batch-size", "4", "--max-length", "16",
                     "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = adapterkit.load(out)
    assert trained.method == "lokr" and trained.config["decompose_both"] is True
    assert trained.targets["model.layers.0.self_attn.q_proj"]["w1_full"] is False
    assert run_cli("validate", str(out), "--base", str(base)).returncode == 0


def test_bad_input_is_one_line_naming_the_field(work, tmp_path):
    root, base, _ = work
    import peft

    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.LoKrConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    result = run_cli("convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--to", "adapterkit")
    assert result.returncode == 1 and "modules_to_save" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "out").exists()
    config_file.write_text(json.dumps({**config, "decompose_factor": "four"}))
    result = run_cli("validate", str(tmp_path / "peft"))
    assert result.returncode == 1 and "decompose_factor" in result.stdout + result.stderr
    # an unknown option of our own config
    result = run_cli("train", "--base", str(base), "--method", "lokr", "--data", str(config_file), "-o",
                     str(tmp_path / "t"), "--config", "decompose=true")
    text = result.stdout + result.stderr
    assert result.returncode == 1 and "decompose" in text and "Traceback" not in text
