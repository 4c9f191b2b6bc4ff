"""Every adapterkit command works with the installed adapterkit-vera as with a built-in method (subprocess
``python -m adapterkit``, the installed plugins as a user sees them)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from vera_helpers import CONFIGS


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama base (with a tokenizer), an adapterkit VeRA adapter and PEFT's own VeRA folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("veracli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "vera", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=0.5)
    adapter = adapterkit.save(handle.to_adapter(), root / "vera")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        perturb([p for p in model.parameters() if p.requires_grad], seed=2, scale=0.3)
        model.save_pretrained(root / "peft")
    yield root, base, adapter, root / "peft"
    torch.set_num_threads(threads)


def test_plugins_lists_vera():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    vera = entries["vera"]
    assert vera["distribution"] == "adapterkit-vera" and vera["module"] == "adapterkit_vera" and vera["errors"] == []
    assert vera["methods"] == ["vera"] and vera["codecs"] == ["peft:VERA"]
    caps = vera["method_capabilities"]["vera"]
    assert caps["capabilities"] == ["LowRank", "DeltaWeight"] and caps["merge"] and caps["adapter_pool"]
    assert "svd" in caps["compose"]
    assert run_cli("schema", "--method", "vera").returncode == 0


def test_validate_inspect_convert_merge(work):
    root, base, adapter, _ = work
    result = run_cli("validate", str(adapter), "--base", str(base))
    assert result.returncode == 0 and "(adapterkit, vera)" in result.stdout, result.stdout + result.stderr
    result = run_cli("validate", str(adapter), "--target", "vllm", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["valid"], result.stdout + result.stderr
    result = run_cli("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # 2 layers x (q [32], v [16], down [32] lambda_b + 3 x lambda_d [8]) + A [8, 64] + B [32, 8]
    assert info["method"] == "vera" and info["parameters"] == 2 * (32 + 16 + 32 + 3 * 8) + 8 * 64 + 32 * 8
    peft_dir = root / "to-peft"
    result = run_cli("convert", str(adapter), str(peft_dir), "--to", "peft")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "VERA"
    inputs = sample_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(peft_dir)).eval(), inputs)
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), inputs)
    assert (theirs - ours).abs().max().item() <= 1e-5
    result = run_cli("validate", str(peft_dir), "--base", str(base))
    assert result.returncode == 0 and "(peft, vera)" in result.stdout, result.stdout + result.stderr
    merged = root / "merged"
    result = run_cli("merge", str(adapter), "--base", str(base), "-o", str(merged))
    assert result.returncode == 0, result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    got = outputs(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), inputs)
    assert (got - ours).abs().max().item() <= 1e-5


def test_peft_folder_converts_and_composes(work):
    root, base, _, peft_dir = work
    native = root / "from-peft"
    result = run_cli("convert", str(peft_dir), str(native), "--to", "adapterkit", "--base", str(base))
    assert result.returncode == 0, result.stdout + result.stderr
    assert adapterkit.load(native).method == "vera"
    result = run_cli("validate", str(peft_dir))
    assert result.returncode == 1 and "base model is needed" in result.stdout
    composed = root / "composed"
    result = run_cli("compose", str(native), str(native), "-o", str(composed), "--strategy", "svd", "--rank", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert adapterkit.load(composed).method == "lora"
    lowered = root / "lowered"
    result = run_cli("to-lora", str(native), str(lowered))
    assert result.returncode == 0, result.stdout + result.stderr
    assert adapterkit.load(lowered).method == "lora"


def test_a_peft_field_vera_cannot_hold_is_one_line_and_exit_1(work):
    root, base, _, peft_dir = work
    bad = root / "bad-peft"
    bad.mkdir()
    for file in peft_dir.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    config["bias"] = "all"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("convert", str(bad), str(root / "bad-out"), "--to", "adapterkit", "--base", str(base))
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "bias" in result.stdout + result.stderr


def test_train(work, tmp_path):
    _, base, _, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = run_cli("train", "--base", str(base), "--method", "vera", "--data", str(data), "-o", str(out),
                     "--rank", "8", "--targets", "q_proj,v_proj", "--config", "vera_dropout=0.05",
                     "--max-steps", "2", "--batch-size", "4", "--lr", "0.05", "--max-length", "16", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = adapterkit.load(out)
    assert trained.method == "vera" and trained.config["vera_dropout"] == 0.05
    assert any(np.any(v != 0) for k, v in trained.tensors.items() if k.endswith("lambda_b"))  # lambda_b left zero
    assert run_cli("validate", str(out), "--base", str(base)).returncode == 0
    result = run_cli("train", "--base", str(base), "--method", "vera", "--data", str(data), "-o", str(tmp_path / "x"),
                     "--dropout", "0.1", "--max-steps", "1")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
