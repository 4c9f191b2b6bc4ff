"""Parity with the real PEFT: the same A / B give the same logits, the same modules are selected."""

from __future__ import annotations

import pytest

import torch
import peft

import adapterkit  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

PREFIX = "base_model.model."
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:fan_in_fan_out is set to False")


def peft_model(kind: str, **lora_options):
    """A tiny model with a PEFT LoRA of random A and B (init_lora_weights=False)."""
    torch.manual_seed(123)
    config = peft.LoraConfig(init_lora_weights=False, **lora_options)
    return peft.get_peft_model(BUILDERS[kind](seed=0), config).eval()


def peft_canonical_state(model) -> dict[str, torch.Tensor]:
    """PEFT's lora_A / lora_B of adapter "default" under adapterkit's canonical keys."""
    state = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            path = name.removeprefix(PREFIX)
            state[f"{path}.lora.A"] = lora_a["default"].weight.detach().clone()
            state[f"{path}.lora.B"] = module.lora_B["default"].weight.detach().clone()
    return state


CASES = {
    "llama": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
         "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
         "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    ),
    "llama-rslora": (
        "llama",
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj"]},
        {"r": 4, "alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj"]},
    ),
    "gpt2-fan-in-fan-out": (
        "gpt2",
        {"r": 4, "lora_alpha": 16, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        {"r": 4, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]},
    ),
    "bert": (
        "bert",
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"]},
        {"r": 4, "alpha": 8, "target_modules": ["query", "value", "dense"]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_same_logits(case):
    kind, peft_options, options = CASES[case]
    inputs = sample_inputs()
    reference = peft_model(kind, **peft_options)
    state = peft_canonical_state(reference)
    ours = BUILDERS[kind](seed=0)
    with torch.no_grad():
        base = ours(**inputs).logits
    handle = adapterkit.inject(ours, "lora", **options)
    assert set(handle.state_dict()) == set(state)  # same modules, same per-module ranks
    handle.load_state_dict(state)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert (expected - base).abs().max() > 1e-3  # the adapter does something
        assert (ours(**inputs).logits - expected).abs().max() <= 1e-5
        handle.merge()
        assert (ours(**inputs).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_linear_selects_what_peft_selects(kind):
    reference = peft_model(kind, r=2, target_modules="all-linear")
    handle = adapterkit.inject(BUILDERS[kind](), "lora", r=2, target_modules="all-linear")
    assert {key.rsplit(".lora.", 1)[0] for key in peft_canonical_state(reference)} == set(handle.targets)
