"""The adapterkit conformance kit on OFT (llama, gpt2 with Conv1D, bert), the numpy merge against the torch
layer, the block-size rules and the to-lora lowering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, MethodConformance, outputs, perturb, sample_inputs
from adapterkit_oft.method import adjust, blocks_for, cayley, project

from oft_helpers import CONFIGS, NOISE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestOft(MethodConformance):
    method = "oft"
    configs = CONFIGS


class TestOftVariants(MethodConformance):
    """COFT, shared blocks, exact Cayley and a short Neumann series, one per kind."""

    method = "oft"
    configs = {
        "llama": {"target_modules": ["q_proj", "down_proj"], "oft_block_size": 8, "coft": True, "eps": 0.5,
                  "block_share": True},
        "gpt2": {"target_modules": ["c_fc"], "r": 8, "use_cayley_neumann": False},
        "bert": {"target_modules": ["key", "output.dense"], "oft_block_size": 4, "num_cayley_neumann_terms": 3},
    }


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_numpy_merged_weight_equals_the_torch_layer(kind):
    """merged_weight (numpy, stored orientation: Conv1D [in, out]) gives the weight the torch merge writes."""
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, "oft", CONFIGS[kind])
    perturb(handle.parameters(), seed=2, scale=NOISE)
    adapter = handle.to_adapter()
    method = adapterkit.default_registry().method("oft")
    bases = {path: model.get_submodule(path).base_layer.weight.detach().clone().numpy() for path in adapter.targets}
    handle.merge()
    for path, target in adapter.targets.items():
        tensors = {"R": adapter.tensors[f"{path}.oft.R"]}
        ours = method.merged_weight(path, target, adapter.config, tensors, bases[path])
        torch_merged = model.get_submodule(path).base_layer.weight.detach().numpy()
        assert ours.dtype == np.float32 and ours.shape == bases[path].shape
        assert np.abs(ours - torch_merged).max() <= 1e-6, path


def test_rotations_are_orthogonal_with_exact_cayley_and_coft_bounds_them():
    rng = np.random.default_rng(0)
    vectors = rng.normal(scale=0.3, size=(3, 28))
    rotations = cayley(vectors, 8, neumann=False, terms=5)
    np.testing.assert_allclose(rotations @ np.swapaxes(rotations, -1, -2), np.broadcast_to(np.eye(8), (3, 8, 8)),
                               atol=1e-12)
    bounded = project(vectors, 8, eps=0.1)
    assert np.all(np.sqrt(2) * np.linalg.norm(bounded, axis=1) <= 0.1 / np.sqrt(3) + 1e-12)
    assert np.array_equal(project(bounded * 0.5, 8, eps=0.1), bounded * 0.5)


def test_block_sizes_follow_peft():
    assert blocks_for(32, 0, 8) == (4, 8, False)
    assert blocks_for(32, 4, 0) == (4, 8, False)
    assert blocks_for(32, 0, 6) == (8, 4, True)  # PEFT's adjust_oft_parameters: the nearer divisor, ties lower
    assert blocks_for(64, 0, 7) == (8, 8, True) and adjust(32, 40) == 32
    with pytest.raises(adapterkit.UsageError):
        blocks_for(32, 4, 8)


def test_config_errors_name_the_field():
    method = adapterkit.default_registry().method("oft")
    cases = [({"target_modules": ["q_proj"], "r": 4, "oft_block_size": 8}, "r"),
             ({"target_modules": ["q_proj"], "module_dropout": 1.5}, "module_dropout"),
             ({"target_modules": ["q_proj"], "eps": 0}, "eps"),
             ({"target_modules": ["q_proj"], "coft": "yes"}, "coft"),
             ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "layers_pattern"),
             ({"target_modules": ["q_proj"], "rank": 4}, "rank")]
    for config, field in cases:
        with pytest.raises(adapterkit.UsageError) as info:
            method.resolve_config(config)
        assert info.value.location == f"$.method.config.{field}", (config, info.value.location)
    assert method.resolve_config({"target_modules": ["q_proj"], "r": 4})["oft_block_size"] == 0


def test_selection_layers_and_exclude():
    model = TINY_MODELS["llama"](0)
    config = {"target_modules": ["q_proj", "v_proj"], "oft_block_size": 8, "layers_to_transform": [1],
              "layers_pattern": "layers", "exclude_modules": ["v_proj"]}
    handle = adapterkit.inject(model, "oft", config)
    assert sorted(handle.to_adapter().targets) == ["model.layers.1.self_attn.q_proj"]


def test_module_dropout_drops_blocks_in_training_only():
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "oft", {"target_modules": ["down_proj"], "oft_block_size": 8,
                                              "module_dropout": 0.5})
    perturb(handle.parameters(), seed=1, scale=NOISE)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    eval_blocks = layer.rotations("default")
    layer.train()
    torch.manual_seed(0)
    train_blocks = layer.rotations("default")
    identity = [torch.equal(b, torch.eye(8)) for b in train_blocks]
    assert sum(identity) == 4 and not any(torch.equal(b, torch.eye(8)) for b in eval_blocks)


def test_to_lora_with_the_base(tmp_path):
    """OFT has no additive delta: to-lora takes the base and lowers merged - base; full rank is exact."""
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "oft", CONFIGS["llama"])
    perturb(handle.parameters(), seed=5, scale=NOISE)
    inputs = sample_inputs()
    ours = outputs(model, inputs)
    base = tmp_path / "base"
    TINY_MODELS["llama"](0).save_pretrained(base)
    saved = adapterkit.save(handle.to_adapter(), tmp_path / "oft")
    lowered = adapterkit.to_lora(saved, rank=32, base=base)
    lora = getattr(lowered, "adapter", lowered)
    assert lora.method == "lora"
    got = outputs(adapterkit.apply(lora, TINY_MODELS["llama"](0)), inputs)
    assert (got - ours).abs().max().item() <= 1e-4
