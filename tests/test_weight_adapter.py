"""adapterkit.WeightAdapterLayer / WeightAdapterMethod: the public base of weight-update method plugins,
on two toy methods (additive and multiplicative) registered through the public API."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.testing import TINY_MODELS, MethodConformance, outputs, perturb, sample_inputs


class ProductLayer(adapterkit.WeightAdapterLayer):
    """delta W = scale * U V (rank r)."""

    def delta(self, name):
        p = self.params[name]
        return p["u"] @ p["v"] * self.config[name]["scale"]


class RowScaleLayer(adapterkit.WeightAdapterLayer):
    """W' = diag(s) W: a multiplicative update (the bias is left alone)."""

    transforms_weight = True

    def adapted_weight(self, name, weight):
        return weight * self.params[name]["s"].to(weight.dtype)[:, None]


def _io(target):
    return target["shape"] if target["kind"] == "linear" else target["shape"][::-1]


class Product(adapterkit.WeightAdapterMethod, adapterkit.Method, adapterkit.DeltaWeight):
    name = "toy_product"

    @property
    def layer_class(self):
        return ProductLayer

    def config_schema(self):
        return {"type": "object"}

    def default_config(self):
        return {"scale": 0.5, "r": 2}

    def expected_tensors(self, module, target, config):
        out, inn = _io(target)
        r = config.get("r", 2)
        return {f"{module}.toy_product.u": (out, r), f"{module}.toy_product.v": (r, inn)}

    def new_parameters(self, layer, config, target):
        return {"u": nn.Parameter(torch.zeros(layer.out_features, config["r"])),
                "v": nn.Parameter(torch.randn(config["r"], layer.in_features))}

    def new_dropout(self, config, target):
        return nn.Dropout(0.1)

    def delta_weight(self, module, target, config, tensors):
        delta = tensors["u"] @ tensors["v"] * config.get("scale", 0.5)
        return delta.T if target["kind"] == "conv1d" else delta


class RowScale(adapterkit.WeightAdapterMethod, adapterkit.Method, adapterkit.MergedWeight):
    name = "toy_rowscale"

    @property
    def layer_class(self):
        return RowScaleLayer

    def config_schema(self):
        return {"type": "object"}

    def expected_tensors(self, module, target, config):
        return {f"{module}.toy_rowscale.s": (_io(target)[0],)}

    def new_parameters(self, layer, config, target):
        return {"s": nn.Parameter(torch.ones(layer.out_features))}

    def merged_weight(self, module, target, config, tensors, weight):
        s = tensors["s"].astype(weight.dtype)
        return weight * (s[:, None] if target["kind"] == "linear" else s[None, :])


def _registry():
    plugin = types.ModuleType("toy_weight_methods")

    @adapterkit.hookimpl
    def adapterkit_register_methods(register):
        register(Product())
        register(RowScale())

    plugin.adapterkit_register_methods = adapterkit_register_methods
    return adapterkit.Registry(*adapterkit.get_plugin_manager(plugins=[("toy", plugin)]))


REGISTRY = _registry()
CONFIGS = {"llama": {"target_modules": ["q_proj", "down_proj"]}, "gpt2": {"target_modules": ["c_attn", "c_fc"]},
           "bert": {"target_modules": ["query", "value"]}}


class TestAdditive(MethodConformance):
    method = "toy_product"
    configs = CONFIGS
    registry = REGISTRY


class TestMultiplicative(MethodConformance):
    method = "toy_rowscale"
    configs = CONFIGS
    registry = REGISTRY


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_torch_merge_equals_the_numpy_capability(kind, tmp_path):
    """adapterkit.merge (numpy, from the capabilities) and the layer's merge give the same weights."""
    for method in ("toy_product", "toy_rowscale"):
        model = TINY_MODELS[kind](0)
        handle = adapterkit.inject(model, method, CONFIGS[kind], registry=REGISTRY)
        perturb(handle.parameters(), seed=5)
        adapter = handle.to_adapter()
        base = TINY_MODELS[kind](0)
        base.save_pretrained(tmp_path / f"base-{kind}")
        out = adapterkit.merge(adapter, tmp_path / f"base-{kind}", tmp_path / f"{method}-{kind}", registry=REGISTRY)
        handle.merge()
        ours = adapterkit.read_safetensors(next(out.glob("*.safetensors")))[0]
        for path in handle.targets:
            key = f"{path}.weight"
            assert np.abs(ours[key] - model.get_submodule(path).base_layer.weight.detach().numpy()).max() <= 1e-6


def test_two_adapters_on_one_module_merge_and_unmerge_in_any_order():
    model = TINY_MODELS["llama"](0)
    a = adapterkit.inject(model, "toy_product", CONFIGS["llama"], name="a", registry=REGISTRY)
    b = adapterkit.inject(model, "toy_product", CONFIGS["llama"], name="b", registry=REGISTRY)
    perturb(a.parameters(), seed=1)
    perturb(b.parameters(), seed=2)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    original = layer.base_layer.weight.detach().clone()
    inputs = sample_inputs()
    both = outputs(model, inputs)
    a.merge()
    b.merge()
    assert torch.allclose(outputs(model, inputs), both, atol=1e-5)
    a.unmerge()  # the first one out: b stays merged
    assert layer.merged == ["b"] and torch.allclose(outputs(model, inputs), both, atol=1e-5)
    b.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    # the trainable set is both adapters' parameters and nothing else
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*a.parameters(), *b.parameters()]}


def test_a_module_wrapped_by_another_method_is_refused():
    model = TINY_MODELS["llama"](0)
    adapterkit.inject(model, "lora", {"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(adapterkit.UsageError, match="another method"):
        adapterkit.inject(model, "toy_product", {"target_modules": ["q_proj"]}, name="second", registry=REGISTRY)


def test_a_saved_adapter_applies_only_to_its_own_base():
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "toy_product", CONFIGS["llama"], registry=REGISTRY)
    adapter = handle.to_adapter()
    other = TINY_MODELS["gpt2"](0)
    with pytest.raises(adapterkit.AdapterkitError):
        adapterkit.apply(adapter, other, registry=REGISTRY)


def test_shared_tensors_move_once_and_stay_shared():
    """One SharedTensors module held by every layer: moving the model converts each shared tensor once, and
    every layer still sees the same object (what load_state writes into)."""
    from adapterkit.core.runtime.weight_layer import SharedTensors

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4))
    holder = SharedTensors({"P": torch.randn(2, 4), "T": nn.Parameter(torch.randn(2))})
    layers = [ProductLayer(model[0]), ProductLayer(model[1])]
    for index, layer in enumerate(layers):
        model[index] = layer
        layer.add_adapter("a", {"u": nn.Parameter(torch.zeros(layer.out_features, 1)),
                                "v": nn.Parameter(torch.zeros(1, layer.in_features))},
                          target={"kind": "linear", "shape": list(layer.shape)}, config={"scale": 1.0}, shared=holder)
    model.to(torch.float64)
    first, second = layers[0].shared["a"], layers[1].shared["a"]
    assert first["P"].dtype == torch.float64 and first["P"] is second["P"] and first["T"] is second["T"]
    assert sum(1 for p in model.parameters() if p is first["T"]) == 1  # the shared parameter counts once
    assert not any(key.endswith(".P") for key in model.state_dict())  # a fixed shared tensor is not in the base's state
