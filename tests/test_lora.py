"""LoRA on tiny llama / gpt2 (Conv1D) / bert: training, merge, disable, save-apply, targeting, errors."""

from __future__ import annotations

import math

import pytest

import torch
import transformers  # noqa: F401

import adapterkit  # noqa: E402
from adapterkit.core.errors import BaseModelError, TensorFileError, UsageError  # noqa: E402
from adapterkit.core.runtime.inject import attached  # noqa: E402
from adapterkit.plugins.lora.layer import LoraLayer, lora_layers  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D, weight [in, out]
    "bert": ["query", "value", "dense"],
}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def randomize_b(handle, seed: int = 0, std: float = 0.2) -> None:
    """Give every B random values: a fresh adapter (B = 0) would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    state = handle.state_dict()
    handle.load_state_dict({
        k: torch.randn(v.shape, generator=generator) * std if k.endswith(".lora.B") else v for k, v in state.items()
    })


def base_weights(model) -> dict[str, torch.Tensor]:
    """Each adapted module's base weight, by module path."""
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lora_layers(model)}


@pytest.fixture(params=sorted(TARGETS))
def kind(request) -> str:
    return request.param


def test_only_adapter_parameters_train(kind):
    model = BUILDERS[kind]().train()
    handle = adapterkit.inject(model, "lora", r=4, alpha=8, target_modules=TARGETS[kind])
    randomize_b(handle)
    adapter_ids = {id(p) for p in handle.parameters()}
    assert len(adapter_ids) == 2 * len(handle.targets)
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_ids
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    inputs = sample_inputs()
    labels = torch.tensor([0, 2]) if kind == "bert" else inputs["input_ids"]
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == (id(param) in adapter_ids), name


def test_merge_unmerge_disable_are_exact(kind):
    model, inputs = BUILDERS[kind](), sample_inputs()
    base_out = logits(model, inputs)
    handle = adapterkit.inject(model, "lora", r=4, alpha=8, target_modules=TARGETS[kind])
    assert torch.equal(logits(model, inputs), base_out)  # B = 0 at init
    randomize_b(handle)
    originals = base_weights(model)
    adapted = logits(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-3
    with handle.disabled():
        assert torch.equal(logits(model, inputs), base_out)

    handle.merge()
    merged = logits(model, inputs)
    assert (merged - adapted).abs().max() <= 1e-5
    merged_weights = base_weights(model)
    assert any(not torch.equal(merged_weights[p], originals[p]) for p in originals)
    model.get_submodule(next(iter(handle.targets))).merge("default")  # merging again is a no-op
    handle.method.merge(model, "default")
    assert all(torch.equal(w, merged_weights[p]) for p, w in base_weights(model).items())
    with handle.disabled():  # disabled while merged: exactly the base again
        assert torch.equal(logits(model, inputs), base_out)
    assert torch.equal(logits(model, inputs), merged)

    handle.unmerge()
    assert all(torch.equal(w, originals[p]) for p, w in base_weights(model).items())
    assert torch.equal(logits(model, inputs), adapted)


def test_saved_adapter_applies_to_a_fresh_model(kind):
    model, inputs = BUILDERS[kind](seed=0), sample_inputs()
    handle = adapterkit.inject(model, "lora", r=4, alpha=8, target_modules=TARGETS[kind])
    randomize_b(handle)
    adapter = handle.to_adapter()
    assert adapter.tensors.keys() == {f"{m}.lora.{p}" for m in handle.targets for p in "AB"}
    target = next(iter(adapter.targets.values()))
    assert target["kind"] == ("conv1d" if kind == "gpt2" else "linear") and target["r"] == 4 and target["alpha"] == 8
    fresh = adapterkit.apply(adapter, BUILDERS[kind](seed=0))
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))


def test_delta_weight_matches_the_torch_merge():
    model = BUILDERS["gpt2"]()
    handle = adapterkit.inject(model, "lora", r=4, alpha=8, use_rslora=True, target_modules=["c_attn"])
    randomize_b(handle)
    adapter = handle.to_adapter()
    path = "transformer.h.0.attn.c_attn"
    delta = handle.method.delta_weight(path, adapter.targets[path], handle.config, adapter.tensors)
    layer = model.get_submodule(path)
    before = layer.base_layer.weight.detach().clone()
    handle.merge()
    assert torch.allclose(layer.base_layer.weight - before, torch.from_numpy(delta), atol=1e-6)


