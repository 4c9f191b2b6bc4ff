"""The adapterkit CLI with the installed adapterkit-oft, run as a user runs it (``python -m adapterkit``)."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from oft_helpers import CONFIGS, NOISE


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama base (with a tokenizer) and a saved OFT adapter (adapterkit format)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("oftcli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "oft", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=NOISE)
    adapter = adapterkit.save(handle.to_adapter(), root / "oft")
    yield root, base, adapter
    torch.set_num_threads(threads)


def test_plugins_validate_inspect(work):
    _, base, adapter = work
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    entry = next(e for e in json.loads(result.stdout) if e["name"] == "oft")
    assert entry["methods"] == ["oft"] and entry["codecs"] == ["peft:OFT"] and entry["errors"] == []
    assert entry["method_capabilities"]["oft"]["capabilities"] == ["MergedWeight"]
    result = run_cli("validate", str(adapter), "--base", str(base))
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr
    result = run_cli("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # q_proj, v_proj: 4 blocks of 8 (28 each); down_proj: 8 blocks of 8; two layers
    assert info["method"] == "oft" and info["parameters"] == 2 * (4 * 28 + 4 * 28 + 8 * 28)


def test_convert_to_peft_and_merge(work):
    root, base, adapter = work
    out = root / "peft"
    result = run_cli("convert", str(adapter), str(out), "--to", "peft")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "OFT"
    inputs = sample_inputs()
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), inputs)
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(out)).eval(), inputs)
    assert (ours - theirs).abs().max().item() <= 1e-5
    result = run_cli("validate", str(out))  # PEFT's folder does not give the output sizes
    assert result.returncode == 1 and "base model is needed" in result.stdout + result.stderr
    assert run_cli("validate", str(out), "--base", str(base)).returncode == 0
    merged = root / "merged"
    result = run_cli("merge", str(out), "--base", str(base), "-o", str(merged))
    assert result.returncode == 0, result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    got = outputs(AutoModelForCausalLM.from_pretrained(merged).eval(), inputs)
    assert (got - ours).abs().max().item() <= 1e-5


def test_train(work, tmp_path):
    _, base, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = run_cli("train", "--base", str(base), "--method", "oft", "--data", str(data), "-o", str(out),
                     "--targets", "q_proj,v_proj", "--config", "oft_block_size=8", "--config", "coft=true",
                     "--max-steps", "2", "--batch-size", "4", "--lr", "0.01", "--max-length", "16", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = adapterkit.load(out)
    assert trained.method == "oft" and trained.config["coft"] is True
    assert any(np.any(v != 0) for v in trained.tensors.values())  # started at the identity, moved
    assert trained.targets["model.layers.0.self_attn.q_proj"]["block_size"] == 8


def test_bad_peft_config_is_one_line_exit_1(work):
    root, base, adapter = work
    out = root / "peft-bad"
    assert run_cli("convert", str(adapter), str(out), "--to", "peft").returncode == 0
    config = json.loads((out / "adapter_config.json").read_text())
    config["bias"] = "oft_only"
    (out / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("convert", str(out), str(root / "back"), "--from", "peft", "--to", "adapterkit",
                     "--base", str(base))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bias" in result.stderr and "Traceback" not in result.stderr
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{n} and {n}"}) + "\n" for n in range(8)))
    result = run_cli("train", "--base", str(base), "--method", "oft", "--data", str(data), "-o",
                     str(root / "x"), "--targets", "q_proj", "--config", "r=4", "--config", "oft_block_size=8")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "$.method.config.r" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
