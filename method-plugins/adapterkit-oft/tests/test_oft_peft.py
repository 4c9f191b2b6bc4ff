"""OFT against PEFT 0.21.2: the interop kit (PEFT folders apply with PEFT's logits, our folders load in PEFT,
exact round trips, merges equal merge_and_unload) and what the PEFT OFT codec refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, PeftInterop, outputs, perturb, sample_inputs, save_tiny_base

from oft_helpers import CONFIGS, NOISE

# PEFT 0.21's OFT adapts nn.Linear only (its dispatcher refuses transformers' Conv1D): no GPT-2 here.


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestOftPeft(PeftInterop):
    method = "oft"
    noise = NOISE
    peft_configs = {
        "llama": lambda: peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "bert": lambda: peft.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False,
                                       target_modules=["query", "value"]),
    }
    configs = {"llama": CONFIGS["llama"], "bert": CONFIGS["bert"]}


class TestOftPeftVariants(PeftInterop):
    """COFT + shared blocks, a block size PEFT adjusts, layer selection with exclusions and a short series."""

    method = "oft"
    noise = NOISE
    peft_configs = {
        "llama": lambda: peft.OFTConfig(oft_block_size=6, coft=True, eps=0.2, block_share=True,
                                        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                                        layers_to_transform=[1], layers_pattern="layers", exclude_modules=["k_proj"]),
        "bert": lambda: peft.OFTConfig(oft_block_size=16, num_cayley_neumann_terms=7, target_modules=".*dense",
                                       init_weights=False),
    }


def _peft_folder(root: Path, config: peft.OFTConfig, kind: str = "llama") -> Path:
    model = peft.get_peft_model(TINY_MODELS[kind](0), config)
    perturb([p for p in model.parameters() if p.requires_grad], seed=3, scale=NOISE)
    model.save_pretrained(root / "peft")
    return root / "peft"


def test_layout_and_config_match_peft(tmp_path):
    """Our folder has PEFT's keys, shapes and config fields (those PEFT saves for the same adapter)."""
    base = save_tiny_base("llama", tmp_path / "base")
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "oft", CONFIGS["llama"])
    perturb(handle.parameters(), seed=4, scale=NOISE)
    written = adapterkit.convert(adapterkit.save(handle.to_adapter(), tmp_path / "ours"), tmp_path / "ours-peft",
                                 to="peft", base=base)
    theirs = _peft_folder(tmp_path, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    ours_t = adapterkit.read_safetensors(Path(written) / "adapter_model.safetensors")[0]
    theirs_t = adapterkit.read_safetensors(theirs / "adapter_model.safetensors")[0]
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}
    ours_c = json.loads((Path(written) / "adapter_config.json").read_text())
    theirs_c = json.loads((theirs / "adapter_config.json").read_text())
    assert ours_c["peft_type"] == "OFT" and set(theirs_c) - set(ours_c) <= {"task_type"}, set(theirs_c) - set(ours_c)
    for key in ("r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms",
                "module_dropout", "bias", "fan_in_fan_out"):
        assert ours_c[key] == theirs_c[key], key


def test_gpt2_conv1d_is_refused_for_peft_but_works_in_adapterkit(tmp_path):
    model = TINY_MODELS["gpt2"](0)
    handle = adapterkit.inject(model, "oft", CONFIGS["gpt2"])
    perturb(handle.parameters(), seed=4, scale=NOISE)
    saved = adapterkit.save(handle.to_adapter(), tmp_path / "gpt2")
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D"):
        adapterkit.convert(saved, tmp_path / "gpt2-peft", to="peft")
    assert not (tmp_path / "gpt2-peft").exists()


def test_reading_needs_the_base(tmp_path):
    folder = _peft_folder(tmp_path, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    with pytest.raises(adapterkit.FormatError, match="base model is needed"):
        adapterkit.load(folder)
    wrong = save_tiny_base("bert", tmp_path / "bert")
    with pytest.raises(adapterkit.BaseModelError):
        adapterkit.load(folder, base=wrong)


@pytest.mark.parametrize("field,value,code", [("bias", "all", "unsupported"),
                                              ("modules_to_save", ["lm_head"], "unsupported"),
                                              ("rank_pattern", {"q_proj": 2}, "unsupported")])
def test_fields_oft_cannot_hold_are_refused_by_name(tmp_path, field, value, code):
    base = save_tiny_base("llama", tmp_path / "base")
    folder = _peft_folder(tmp_path, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapterkit.AdapterkitError) as info:
        adapterkit.load(folder, base=base)
    assert info.value.location == f"$.{field}" and info.value.code == code


def test_old_layouts_are_refused_naming_the_key(tmp_path):
    base = save_tiny_base("llama", tmp_path / "base")
    folder = _peft_folder(tmp_path, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    tensors, metadata = adapterkit.read_safetensors(folder / "adapter_model.safetensors")
    old = {k.replace("oft_R.weight", "oft_r"): np.zeros((4, 8, 8), np.float32) for k in tensors}
    adapterkit.write_safetensors(folder / "adapter_model.safetensors", old, metadata)
    with pytest.raises(adapterkit.FormatError) as info:
        adapterkit.load(folder, base=base)
    assert info.value.code == "old_layout" and info.value.location.endswith("q_proj.oft_r")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["oft_block_size"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapterkit.FormatError) as info:
        adapterkit.load(folder, base=base)
    assert info.value.location == "$.oft_block_size"


def test_peft_trains_the_same_step(tmp_path):
    """One AdamW step with COFT (PEFT projects the stored parameter at each forward) matches PEFT's."""
    config = {"target_modules": ["q_proj", "down_proj"], "oft_block_size": 8, "coft": True, "eps": 0.3}
    ours_model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(ours_model, "oft", config)
    perturb(handle.parameters(), seed=9, scale=NOISE)
    theirs_model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.OFTConfig(**config))
    state = handle.to_adapter().tensors
    with torch.no_grad():
        for name, param in theirs_model.named_parameters():
            if "oft_R" in name:
                module = name.split("base_model.model.", 1)[1].split(".oft_R.")[0]
                param.copy_(torch.from_numpy(np.asarray(state[f"{module}.oft.R"])))
    results = []
    for model, params in ((ours_model, handle.parameters()),
                          (theirs_model, [p for p in theirs_model.parameters() if p.requires_grad])):
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):
            model(**sample_inputs()).logits.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        results.append(outputs(model, sample_inputs()))
    assert (results[0] - results[1]).abs().max().item() <= 1e-5
