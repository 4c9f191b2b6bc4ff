"""PEFT interop of the LOHA codec against PEFT 0.21 itself: the kit's four checks, plus layout, config and refusals.

GPT-2 is not among the PEFT kinds: PEFT 0.21's LoHa has no transformers Conv1D layer
(``LoHaModel.layers_mapping`` is nn.Conv2d, nn.Conv1d, nn.Linear; get_peft_model raises TypeError),
so a GPT-2 LoHa is refused for the peft format (tested below) and covered by the conformance kit only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, PeftInterop, outputs, perturb, sample_inputs, save_tiny_base

import peft
import torch

#: adapterkit loha configs (the same as test_loha_conformance's), the PEFT configs below say the same
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "gpt2": {"r": 4, "alpha": 6, "target_modules": ["c_attn", "mlp.c_proj"], "rank_pattern": {"c_proj": 3}},
    "bert": {"r": 3, "alpha": 5, "target_modules": ["query", "value", "output.dense"],
             "alpha_pattern": {"value": 2}},
}

PEFT_CONFIGS = {
    "llama": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM"),
    "bert": lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=["query", "value", "output.dense"],
                                    alpha_pattern={"value": 2}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="peft")
    yield
    torch.set_num_threads(threads)


class TestLohaPeft(PeftInterop):
    method = "loha"
    peft_configs = PEFT_CONFIGS
    configs = {"llama": CONFIGS["llama"], "bert": CONFIGS["bert"]}


class TestLohaPeftLayers(PeftInterop):
    """layers_to_transform with layers_pattern, a regex with exclude_modules, init_weights false and the dropouts."""

    method = "loha"
    peft_configs = {
        "llama": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1],
                                         layers_pattern="layers", init_weights=False, rank_dropout=0.1,
                                         module_dropout=0.2),
        "bert": lambda: peft.LoHaConfig(r=2, target_modules=r".*attention\.(self\.key|output\.dense)",
                                        exclude_modules=["layer.0.attention.output.dense"], use_effective_conv2d=True),
    }


def peft_written(kind: str, folder: Path, seed: int = 5):
    model = peft.get_peft_model(TINY_MODELS[kind](0), PEFT_CONFIGS[kind]())
    perturb([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.3)
    model.eval().save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_parity_numbers_and_reading_without_base(kind, tmp_path):
    """PEFT's folder read with no base (the factors give the shapes): same logits, same targets as with a base."""
    folder, model = peft_written(kind, tmp_path / "peft")
    adapter = adapterkit.load(folder)
    assert adapter.method == "loha" and all(t["kind"] == "linear" for t in adapter.targets.values())
    inputs = sample_inputs()
    theirs = outputs(model, inputs)
    ours = outputs(adapterkit.apply(adapter, TINY_MODELS[kind](0)), inputs)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{kind}: PEFT -> ours max abs logit diff {diff:.3g}")
    assert diff <= 1e-5
    base = outputs(TINY_MODELS[kind](0), inputs)
    assert ((ours - base).abs().max() / base.abs().max()).item() > 0.005, "the update barely changes the logits"
    base_dir = save_tiny_base(kind, tmp_path / "base")
    assert adapterkit.load(folder, base=base_dir).targets == adapter.targets
    assert adapterkit.validate(folder).valid
    # per-module r and alpha from the patterns, recorded in the targets
    rs = {m.rsplit(".", 1)[-1]: (t["r"], t["alpha"]) for m, t in adapter.targets.items()}
    if kind == "llama":
        assert rs == {"q_proj": (4, 8), "v_proj": (4, 3), "down_proj": (2, 8)}
    # the numpy delta (merge, to-lora) equals PEFT's get_delta_weight
    method = adapterkit.default_registry().method("loha")
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.loha.layer.LoHaLayer):
            path = name.removeprefix("base_model.model.")
            tensors = {k.rsplit(".", 1)[-1]: v for k, v in adapter.tensors.items() if k.startswith(f"{path}.loha.")}
            delta = method.delta_weight(path, adapter.targets[path], adapter.config, tensors)
            np.testing.assert_allclose(delta, module.get_delta_weight("default").detach().numpy(), atol=1e-6, rtol=0)


