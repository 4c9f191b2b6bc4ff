"""LoKr's rules against PEFT 0.21.2's own code: factorisation, layout, delta, init, training-only dropouts;
the config's errors; the import rules of the package."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.testing import TINY_MODELS, perturb
from adapterkit_lokr.math import factorization, layout_of, lokr_delta, peft_layout, tensor_shapes
from adapterkit_lokr.method import validate_config



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 400):
        for factor in (-1, -3, 0, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("out_features, in_features", [(32, 32), (16, 32), (64, 32), (96, 32), (7, 12), (128, 48)])
@pytest.mark.parametrize("r", [1, 2, 4, 8])
@pytest.mark.parametrize("decompose_both, factor", [(False, -1), (True, -1), (True, 4), (False, 8)])
def test_layout_and_delta_are_peft_s(out_features, in_features, r, decompose_both, factor):
    """PEFT's update_layer builds exactly the tensors tensor_shapes names; lokr_delta == get_delta_weight."""
    import peft

    config = peft.LoKrConfig(r=r, alpha=3, decompose_both=decompose_both, decompose_factor=factor,
                             target_modules=["lin"], init_weights=False)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(in_features, out_features, bias=False)),
                                peft.LoKrConfig(**{**config.to_dict(), "target_modules": ["0"]}))
    layer = model.base_model.model[0]
    theirs = {n[len("lokr_"):]: tuple(p["default"].shape) for n in layer.adapter_layer_names
              for p in [getattr(layer, n)] if "default" in p}
    target = {"r": r, "alpha": 3, **peft_layout(out_features, in_features, r, decompose_both, factor)}
    assert tensor_shapes(target) == theirs
    tensors = {n[len("lokr_"):]: getattr(layer, n)["default"].detach().numpy() for n in layer.adapter_layer_names
               if "default" in getattr(layer, n)}
    found = layout_of(tensors)
    assert {k: found[k] for k in ("out_factors", "in_factors", "w1_full", "w2_full")} == {
        k: target[k] for k in ("out_factors", "in_factors", "w1_full", "w2_full")}
    expected = layer.get_delta_weight("default").detach().numpy()
    assert np.abs(lokr_delta(tensors, 3 / r) - expected).max() <= 1e-6


def test_conv1d_delta_is_stored_transposed():
    model = TINY_MODELS["gpt2"](0)
    handle = adapterkit.inject(model, "lokr", {"target_modules": ["c_attn"], "r": 1, "decompose_both": True})
    perturb(handle.parameters())
    adapter = handle.to_adapter()
    method = adapterkit.default_registry().method("lokr")
    module = "transformer.h.0.attn.c_attn"
    target = adapter.targets[module]
    assert target["kind"] == "conv1d" and target["shape"] == [32, 96]
    prefix = f"{module}.lokr."
    own = {k[len(prefix):]: v for k, v in adapter.tensors.items() if k.startswith(prefix)}
    delta = method.delta_weight(module, target, adapter.config, own)
    layer = model.get_submodule(module)
    assert delta.shape == (32, 96)
    np.testing.assert_allclose(delta, layer.delta("default").detach().numpy().T, atol=1e-6)


def test_init_weights_like_peft():
    model = TINY_MODELS["llama"](0)
    for name, init in (("a", True), ("b", "lycoris"), ("c", False)):
        adapterkit.inject(model, "lokr", {"target_modules": ["q_proj"], "r": 1, "decompose_both": True,
                                          "init_weights": init}, name=name)
    params = model.model.layers[0].self_attn.q_proj.params
    zero = {n: [k for k, v in params[n].items() if not v.detach().abs().sum()] for n in "abc"}
    assert zero == {"a": ["w1_a"], "b": ["w2_b"], "c": []}


def test_dropouts_are_training_only():
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "lokr", {"target_modules": ["q_proj"], "r": 2, "rank_dropout": 0.5,
                                               "module_dropout": 0.5, "rank_dropout_scale": True})
    perturb(handle.parameters())
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    layer.eval()
    eval_out = layer.adapter_output("default", x)
    assert torch.equal(eval_out, layer.adapter_output("default", x))
    layer.train()
    torch.manual_seed(0)
    outs = [layer.adapter_output("default", x) for _ in range(40)]
    skipped = sum(1 for o in outs if o.dim() == 0 and float(o) == 0)
    assert 5 < skipped < 35  # module dropout skips about half the calls
    kept = [o for o in outs if o.dim() == 2]
    assert any(bool((o == 0).all(dim=0).any()) for o in kept)  # rank dropout zeroes whole output rows
    assert all(not torch.allclose(o, eval_out) for o in kept)


@pytest.mark.parametrize("config, field", [
    ({"r": 0}, "r"), ({"alpha": "x"}, "alpha"), ({"rank_dropout": 1.0}, "rank_dropout"),
    ({"module_dropout": -0.1}, "module_dropout"), ({"decompose_both": 1}, "decompose_both"),
    ({"decompose_factor": 2.5}, "decompose_factor"), ({"init_weights": "gaussian"}, "init_weights"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "("}, "target_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"), ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"lora_alpha": 8}, "lora_alpha"),
])
def test_config_errors_name_the_field(config, field):
    with pytest.raises(adapterkit.UsageError) as info:
        validate_config(config)
    assert info.value.location == f"$.method.config.{field}"
    assert info.value.hint


def test_conv2d_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(adapterkit.UsageError, match="Conv2d"):
        adapterkit.inject(model, "lokr", {"target_modules": ["0"]})