def test_rslora_scale():
    model, inputs = BUILDERS["llama"](), sample_inputs()
    plain = adapterkit.inject(model, "lora", r=4, alpha=8, target_modules=["q_proj"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scale["default"] == 2.0
    other = BUILDERS["llama"]()
    rs = adapterkit.inject(other, "lora", r=4, alpha=8, use_rslora=True, target_modules=["q_proj"])
    assert other.get_submodule("model.layers.0.self_attn.q_proj").scale["default"] == 8 / math.sqrt(4)
    randomize_b(plain)
    rs.load_state_dict({k: v * 0.5 if k.endswith(".B") else v for k, v in plain.state_dict().items()})
    assert torch.allclose(logits(model, inputs), logits(other, inputs), atol=1e-5)  # 2 * B == 4 * (B / 2)


def test_rank_and_alpha_patterns():
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(
        model, "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6}, alpha_pattern={"v_proj": 3},
    )
    targets = handle.targets
    assert targets["model.layers.0.self_attn.q_proj"]["r"] == 6
    assert targets["model.layers.1.self_attn.q_proj"]["r"] == 2  # first matching key wins
    assert targets["model.layers.0.self_attn.v_proj"] == {"kind": "linear", "shape": [16, 32], "r": 4, "alpha": 3}
    state = handle.state_dict()
    assert state["model.layers.1.self_attn.q_proj.lora.A"].shape == (2, 32)
    assert state["model.layers.0.self_attn.v_proj.lora.B"].shape == (16, 4)
    assert model.get_submodule("model.layers.0.self_attn.v_proj").scale["default"] == 3 / 4
    # applying uses the recorded per-module r / alpha, not the patterns
    fresh = adapterkit.apply(handle.to_adapter(), BUILDERS["llama"]())
    assert fresh.get_submodule("model.layers.1.self_attn.q_proj").r["default"] == 2


@pytest.mark.parametrize(("kind", "head"), [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier")])
def test_all_linear_excludes_the_head(kind, head):
    model = BUILDERS[kind]()
    handle = adapterkit.inject(model, "lora", r=2)
    linear = {"llama": 14, "gpt2": 8, "bert": 13}[kind]  # bert: 12 in the encoder + the pooler
    assert len(handle.targets) == linear and head not in handle.targets
    assert not isinstance(model.get_submodule(head), LoraLayer)


def test_regex_targets_and_layers_to_transform():
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "lora", r=2, target_modules=r"model\.layers\.\d+\.mlp\.(up|down)_proj")
    assert sorted(handle.targets) == [f"model.layers.{i}.mlp.{n}_proj" for i in (0, 1) for n in ("down", "up")]
    model = BUILDERS["bert"]()
    handle = adapterkit.inject(model, "lora", r=2, target_modules=["query", "dense"], layers_to_transform=[1])
    assert sorted(handle.targets) == [
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense",
    ]  # pooler.dense has no layer index


def test_selection_errors():
    with pytest.raises(UsageError, match="selects no module"):
        adapterkit.inject(BUILDERS["llama"](), "lora", target_modules=["qproj"])
    with pytest.raises(UsageError, match="Embedding"):
        adapterkit.inject(BUILDERS["llama"](), "lora", target_modules=["embed_tokens"])


def test_apply_checks_the_base():
    model = BUILDERS["llama"]()
    adapter = adapterkit.inject(model, "lora", r=2, target_modules=["q_proj", "up_proj"]).to_adapter()
    adapter.manifest.targets["model.layers.1.mlp.up_proj"]["shape"] = [99, 32]
    fresh = BUILDERS["llama"]()
    with pytest.raises(BaseModelError) as info:
        adapterkit.apply(adapter, fresh)
    error = info.value
    assert error.location == "model.layers.1.mlp.up_proj.weight" and error.expected == [99, 32] and error.found == [64, 32]
    assert not lora_layers(fresh)  # nothing was wrapped
    gpt2_adapter = adapterkit.inject(BUILDERS["gpt2"](), "lora", r=2, target_modules=["c_attn"]).to_adapter()
    with pytest.raises(BaseModelError, match="targets module transformer.h.0.attn.c_attn, which the model does not have"):
        adapterkit.apply(gpt2_adapter, BUILDERS["llama"]())


def test_load_state_checks_keys_and_shapes():
    handle = adapterkit.inject(BUILDERS["llama"](), "lora", r=2, target_modules=["q_proj"])
    state = handle.state_dict()
    key = "model.layers.0.self_attn.q_proj.lora.A"
    with pytest.raises(TensorFileError) as info:
        handle.load_state_dict({**{k: v for k, v in state.items() if k != key}, "x.lora.A": state[key]})
    assert info.value.expected == {"missing": [key]} and info.value.found == {"unexpected": ["x.lora.A"]}
    with pytest.raises(TensorFileError, match="wrong shape"):
        handle.load_state_dict({**state, key: torch.zeros(3, 32)})


def test_dropout_only_in_training():
    model, inputs = BUILDERS["llama"](), sample_inputs()
    handle = adapterkit.inject(model, "lora", r=4, dropout=0.5, target_modules=["q_proj", "v_proj"])
    randomize_b(handle)
    assert not any(m.training for m in model.modules())  # injected into an eval model: stays in eval mode
    assert torch.equal(logits(model, inputs), logits(model, inputs))
    model.train()
    torch.manual_seed(0)
    first = logits(model, inputs)
    assert not torch.equal(first, logits(model, inputs))


def test_two_adapters_share_wrappers():
    model, inputs = BUILDERS["llama"](), sample_inputs()
    base_out = logits(model, inputs)
    first = adapterkit.inject(model, "lora", r=4, target_modules=["q_proj"], name="first")
    second = adapterkit.inject(model, "lora", r=2, target_modules=["q_proj", "v_proj"], name="second")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, torch.nn.Linear) and layer.adapter_names == ["first", "second"]
    assert all(p.requires_grad for p in first.parameters())
    randomize_b(first, seed=1)
    randomize_b(second, seed=2)
    both = logits(model, inputs)
    modules = [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]
    assert second.state_dict().keys() == {f"{m}.lora.{p}" for m in modules for p in "AB"}
    originals = base_weights(model)
    first.merge()
    second.merge()
    assert (logits(model, inputs) - both).abs().max() <= 1e-5
    first.unmerge()
    second.unmerge()
    assert all(torch.equal(w, originals[p]) for p, w in base_weights(model).items())
    only_second = adapterkit.apply(second.to_adapter(), BUILDERS["llama"]())
    with first.disabled():
        assert torch.equal(logits(model, inputs), base_out)
    assert not torch.equal(logits(only_second, inputs), both)
    with pytest.raises(UsageError, match="already injected"):
        adapterkit.inject(model, "lora", r=2, target_modules=["q_proj"], name="second")


def test_unload_keeps_merged_adapters_folded_in():
    model, inputs = BUILDERS["gpt2"](), sample_inputs()
    keys = set(model.state_dict())
    handle = adapterkit.inject(model, "lora", r=4, target_modules=["c_attn", "c_fc"])
    randomize_b(handle)
    adapted = logits(model, inputs)
    handle.merge()
    model = handle.method.unload(model)
    assert not lora_layers(model) and set(model.state_dict()) == keys
    assert not attached(model)  # the handle went with its wrappers
    assert (logits(model, inputs) - adapted).abs().max() <= 1e-5


def test_low_precision_base():
    model, inputs = BUILDERS["llama"]().to(torch.bfloat16), sample_inputs()
    handle = adapterkit.inject(model, "lora", r=4, target_modules=["q_proj", "o_proj"])
    assert all(p.dtype == torch.float32 for p in handle.parameters())  # adapters train in float32
    randomize_b(handle)
    originals = base_weights(model)
    out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    handle.merge()
    handle.unmerge()
    assert all(torch.equal(w, originals[p]) for p, w in base_weights(model).items())
