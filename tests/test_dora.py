"""DoRA (method ``dora``) against the real PEFT: forward, gradients, merge, PEFT folders both ways, validate.

Adapters are made non-trivial before any comparison: random B *and* a magnitude
that differs from the weight norm (a fresh DoRA adapter changes nothing).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import torch
import peft

import adapterkit  # noqa: E402
from adapterkit.core.errors import FormatError, LossyConversionError, UsageError  # noqa: E402
from adapterkit.plugins.lora.dora import DoraMethod, dora_merge  # noqa: E402
from adapterkit.plugins.lora.layer import lora_layers  # noqa: E402
from adapterkit.testing import perturb  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
PEFT_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}  # on disk
PEFT_PARAMS = {"A": "lora_A.default.weight", "B": "lora_B.default.weight",
               "magnitude": "lora_magnitude_vector.default.weight"}  # in memory


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs()).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def ours(kind: str, seed: int = 0):
    """A tiny model with a perturbed DoRA adapter (random B, magnitude != norm)."""
    model = BUILDERS[kind]()
    handle = adapterkit.inject(model, "dora", r=4, alpha=8, target_modules=TARGETS[kind])
    perturb(handle.parameters(), seed=seed)
    return model, handle


def peft_twin(kind: str, handle) -> torch.nn.Module:
    """The same adapter loaded into PEFT (use_dora=True) from our canonical tensors."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True,
                             fan_in_fan_out=kind == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(BUILDERS[kind](), config)
    state = {}
    for key, value in handle.state_dict().items():
        module, param = key.rsplit(".dora.", 1)
        state[f"base_model.model.{module}.{PEFT_KEYS[param]}"] = value
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model.eval()


@pytest.fixture(params=sorted(TARGETS))
def kind(request) -> str:
    return request.param


def test_new_adapter_is_the_identity_and_magnitude_is_the_row_norm(kind):
    model = BUILDERS[kind]()
    base = logits(model)
    handle = adapterkit.inject(model, "dora", r=4, target_modules=TARGETS[kind])
    assert torch.equal(logits(model), base)
    for path, layer in lora_layers(model):
        weight = layer.base_layer.weight.detach()
        rows = weight.T if kind == "gpt2" else weight  # Conv1D stores [in, out]: one magnitude per output
        assert torch.allclose(layer.lora_magnitude["default"], rows.norm(dim=1))
        assert handle.targets[path]["kind"] == ("conv1d" if kind == "gpt2" else "linear")
    assert len(handle.parameters()) == 3 * len(handle.targets)


def test_forward_and_gradients_match_peft(kind):
    model, handle = ours(kind)
    twin = peft_twin(kind, handle)
    got, want = logits(model), logits(twin)
    print(f"\n{kind}: DoRA logits max |adapterkit - PEFT| = {max_diff(got, want):.3g}")
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, logits(BUILDERS[kind]())) > 1e-2  # the adapter does something
    # one backward pass (eval mode: GPT-2's own dropout would draw different masks): the
    # detached norm must give PEFT's gradients for A, B and m
    for m in (model, twin):
        m(**sample_inputs()).logits.pow(2).mean().backward()
    twin_params = dict(twin.named_parameters())
    for key, param in zip(handle.state_dict(), handle.parameters()):
        module, name = key.rsplit(".dora.", 1)
        peft_name = f"base_model.model.{module}.{PEFT_PARAMS[name]}"
        assert param.grad is not None
        assert torch.allclose(param.grad, twin_params[peft_name].grad, atol=1e-6, rtol=1e-4), key


def test_dropout_in_training_matches_peft():
    """With dropout, the base term sees the dropped-out input too (PEFT's rule); same masks, same logits."""
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "dora", r=4, alpha=8, dropout=0.3, target_modules=TARGETS["llama"])
    perturb(handle.parameters())
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=TARGETS["llama"], use_dora=True)
    twin = peft.get_peft_model(BUILDERS["llama"](), config)
    state = {}
    for key, value in handle.state_dict().items():
        module, param = key.rsplit(".dora.", 1)
        state[f"base_model.model.{module}.{PEFT_KEYS[param]}"] = value
    peft.set_peft_model_state_dict(twin, state)
    model.train()
    twin.train()
    torch.manual_seed(5)
    with torch.no_grad():
        ours_out = model(**sample_inputs()).logits
        torch.manual_seed(5)
        assert max_diff(ours_out, twin(**sample_inputs()).logits) <= 1e-5
    model.eval()
    assert not torch.equal(logits(model), ours_out)  # dropout acted in training only


def test_merge_is_exact_idempotent_and_matches_numpy(kind):
    model, handle = ours(kind)
    adapted = logits(model)
    originals = {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(model)}
    tensors = {k: v.numpy() for k, v in handle.state_dict().items()}
    handle.merge()
    assert max_diff(logits(model), adapted) <= 1e-5
    method = DoraMethod()
    for path, layer in lora_layers(model):
        prefix = f"{path}.dora."
        mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = method.merged_weight(path, handle.targets[path], handle.config, mine, originals[path].numpy())
        assert np.abs(layer.base_layer.weight.detach().numpy() - expected).max() <= 1e-6
    handle.method.merge(model, handle.name)  # a second merge is a no-op
    assert max_diff(logits(model), adapted) <= 1e-5
    with handle.disabled():
        assert torch.equal(logits(model), logits(BUILDERS[kind]()))
    handle.unmerge()
    assert all(torch.equal(layer.base_layer.weight, originals[p]) for p, layer in lora_layers(model))
    assert max_diff(logits(model), adapted) <= 1e-5


