"""The adapterkit commands, run as a user runs them (``python -m adapterkit`` in a subprocess), on LoHa adapters."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

import torch

#: adapterkit loha configs per tiny model: rank and alpha patterns, so targets carry different r / alpha
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "gpt2": {"r": 4, "alpha": 6, "target_modules": ["c_attn", "mlp.c_proj"], "rank_pattern": {"c_proj": 3}},
    "bert": {"r": 3, "alpha": 5, "target_modules": ["query", "value", "output.dense"],
             "alpha_pattern": {"value": 2}},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lohacli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "loha", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=0.3)
    adapter = adapterkit.save(handle.to_adapter(), root / "loha")
    yield root, base, adapter
    torch.set_num_threads(threads)


def test_plugins_validate_inspect(work):
    root, base, adapter = work
    listed = {e["name"]: e for e in json.loads(run_cli("plugins", "--json").stdout)}
    assert listed["loha"]["codecs"] == ["peft:LOHA", "kohya:LOHA"] and listed["loha"]["errors"] == []
    assert listed["loha"]["method_capabilities"]["loha"]["capabilities"] == ["DeltaWeight"]
    result = run_cli("validate", str(adapter), "--base", str(base))
    assert result.returncode == 0 and "(adapterkit, loha)" in result.stdout, result.stdout + result.stderr
    result = run_cli("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # q_proj [32, 32] r4, v_proj [16, 32] r4, down_proj [32, 64] r2, on 2 layers
    assert info["method"] == "loha" and info["parameters"] == 2 * 2 * (4 * 64 + 4 * 48 + 2 * 96)


def test_convert_to_peft_and_merge(work):
    root, base, adapter = work
    result = run_cli("convert", str(adapter), str(root / "peft"), "--to", "peft")
    assert result.returncode == 0, result.stdout + result.stderr
    import peft

    inputs = sample_inputs()
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), inputs)
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(root / "peft")).eval(), inputs)
    assert (ours - theirs).abs().max().item() <= 1e-5
    result = run_cli("merge", str(root / "peft"), "--base", str(base), "-o", str(root / "merged"))
    assert result.returncode == 0, result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    merged = outputs(AutoModelForCausalLM.from_pretrained(root / "merged").eval(), inputs)
    assert (merged - ours).abs().max().item() <= 1e-5


def test_train_two_steps(work, tmp_path):
    _, base, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = run_cli("train", "--base", str(base), "--method", "loha", "--data", str(data), "-o", str(out),
                     "--targets", "q_proj,v_proj", "--rank", "2", "--config", "rank_dropout=0.1",
                     "--max-steps", "2", "--batch-size", "4", "--lr", "0.05", "--max-length", "16", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = adapterkit.load(out)
    assert trained.method == "loha" and trained.config["rank_dropout"] == 0.1
    assert any(np.any(v != 0) for k, v in trained.tensors.items() if k.endswith(".w2_b")), "w2_b did not train"
    assert run_cli("validate", str(out), "--base", str(base)).returncode == 0


def test_a_peft_field_loha_cannot_hold_is_one_line_exit_1(work, tmp_path):
    root, base, adapter = work
    folder = root / "peft"
    if not folder.exists():
        assert run_cli("convert", str(adapter), str(folder), "--to", "peft").returncode == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    (bad / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    for args in (["validate", str(bad)], ["convert", str(bad), str(tmp_path / "out"), "--to", "adapterkit"]):
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert any("modules_to_save" in line for line in lines) and "Traceback" not in result.stderr, lines
    result = run_cli("convert", str(bad), str(tmp_path / "out2"), "--to", "adapterkit")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "modules_to_save" in lines[0], lines
    assert not (tmp_path / "out").exists()