def test_config_round_trip_is_peft_s_own(tmp_path):
    folder, _ = peft_written("llama", tmp_path / "peft")
    back = adapterkit.save(adapterkit.load(folder), tmp_path / "back", format="peft")
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads((folder / "adapter_config.json").read_text())
    from safetensors.numpy import load_file

    theirs, ours = load_file(folder / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(theirs[k].tobytes() == ours[k].tobytes() for k in theirs)


def test_adapterkit_made_config_loads_as_lohaconfig(tmp_path):
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "loha", {**CONFIGS["llama"], "rank_dropout": 0.25, "module_dropout": 0.1})
    out = adapterkit.save(handle.to_adapter(), tmp_path / "ours", format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 4 and config["alpha"] == 8
    assert config["rank_pattern"] == {"down_proj": 2} and config["alpha_pattern"] == {"v_proj": 3}
    assert config["rank_dropout"] == 0.25 and config["module_dropout"] == 0.1 and config["modules_to_save"] is None
    loaded = peft.PeftConfig.from_pretrained(str(out))
    assert isinstance(loaded, peft.LoHaConfig)
    from safetensors.numpy import load_file

    keys = sorted(load_file(out / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.mlp.down_proj.hada_w1_a" and len(keys) == 4 * 6
    assert np.all(load_file(out / "adapter_model.safetensors")[keys[3]] == 0), "w2_b starts at zeros, as PEFT's"


def test_training_forward_matches_peft_dropouts(tmp_path):
    """In training mode, rank_dropout and module_dropout draw as PEFT does: same seed, same logits."""
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_dropout=0.3, module_dropout=0.4)
    model = peft.get_peft_model(TINY_MODELS["llama"](0), config)
    perturb([p for p in model.parameters() if p.requires_grad], seed=3, scale=0.3)
    model.save_pretrained(tmp_path / "peft")
    ours = adapterkit.apply(adapterkit.load(tmp_path / "peft"), TINY_MODELS["llama"](0))
    inputs = sample_inputs()
    model.train()
    ours.train()
    for seed in range(4):
        torch.manual_seed(seed)
        theirs = outputs(model, inputs)
        torch.manual_seed(seed)
        mine = outputs(ours, inputs)
        assert (theirs - mine).abs().max().item() <= 1e-5, seed
    ours.eval()
    torch.manual_seed(0)
    assert not torch.equal(outputs(ours, inputs), mine)


def test_gpt2_conv1d_is_refused_for_peft(tmp_path):
    with pytest.raises(TypeError, match="Conv1D"):  # PEFT itself: no LoHa for transformers Conv1D
        peft.get_peft_model(TINY_MODELS["gpt2"](0), peft.LoHaConfig(r=2, target_modules=["c_attn"]))
    adapter = adapterkit.inject(TINY_MODELS["gpt2"](0), "loha", CONFIGS["gpt2"]).to_adapter()
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D") as info:
        adapterkit.save(adapter, tmp_path / "x", format="peft")
    assert "PEFT could not load it" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_what_loha_cannot_hold_is_refused(tmp_path):
    # modules_to_save (a sequence classifier's head)
    config = peft.LoHaConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft.get_peft_model(TINY_MODELS["bert"](0), config).save_pretrained(tmp_path / "cls")
    with pytest.raises(adapterkit.LossyConversionError, match="modules_to_save") as info:
        adapterkit.load(tmp_path / "cls")
    assert info.value.location == "$.modules_to_save"
    folder, _ = peft_written("llama", tmp_path / "peft")
    # an unknown field with a value, in the config
    config_file = folder / "adapter_config.json"
    original = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(original), "use_fancy_mode": True}))
    with pytest.raises(adapterkit.LossyConversionError, match="use_fancy_mode"):
        adapterkit.load(folder)
    # a rank that disagrees with the factors
    config_file.write_text(json.dumps({**json.loads(original), "rank_pattern": {}}))
    with pytest.raises(adapterkit.FormatError, match="rank"):
        adapterkit.load(folder)
    config_file.write_text(original)
    # a convolution LoHa's Tucker core (use_effective_conv2d on a Conv2d)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(iter(tensors))
    save_file({**tensors, key.rsplit(".", 1)[0] + ".hada_t1": np.zeros((4, 4, 3, 3), np.float32)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(adapterkit.LossyConversionError, match="effective-conv"):
        adapterkit.load(folder)
    # with a base that is not the one: the module's shape is checked
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(adapterkit.BaseModelError):
        adapterkit.load(folder, base=TINY_MODELS["bert"](0))


def test_peft_version_writes_what_the_release_knows_and_refuses_a_release_before_loha(tmp_path):
    """(The real releases load it: tests/test_peft_versions_methods.py in the adapterkit repository.)"""
    folder, _ = peft_written("llama", tmp_path / "peft")
    adapter = adapterkit.load(folder)
    adapterkit.save(adapter, tmp_path / "0.13", format="peft", peft_version="0.13.2")
    config = json.loads((tmp_path / "0.13" / "adapter_config.json").read_text())
    assert "exclude_modules" not in config and "peft_version" not in config  # 0.14.0's and 0.18.0's fields
    assert adapterkit.load(tmp_path / "0.13").tensors.keys() == adapter.tensors.keys()
    with pytest.raises(adapterkit.LossyConversionError, match="LOHA adapters came with PEFT 0.6.0"):
        adapterkit.save(adapter, tmp_path / "old", format="peft", peft_version="0.5.0")
    assert not (tmp_path / "old").exists()


@pytest.mark.parametrize("kind,config", [
    ("llama", {"target_modules": ["o_proj", "gate_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["k_proj"]}),
    ("bert", {"target_modules": r".*attention\.(self\.key|output\.dense)", "layers_to_transform": [0]}),
    ("bert", {"target_modules": ["dense"], "layers_to_transform": 1}),
])
def test_injection_selects_what_peft_selects(kind, config):
    ours = adapterkit.inject(TINY_MODELS[kind](0), "loha", config).targets
    model = peft.get_peft_model(TINY_MODELS[kind](0), peft.LoHaConfig(r=2, **config))
    theirs = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
              if isinstance(m, peft.tuners.loha.layer.LoHaLayer)}
    assert set(ours) == theirs