def test_peft_folder_reads_applies_and_writes_back_exactly(kind, tmp_path):
    """A DoRA adapter saved by PEFT itself (init_lora_weights=False, magnitudes changed)."""
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, init_lora_weights=False,
                             fan_in_fan_out=kind == "gpt2")
    model = peft.get_peft_model(BUILDERS[kind](), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    reference = logits(peft.PeftModel.from_pretrained(BUILDERS[kind](), str(tmp_path / "peft")).eval())

    adapter = adapterkit.load(tmp_path / "peft")
    assert adapter.method == "dora" and adapterkit.validate(tmp_path / "peft").valid
    assert sum(k.endswith(".dora.magnitude") for k in adapter.tensors) == len(adapter.targets)
    applied = logits(adapterkit.apply(adapter, BUILDERS[kind]()))
    print(f"\n{kind}: PEFT DoRA folder applied by adapterkit: max diff {max_diff(applied, reference):.3g}")
    assert max_diff(applied, reference) <= 1e-5

    adapterkit.save(adapter, tmp_path / "back", format="peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    adapterkit.save(adapter, tmp_path / "native")
    again = adapterkit.load(tmp_path / "native")
    assert again.method == "dora" and all(np.array_equal(again.tensors[k], v) for k, v in adapter.tensors.items())


def test_our_adapter_loads_in_peft(kind, tmp_path):
    model, handle = ours(kind, seed=3)
    expected = logits(model)
    adapterkit.save(handle.to_adapter(), tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["fan_in_fan_out"] == (kind == "gpt2")
    loaded = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(tmp_path / "peft")).eval()
    print(f"\n{kind}: adapterkit DoRA loaded by PEFT: max diff {max_diff(logits(loaded), expected):.3g}")
    assert max_diff(logits(loaded), expected) <= 1e-5


def test_streaming_merge_into_a_base_folder(tiny_base_dirs, tmp_path):
    """``merge_into_base`` uses DoraMethod.merged_weight: the merged folder gives the adapted logits."""
    from transformers import AutoModelForCausalLM

    from adapterkit.core.ops.merge import merge_into_base

    model, handle = ours("llama")
    expected = logits(model)
    out = merge_into_base(handle.to_adapter(), tiny_base_dirs["llama"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(logits(merged), expected) <= 1e-5


def test_dora_merge_orientation():
    rng = np.random.default_rng(0)
    weight, delta, m = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.uniform(1, 2, size=6)
    merged = dora_merge(weight, delta, m)
    assert np.allclose(np.linalg.norm(merged, axis=1), m)  # each output row ends with norm m
    conv = dora_merge(weight.T, delta.T, m, conv1d=True)
    assert np.allclose(conv, merged.T)


def test_lora_and_dora_adapters_are_independent():
    model = BUILDERS["llama"]()
    base = logits(model)
    lora = adapterkit.inject(model, "lora", r=2, target_modules=["q_proj"], name="plain")
    dora = adapterkit.inject(model, "dora", r=2, target_modules=["q_proj", "v_proj"], name="decomposed")
    perturb(lora.parameters(), seed=1)
    perturb(dora.parameters(), seed=2)
    both = logits(model)
    with dora.disabled():
        only_lora = logits(model)
        with lora.disabled():
            assert torch.equal(logits(model), base)
    assert not torch.equal(only_lora, both) and not torch.equal(only_lora, base)
    assert set(lora.state_dict()) == {k.replace(".dora.", ".lora.") for k in dora.state_dict()
                                      if "q_proj" in k and not k.endswith("magnitude")}
    with pytest.raises(UsageError, match="also holds"):
        lora.method.unload(model)


def test_validate_expects_the_magnitude(tmp_path):
    _, handle = ours("llama")
    path = adapterkit.save(handle.to_adapter(), tmp_path / "a")
    assert adapterkit.validate(path).valid
    manifest = json.loads((path / "adapter.json").read_text())
    assert manifest["method"]["name"] == "dora"
    method = DoraMethod()
    target = {"kind": "conv1d", "shape": [32, 96], "r": 4, "alpha": 8}
    assert method.expected_tensors("h.0.c_attn", target, {}) == {
        "h.0.c_attn.dora.A": (4, 32), "h.0.c_attn.dora.B": (96, 4), "h.0.c_attn.dora.magnitude": (96,)}


def test_peft_refusals(tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    peft.get_peft_model(BUILDERS["llama"](), config).save_pretrained(tmp_path / "dora")
    folder = tmp_path / "dora"
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": False}))
    with pytest.raises(LossyConversionError, match="DoRA magnitude"):
        adapterkit.load(folder)
    from safetensors.numpy import load_file, save_file

    (folder / "adapter_config.json").write_text(json.dumps(settings))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    save_file({**tensors, key: tensors[key][:-1]}, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    with pytest.raises(Exception, match="one value per output"):
        adapterkit.load(folder)
    save_file({k: v for k, v in tensors.items() if k != key}, str(folder / "adapter_model.safetensors"),
              {"format": "pt"})
    with pytest.raises(FormatError, match="no DoRA magnitude"):
        adapterkit.load(folder)


def test_peft_writer_refuses_other_methods(tmp_path: Path):
    _, handle = ours("llama")
    adapter = handle.to_adapter()
    adapter.manifest.method = "ia3"
    with pytest.raises(LossyConversionError, match="ia3"):
        adapterkit.save(adapter, tmp_path / "x", format="peft")
