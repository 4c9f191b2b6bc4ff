"""Every adapterkit command works with the installed adapterkit-adalora (subprocess: the CLI a user runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from adalora_helpers import CONFIGS, peft_config


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adaloracli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "adalora", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=0.3)
    adapter = adapterkit.save(handle.to_adapter(), root / "adalora")
    yield root, base, adapter
    torch.set_num_threads(threads)


def test_plugins_lists_adalora():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    entry = next(e for e in json.loads(result.stdout) if e["name"] == "adalora")
    assert entry["distribution"] == "adapterkit-adalora" and entry["codecs"] == ["peft:ADALORA"] and not entry["errors"]
    caps = entry["method_capabilities"]["adalora"]
    assert caps["capabilities"] == ["LowRank", "DeltaWeight", "TrainingHooks"] and caps["adapter_pool"] and caps["merge"]


def test_validate_inspect_convert_merge(work):
    root, base, adapter = work
    result = run_cli("validate", str(adapter), "--base", str(base))
    assert result.returncode == 0 and "adalora" in result.stdout, result.stdout + result.stderr
    info = json.loads(run_cli("inspect", str(adapter), "--json").stdout)
    assert info["method"] == "adalora"
    out = root / "peft"
    result = run_cli("convert", str(adapter), str(out), "--to", "peft")
    assert result.returncode == 0, result.stdout + result.stderr
    import peft

    inputs = sample_inputs()
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), inputs)
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(out)).eval(), inputs)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert run_cli("validate", str(out)).returncode == 0  # no --base needed
    merged = root / "merged"
    result = run_cli("merge", str(adapter), "--base", str(base), "-o", str(merged))
    assert result.returncode == 0, result.stdout + result.stderr
    from transformers import AutoModelForCausalLM

    got = outputs(AutoModelForCausalLM.from_pretrained(merged).eval(), inputs)
    assert (got - ours).abs().max().item() <= 1e-5


def test_train_runs_the_budget_schedule(work, tmp_path):
    _, base, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = run_cli("train", "--base", str(base), "--method", "adalora", "--data", str(data), "-o", str(out),
                     "--targets", "q_proj,v_proj", "--config", "init_r=4", "--config", "target_r=1",
                     "--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--max-length", "16", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    trained = adapterkit.load(out)
    assert trained.method == "adalora" and trained.config["total_step"] == 3  # the trainer's steps, recorded
    # the last step masks to the target budget: one singular value kept per module on average
    kept = sum(int(np.count_nonzero(v)) for k, v in trained.tensors.items() if k.endswith(".E"))
    assert kept <= len(trained.targets)
    assert run_cli("convert", str(out), str(tmp_path / "p"), "--to", "peft").returncode == 0


def test_bad_peft_config_is_one_line_exit_1(tmp_path):
    import peft

    folder = tmp_path / "peft"
    peft.get_peft_model(TINY_MODELS["llama"](0), peft_config("llama")).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "bias": "lora_only"}))
    result = run_cli("validate", str(folder))
    assert result.returncode == 1 and "bias" in result.stdout and "Traceback" not in result.stderr
    out = tmp_path / "out"
    result = run_cli("convert", str(folder), str(out), "--to", "adapterkit")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "bias" in lines[0], lines
    assert not out.exists()
