"""What VeRA's LowRank factors give it: the adapter pool (one VeRA adapter, mixed batches), svd compose,
to-lora, merge and validate --target; and the factors / delta against the live layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, sample_inputs

POOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vera_adapter(seed: int, **config) -> adapterkit.Adapter:
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "vera", {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **config})
    perturb(handle.parameters(), seed=seed, scale=0.5)
    return handle.to_adapter()


def applied(adapter, inputs):
    model = TINY_MODELS["llama"](0).eval()
    if adapter is not None:
        adapterkit.apply(adapter, model)
    return outputs(model, inputs)


def test_the_adapter_pool_serves_one_vera_adapter_with_its_own_logits():
    adapter = vera_adapter(1)
    inputs = sample_inputs(batch=3)
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=2, max_rank=8,
                                  target_modules=POOL_TARGETS)
    pool.load("v", adapter)
    with torch.no_grad():
        mixed = pool(**inputs, adapter_names=["v", None, "v"]).logits
    ours, base = applied(adapter, inputs), applied(None, inputs)
    for row, want in enumerate([ours[0], base[1], ours[2]]):
        diff = (mixed[row] - want).abs().max().item()
        assert diff <= 1e-5, (row, diff)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter does change the output


def test_the_pool_serves_two_vera_adapters_with_different_projections():
    a, b = vera_adapter(2), vera_adapter(3, r=4, projection_prng_key=9, target_modules=["k_proj", "o_proj"])
    inputs = sample_inputs(batch=3)
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=2, max_rank=8,
                                  target_modules=POOL_TARGETS)
    pool.load("a", a)
    pool.load("b", b)
    with torch.no_grad():
        mixed = pool(**inputs, adapter_names=["b", "a", None]).logits
    for row, want in enumerate([applied(b, inputs)[0], applied(a, inputs)[1], applied(None, inputs)[2]]):
        assert (mixed[row] - want).abs().max().item() <= 1e-5, row


def test_the_pool_refuses_a_rank_above_max_rank():
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=1, max_rank=4, target_modules=POOL_TARGETS)
    with pytest.raises(adapterkit.UsageError, match="max_rank"):
        pool.load("v", vera_adapter(1))


def test_factors_and_delta_equal_the_layers_update():
    """lora_factors / delta_weight (numpy) against the live layer's delta, linear and Conv1D."""
    method = adapterkit.default_registry().method("vera")
    for kind, config in (("llama", {"r": 8, "target_modules": ["q_proj", "down_proj"]}),
                         ("gpt2", {"r": 6, "target_modules": ["c_attn", "c_fc", "mlp.c_proj"]})):
        model = TINY_MODELS[kind](0)
        handle = adapterkit.inject(model, "vera", config)
        perturb(handle.parameters(), seed=5, scale=0.5)
        adapter = handle.to_adapter()
        layers = dict(adapterkit.weight_layers(model, method.layer_class))
        shared = {id(layer.shared["default"]["A"]) for layer in layers.values()}
        assert len(shared) == 1, "every layer must hold the same projection tensor"
        assert not any(layer.shared["default"]["A"].requires_grad for layer in layers.values())
        for module, target in adapter.targets.items():
            tensors = adapter.module_tensors(module)
            factors = method.lora_factors(module, target, adapter.config, tensors)
            fan_in, fan_out = adapterkit.in_out_features(target["kind"], target["shape"])
            assert factors.a.shape == (config["r"], fan_in) and factors.b.shape == (fan_out, config["r"])
            live = layers[module].delta("default").detach().numpy()
            np.testing.assert_allclose(factors.b @ factors.a * factors.scale, live, atol=1e-6)
            delta = method.delta_weight(module, target, adapter.config, tensors)
            assert delta.shape == tuple(target["shape"])
            np.testing.assert_allclose(delta, live.T if kind == "gpt2" else live, atol=1e-6)


def test_compose_svd_and_to_lora_accept_it():
    a, b = vera_adapter(4), vera_adapter(5)
    inputs = sample_inputs(batch=2)
    # svd at the full rank of the sum: the composed LoRA equals both adapters applied together (sum of deltas)
    composed = adapterkit.compose([a, b], "svd", rank=16)
    assert composed.method == "lora"
    lowered = adapterkit.to_lora(a)  # exact: the full rank of each module's delta
    assert lowered.adapter.method == "lora" and lowered.worst.error <= 1e-5
    diff = (applied(lowered.adapter, inputs) - applied(a, inputs)).abs().max().item()
    assert diff <= 1e-5, diff
    method = adapterkit.default_registry().method("vera")
    lora = adapterkit.default_registry().method("lora")
    for module, target in a.targets.items():
        want = (method.delta_weight(module, target, a.config, a.module_tensors(module))
                + method.delta_weight(module, target, b.config, b.module_tensors(module)))
        got = lora.delta_weight(module, composed.targets[module], composed.config, composed.module_tensors(module))
        np.testing.assert_allclose(got, want, atol=1e-5)
    small = adapterkit.to_lora(a, rank=2)
    assert {t["r"] for t in small.adapter.targets.values()} == {2}


def test_validate_target_vllm_and_merge(tmp_path):
    adapter = vera_adapter(6)
    path = adapterkit.save(adapter, tmp_path / "vera")
    report = adapterkit.validate(path, target="vllm")
    assert report.valid and report.plan["loads"] and report.plan["coverage"] == 1.0, [str(e) for e in report.errors]
    base = tmp_path / "base"
    TINY_MODELS["llama"](0).save_pretrained(base)
    merged = adapterkit.merge(adapter, base, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs()
    got = outputs(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), inputs)
    assert (got - applied(adapter, inputs)).abs().max().item() <= 1e-5


def test_new_adapter_init_and_projections():
    """A new adapter: projections drawn as PEFT draws them, lambda_d = d_initial, lambda_b = 0 (no-op)."""
    import peft

    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "vera", {"r": 8, "target_modules": ["q_proj", "down_proj"], "d_initial": 0.25,
                                               "projection_prng_key": 11})
    state = {k: v for k, v in handle.to_adapter().tensors.items()}
    theirs = peft.get_peft_model(TINY_MODELS["llama"](0), peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"],
                                                                          projection_prng_key=11))
    assert state["vera.A"].tobytes() == theirs.base_model.vera_A["default"].numpy().tobytes()
    assert state["vera.B"].tobytes() == theirs.base_model.vera_B["default"].numpy().tobytes()
    assert state["vera.A"].shape == (8, 64) and state["vera.B"].shape == (32, 8)
    for key, value in state.items():
        if key.endswith("lambda_d"):
            assert np.all(value == np.float32(0.25))
        elif key.endswith("lambda_b"):
            assert np.all(value == 0)
    inputs = sample_inputs()
    assert torch.equal(outputs(model, inputs), applied(None, inputs))
    assert len(handle.parameters()) == 2 * 4  # two vectors per module (4 modules); the projections do not train
