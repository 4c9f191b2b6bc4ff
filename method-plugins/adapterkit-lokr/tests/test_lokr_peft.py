"""The plugin's PEFT LOKR codec against PEFT 0.21.2 itself (adapterkit.testing.PeftInterop), plus what it refuses.

GPT-2 is left out of the PEFT runs: PEFT's LoKr has no transformers Conv1D support
(``get_peft_model`` raises TypeError "Target module of type Conv1D not supported"); writing a
GPT-2 LoKr adapter as a PEFT folder is refused, which a test below checks.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, PeftInterop, outputs, perturb, sample_inputs

from lokr_helpers import CONFIGS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="peft")
    yield
    torch.set_num_threads(threads)


class TestLokrPeft(PeftInterop):
    """Full W1 / W2, low-rank W2 (rank_pattern), alpha_pattern; BERT with a decompose_factor."""

    method = "lokr"
    peft_configs = {
        "llama": lambda: peft.LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
                                         rank_pattern={"down_proj": 2, "up_proj": 1}, alpha_pattern={"v_proj": 3}),
        "bert": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["query", "value", "dense"], decompose_factor=4,
                                        exclude_modules=["pooler.dense"]),
    }
    configs = {"llama": CONFIGS["llama"], "bert": CONFIGS["bert"]}


class TestLokrPeftDecomposeBoth(PeftInterop):
    """decompose_both (w1_a @ w1_b), layers_to_transform, init_weights "lycoris" (zero parts randomised)."""

    method = "lokr"
    peft_configs = {
        "llama": lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True, init_weights="lycoris",
                                         target_modules=["k_proj", "o_proj", "gate_proj"], layers_to_transform=[1],
                                         rank_dropout=0.1, module_dropout=0.1, rank_dropout_scale=True),
    }


def test_peft_layouts_are_exercised(tmp_path):
    """The PEFT folders above hold every kind of tensor: w1, w1_a/w1_b, w2, w2_a/w2_b."""
    leaves = set()
    for config in (TestLokrPeft.peft_configs["llama"](), TestLokrPeftDecomposeBoth.peft_configs["llama"]()):
        model = peft.get_peft_model(TINY_MODELS["llama"](0), config)
        leaves |= {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert leaves == {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def test_peft_has_no_conv1d_lokr_and_gpt2_is_refused_when_writing(tmp_path):
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(TINY_MODELS["gpt2"](0), peft.LoKrConfig(r=2, target_modules=["c_attn"]))
    model = TINY_MODELS["gpt2"](0)
    handle = adapterkit.inject(model, "lokr", CONFIGS["gpt2"])
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D"):
        adapterkit.save(handle.to_adapter(), tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def _peft_folder(tmp_path, **config):
    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.LoKrConfig(**{"r": 2, "target_modules": ["q_proj"],
                                                                           **config}))
    perturb([p for p in model.parameters() if p.requires_grad], seed=1)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", model


def test_read_needs_no_base_and_records_the_layout(tmp_path):
    folder, model = _peft_folder(tmp_path, decompose_both=True, r=1, alpha=3)
    adapter = adapterkit.load(folder)
    target = adapter.targets["model.layers.0.self_attn.q_proj"]
    assert target == {"kind": "linear", "shape": [32, 32], "r": 1, "alpha": 3, "out_factors": [4, 8],
                      "in_factors": [4, 8], "w1_full": False, "w2_full": False}
    assert sorted(k.rsplit(".", 1)[-1] for k in adapter.tensors if ".0.self_attn" in k) == ["w1_a", "w1_b", "w2_a",
                                                                                            "w2_b"]
    peft_delta = model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach().numpy()
    method = adapterkit.default_registry().method("lokr")
    prefix = "model.layers.0.self_attn.q_proj.lokr."
    ours = method.delta_weight("model.layers.0.self_attn.q_proj", target, adapter.config,
                               {k[len(prefix):]: v for k, v in adapter.tensors.items() if k.startswith(prefix)})
    assert np.abs(ours - peft_delta).max() <= 1e-6
    assert adapterkit.validate(folder).valid


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fields, message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_magic": True}, "use_magic"),
    ({"rank_dropout": 2.0}, "rank_dropout"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"r": 4}, "rank"),  # the tensors are rank 2 (low-rank w2): PEFT could not load them
    ({"decompose_factor": 2}, "PEFT builds"),
])
def test_config_it_cannot_hold_is_refused_naming_the_field(tmp_path, fields, message):
    folder, _ = _peft_folder(tmp_path, r=2)
    _edit(folder, **fields)
    with pytest.raises(adapterkit.AdapterkitError, match=message) as info:
        adapterkit.load(folder)
    assert "\n" not in str(info.value)


def test_written_config_loads_in_peft_config_class(tmp_path):
    """What we write (from an adapterkit-made adapter) is a LoKrConfig PEFT accepts, fields as PEFT's."""
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "lokr", CONFIGS["llama"])
    perturb(handle.parameters(), seed=2)
    folder = adapterkit.save(handle.to_adapter(), tmp_path / "ours", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and config["decompose_both"] is True
    loaded = peft.PeftConfig.from_pretrained(str(folder))
    assert isinstance(loaded, peft.LoKrConfig)
    import dataclasses

    known = {f.name for f in dataclasses.fields(peft.LoKrConfig)}
    assert set(config) <= known, sorted(set(config) - known)
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(folder)).eval(), sample_inputs())
    assert (theirs - outputs(model, sample_inputs())).abs().max().item() <= 1e-5
