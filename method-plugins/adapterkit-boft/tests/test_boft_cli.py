"""Every adapterkit command works with the installed adapterkit-boft (CLI smoke, in process and as `python -m adapterkit`)."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from boft_helpers import set_fbd

CONFIG = {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama base with a tokenizer, and saved BOFT adapters (1 and 2 butterfly factors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = set_fbd(False)
    root = tmp_path_factory.mktemp("boftcli")
    base = save_tiny_base("llama", root / "base", tokenizer=True)
    adapters = {}
    for factors in (1, 2):
        handle = adapterkit.inject(TINY_MODELS["llama"](0), "boft", {**CONFIG, "boft_n_butterfly_factor": factors})
        perturb(handle.parameters(), seed=4, scale=0.2)
        adapters[factors] = adapterkit.save(handle.to_adapter(), root / f"boft-{factors}")
    yield root, base, adapters
    set_fbd(previous)
    torch.set_num_threads(threads)


def cli(*args: str):
    """``python -m adapterkit ARGS``; ``.output`` is stdout and stderr together."""
    result = run_cli(*args)
    result.output = result.stdout + result.stderr
    return result


def applied(adapter) -> torch.Tensor:
    return outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["llama"](0)), sample_inputs())


def test_plugins_lists_boft():
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.output
    entry = next(e for e in json.loads(result.stdout) if e["name"] == "boft")
    assert entry["distribution"] == "adapterkit-boft" and entry["version"] == "0.2.0" and entry["errors"] == []
    assert entry["methods"] == ["boft"] and entry["codecs"] == ["peft:BOFT"]
    assert entry["method_capabilities"]["boft"]["capabilities"] == ["MergedWeight"]
    assert entry["method_capabilities"]["boft"]["merge"] is True


def test_validate_and_inspect(work):
    _, base, adapters = work
    result = cli("validate", str(adapters[2]), "--base", str(base))
    assert result.returncode == 0 and "(adapterkit, boft)" in result.stdout, result.output
    info = json.loads(cli("inspect", str(adapters[2]), "--json").stdout)
    # per layer: q_proj and v_proj (in 32: R 2x8x4x4, s 32 / 16), down_proj (in 64: R 2x16x4x4, s 32)
    assert info["method"] == "boft" and info["parameters"] == 2 * (256 + 32 + 256 + 16 + 512 + 32)
    for field, value in (("boft_block_num", 8), ("boft_block_size", 3), ("boft_blok_size", 4)):
        bad = json.loads((adapters[2] / "adapter.json").read_text())
        bad["method"]["config"][field] = value  # down_proj's 16 blocks / 3 does not divide 32 / a typo
        tampered = adapters[2].parent / f"tampered-{field}-{value}"
        tampered.mkdir()
        for file in adapters[2].iterdir():
            (tampered / file.name).write_bytes(file.read_bytes())
        (tampered / "adapter.json").write_text(json.dumps(bad))
        result = cli("validate", str(tampered))
        assert result.returncode == 1 and field in result.stdout, result.output


def test_convert_to_peft_and_back(work):
    root, base, adapters = work
    out = root / "peft"
    result = cli("convert", str(adapters[1]), str(out), "--to", "peft")
    assert result.returncode == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_block_size"] == 4 and config["boft_n_butterfly_factor"] == 1
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(out)).eval(), sample_inputs())
    assert (theirs - applied(adapters[1])).abs().max().item() <= 1e-5
    back = root / "back"
    result = cli("convert", str(out), str(back), "--to", "adapterkit")  # the tensors give the shapes: no --base
    assert result.returncode == 0, result.output
    one, two = adapterkit.load(adapters[1]), adapterkit.load(back)
    assert one.targets == two.targets
    assert all(one.tensors[k].tobytes() == two.tensors[k].tobytes() for k in one.tensors)


def test_merge(work):
    from transformers import AutoModelForCausalLM

    root, base, adapters = work
    out = root / "merged"
    result = cli("merge", str(adapters[2]), "--base", str(base), "-o", str(out))
    assert result.returncode == 0, result.output
    got = outputs(AutoModelForCausalLM.from_pretrained(out).eval(), sample_inputs())
    assert (got - applied(adapters[2])).abs().max().item() <= 1e-5


def test_train(work, tmp_path):
    _, base, _ = work
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = cli("train", "--base", str(base), "--method", "boft", "--data", str(data), "-o", str(out),
                     "--targets", "q_proj,v_proj", "--config", "boft_block_size=8", "--config", "boft_n_butterfly_factor=2",
                     "--config", "boft_dropout=0.25", "--max-steps", "2", "--batch-size", "4", "--lr", "0.05",
                     "--max-length", "16", "--json")
    assert result.returncode == 0, result.output
    trained = adapterkit.load(out)
    target = trained.targets["model.layers.0.self_attn.q_proj"]
    assert trained.method == "boft" and (target["block_size"], target["block_num"], target["n_butterfly_factor"]) == (8, 4, 2)
    assert any(np.any(v != 0) for k, v in trained.tensors.items() if k.endswith(".boft.R"))
    assert cli("validate", str(out), "--base", str(base)).returncode == 0


def test_bad_peft_config_is_one_line_and_exit_1(work):
    root, _, _ = work
    folder = root / "peft-bias"
    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"],
                                                                         bias="boft_only"))
    model.save_pretrained(folder)
    result = cli("convert", str(folder), str(root / "never"), "--to", "adapterkit")
    assert result.returncode == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "$.bias" in lines[0] and "Traceback" not in lines[0], lines
    assert not (root / "never").exists()
