"""The torch-free side: the numpy update, config errors, the import rule, and to-lora of a LoHa adapter."""

from __future__ import annotations


import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, sample_inputs

from adapterkit_loha.math import loha_delta, loha_scale


def test_loha_delta_is_the_hadamard_product_of_two_low_rank_products():
    rng = np.random.default_rng(0)
    w1_a, w2_a = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    w1_b, w2_b = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    delta = loha_delta(w1_a, w1_b, w2_a, w2_b, loha_scale(3, 2))
    assert delta.dtype == np.float32 and delta.shape == (5, 7)
    expected = np.einsum("ir,rj->ij", w1_a, w1_b) * np.einsum("ir,rj->ij", w2_a, w2_b) * 1.5
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.matrix_rank(delta) == 4  # r**2, more than r: LoHa is not a rank-r LoRA
    with pytest.raises(ValueError, match="disagree"):
        loha_delta(w1_a, w1_b, w2_a[:, :1], w2_b, 1.0)


@pytest.mark.parametrize("config,field", [
    ({"r": 0}, "r"), ({"alpha": -1}, "alpha"), ({"rank_dropout": 1.0}, "rank_dropout"),
    ({"module_dropout": 2}, "module_dropout"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": "("}, "target_modules"), ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"lora_alpha": 8}, "lora_alpha"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"init_weights": "yes"}, "init_weights"),
])
def test_bad_config_names_the_field(config, field):
    method = adapterkit.default_registry().method("loha")
    with pytest.raises(adapterkit.UsageError) as info:
        method.resolve_config({"target_modules": ["q_proj"], **config})
    assert info.value.location == f"$.method.config.{field}"


def test_a_conv2d_target_is_refused_clearly():
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    with pytest.raises(adapterkit.UsageError, match="loha adapts only nn.Linear and transformers Conv1D"):
        adapterkit.inject(model, "loha", {"target_modules": ["0"]})


def test_to_lora_lowers_loha_exactly_at_rank_r_squared():
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "loha", {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    perturb(handle.parameters(), seed=1, scale=0.3)
    inputs = sample_inputs()
    ours = outputs(model, inputs)
    lowered = adapterkit.to_lora(handle.to_adapter(), rank=4)
    assert lowered.adapter.method == "lora" and lowered.source_method == "loha"
    got = outputs(adapterkit.apply(lowered.adapter, TINY_MODELS["llama"](0)), inputs)
    assert (got - ours).abs().max().item() <= 1e-5
    assert adapterkit.to_lora(handle.to_adapter(), rank=2).worst.error > 1e-3  # rank r is not enough
