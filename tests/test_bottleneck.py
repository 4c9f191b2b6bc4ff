"""Bottleneck adapters on tiny llama / gpt2 / bert: config, math, training, disable, save-apply, errors.

Parity with AdapterHub itself (seq_bn, double_seq_bn, par_bn on BERT, Llama and GPT-2)
is in test_adapterhub_format.py, which runs the real ``adapters`` library.
"""

from __future__ import annotations

import pytest

import torch
import transformers  # noqa: F401

import adapterkit  # noqa: E402
import adapterkit.plugins.bottleneck as bottleneck_plugin  # noqa: E402
from adapterkit.core.errors import BaseModelError, UsageError  # noqa: E402
from adapterkit.core.plugin.registry import Registry, default_registry, get_plugin_manager  # noqa: E402
from adapterkit.core.runtime.inject import attached  # noqa: E402
from adapterkit.plugins.bottleneck.config import bottleneck_size, minimal, validate_config  # noqa: E402
from adapterkit.plugins.bottleneck.layer import BottleneckSite, sites  # noqa: E402
from adapterkit.plugins.bottleneck.method import MERGE_REFUSAL, BottleneckMethod  # noqa: E402
from adapterkit.testing import MethodConformance, perturb  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402


def registry() -> Registry:
    """The installed plugins, plus this one while it is not an entry point yet."""
    installed = default_registry()
    if "bottleneck" in installed.methods:
        return installed
    return Registry(*get_plugin_manager(plugins=[("bottleneck", bottleneck_plugin)]))


REG = registry()
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def inject(model, name: str = "default", **config):
    return adapterkit.inject(model, "bottleneck", config, name=name, registry=REG)


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or sample_inputs())).logits


class TestBottleneckConformance(MethodConformance):
    method = "bottleneck"
    registry = REG
    configs = {
        "llama": {"preset": "seq_bn", "reduction_factor": 4},
        "gpt2": {"preset": "double_seq_bn", "ln_before": True, "ln_after": True, "scaling": "learned"},
        "bert": {"preset": "par_bn", "scaling": "channel", "leave_out": [0]},
    }


# ---- config ----------------------------------------------------------------------

def test_presets_fill_adapterhub_defaults():
    seq, double, par = (validate_config({"preset": p}) for p in ("seq_bn", "double_seq_bn", "par_bn"))
    assert (seq["attention_adapter"], seq["ffn_adapter"], seq["original_ln_before"], seq["non_linearity"]) == (
        False, True, True, "relu")
    assert (double["attention_adapter"], double["original_ln_before"], double["non_linearity"]) == (True, False, "swish")
    assert (par["parallel"], par["scaling"], par["reduction_factor"], par["init_weights"]) == (True, 4.0, 2, "mam_adapter")
    assert validate_config({"mh_adapter": True, "is_parallel": False})["attention_adapter"] is True  # AdapterHub names


def test_minimal_config_is_relative_to_the_preset():
    config = validate_config({"preset": "double_seq_bn", "non_linearity": "relu"})
    written = minimal(config)
    assert written == {"non_linearity": "relu", "preset": "double_seq_bn"}  # relu is the global default, not the preset's
    assert validate_config(written) == config
    assert minimal(validate_config({})) == {}


@pytest.mark.parametrize("bad, where", [
    ({"reduction_factr": 4}, "reduction_factr"), ({"preset": "lora"}, "preset"), ({"reduction_factor": 0}, "reduction_factor"),
    ({"non_linearity": "softsign"}, "non_linearity"), ({"scaling": "per_token"}, "scaling"),
    ({"attention_adapter": False, "ffn_adapter": False}, "ffn_adapter"), ({"dropout": 1.0}, "dropout"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"residual_before_ln": "post_add", "original_ln_before": False}, "residual_before_ln"),
    ({"leave_out": [-1]}, "leave_out"), ({"init_weights": "zeros"}, "init_weights"),
])
def test_bad_config_names_the_field(bad, where):
    with pytest.raises(UsageError) as info:
        validate_config(bad)
    assert where in (info.value.location or "")
    assert info.value.hint


def test_bottleneck_width():
    assert bottleneck_size(validate_config({}), 32, 0) == 2
    assert bottleneck_size(validate_config({"reduction_factor": 64}), 32, 0) == 1  # at least 1, as AdapterHub
    assert bottleneck_size(validate_config({"bottleneck_size": 5}), 32, 0) == 5
    per_layer = validate_config({"reduction_factor": {"1": 4, "default": 16}})
    assert [bottleneck_size(per_layer, 32, i) for i in (0, 1)] == [2, 8]


def test_schema_and_code_agree_on_examples():
    import jsonschema

    method = BottleneckMethod()
    validator = jsonschema.Draft202012Validator(method.config_schema())
    good = {"preset": "par_bn", "reduction_factor": {"0": 4, "default": 8}, "scaling": "learned",
            "residual_before_ln": "post_add", "ln_before": True, "leave_out": [1]}
    assert not list(validator.iter_errors(good)) and validate_config(good)
    for bad in ({"scaling": "x"}, {"reduction_factor": -1}, {"non_linearity": "nope"}, {"extra": 1}):
        assert list(validator.iter_errors(bad))
        with pytest.raises(UsageError):
            validate_config(bad)


# ---- placement and targets --------------------------------------------------------------

@pytest.mark.parametrize("kind, attention, ffn", [
    ("llama", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"),
    ("gpt2", "transformer.h.0.ln_1", "transformer.h.0.ln_2"),
    ("bert", "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.output.LayerNorm"),
])
def test_targets_are_the_sites_layer_norms(kind, attention, ffn):
    model = BUILDERS[kind]()
    paths_before = [name for name, _ in model.named_modules()]
    handle = inject(model, preset="double_seq_bn", reduction_factor=8)
    assert handle.targets[attention] == {"kind": "block", "site": "attention", "shape": [32], "size": 4}
    assert handle.targets[ffn]["site"] == "ffn" and len(handle.targets) == 4
    state = handle.state_dict()
    params = ("down.weight", "down.bias", "up.weight", "up.bias")
    assert set(state) == {f"{m}.bottleneck.{p}" for m in handle.targets for p in params}
    assert state[f"{ffn}.bottleneck.down.weight"].shape == (4, 32)
    paths_after = [name for name, module in model.named_modules() if not _inside_site(name, model)]
    assert paths_after == paths_before  # nothing of the model was moved or renamed


def _inside_site(name: str, model) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[: i + 1])), BottleneckSite) for i in range(len(parts)))


def test_leave_out_and_per_layer_width():
    handle = inject(BUILDERS["llama"](), reduction_factor={"1": 4, "default": 16}, leave_out=[0])
    target = {"kind": "block", "site": "ffn", "shape": [32], "size": 8}
    assert handle.targets == {"model.layers.1.post_attention_layernorm": target}


# ---- the math, checked by hand on one layer ----------------------------------------------------

def _layer_io(model, layer, norm):
    """(residual r, block output) of one decoder layer, captured with hooks."""
    seen = {}
    hooks = [norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[0])),
             layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))]
    logits(model)
    for hook in hooks:
        hook.remove()
    return seen["r"], seen["out"]


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
def test_gpt2_ffn_adapter_math(preset):
    """GPT-2 (pre-LN): the block's output is r + h + A(x) with x = h + r (seq_bn), h (double_seq_bn), r (par_bn)."""
    model = BUILDERS["gpt2"]()
    mlp_out = {}
    model.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: mlp_out.__setitem__("h", out))
    r, _ = _layer_io(model, model.transformer.h[0], model.transformer.h[0].ln_2)
    h = mlp_out["h"]
    handle = inject(model, preset=preset, attention_adapter=False, leave_out=[1])
    perturb(handle.parameters(), seed=1)
    _, out = _layer_io(model, model.transformer.h[0], model.transformer.h[0].ln_2)
    p = {k.split(".bottleneck.")[1]: v for k, v in handle.state_dict().items()}
    x = {"seq_bn": h + r, "double_seq_bn": h, "par_bn": r}[preset]
    act = torch.relu if preset != "double_seq_bn" else torch.nn.functional.silu
    scale = 4.0 if preset == "par_bn" else 1.0
    adapter = (act(x @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"]) * scale
    assert torch.allclose(out, r + h + adapter, atol=1e-6)


def test_bert_seq_bn_math():
    """BERT (post-LN), Pfeiffer: LN(h + A(LN(h + r)) + r) with the block's own LayerNorm."""
    model = BUILDERS["bert"]()
    block = model.bert.encoder.layer[0].output
    handle = inject(model, leave_out=[1], ln_after=True)
    perturb(handle.parameters(), seed=2)
    seen = {}  # hooks registered after the adapter's, so they see its result
    block.dropout.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))
    block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    block.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[1]))
    logits(model)
    h, r, out = seen["h"], seen["r"], seen["out"]
    p = {k.split(".bottleneck.")[1]: v for k, v in handle.state_dict().items()}
    x = block.LayerNorm(h + r)
    up = torch.relu(x @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"]
    adapted = torch.nn.functional.layer_norm(up, (32,), p["ln_after.weight"], p["ln_after.bias"], 1e-5) + h
    assert torch.allclose(out, block.LayerNorm(adapted + r), atol=1e-6)


# ---- life cycle -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_disable_unload_and_fresh_apply(kind):
    model, inputs = BUILDERS[kind](), sample_inputs()
    base = logits(model, inputs)
    handle = inject(model, preset="double_seq_bn")
    perturb(handle.parameters())
    adapted = logits(model, inputs)
    assert (adapted - base).abs().max() > 1e-4
    with handle.disabled():
        assert torch.equal(logits(model, inputs), base)
    fresh = adapterkit.apply(handle.to_adapter(), BUILDERS[kind](), registry=REG)
    assert torch.equal(logits(fresh, inputs), adapted)
    handle.method.unload(model)
    assert not sites(model) and not attached(model)
    assert torch.equal(logits(model, inputs), base)
    assert not any(".bottleneck_" in name for name, _ in model.named_parameters())


def test_merge_is_refused_with_the_reason():
    handle = inject(BUILDERS["llama"]())
    from adapterkit.core.plugin.capabilities import can_merge

    assert not can_merge(handle.method)
    assert "non-linearity" in handle.method.merge_refusal(handle.config) == MERGE_REFUSAL
    with pytest.raises(NotImplementedError, match="non-linearity"):
        handle.merge()


def test_two_adapters_stack_and_keep_their_own_tensors():
    model, inputs = BUILDERS["bert"](), sample_inputs()
    first = inject(model, name="a")
    perturb(first.parameters(), seed=1)
    one = logits(model, inputs)
    second = inject(model, name="b", preset="par_bn")
    perturb(second.parameters(), seed=2)
    assert not torch.equal(logits(model, inputs), one)
    assert first.state_dict().keys() == second.state_dict().keys()  # same targets, separate adapters
    assert {id(p) for p in first.parameters()}.isdisjoint(id(p) for p in second.parameters())
    with pytest.raises(UsageError, match="already"):
        inject(model, name="a")


def test_lora_and_bottleneck_live_together():
    model, inputs = BUILDERS["llama"](), sample_inputs()
    lora = adapterkit.inject(model, "lora", r=4, target_modules="all-linear", name="l")
    bottleneck = inject(model, name="b", preset="double_seq_bn")
    assert all(".bottleneck_" not in path for path in lora.targets)  # all-linear leaves our weights alone
    perturb(lora.parameters(), seed=1)
    perturb(bottleneck.parameters(), seed=2)
    expected = logits(model, inputs)
    fresh = adapterkit.apply(lora.to_adapter(), BUILDERS["llama"](), name="l")
    fresh = adapterkit.apply(bottleneck.to_adapter(), fresh, name="b", registry=REG)
    assert torch.equal(logits(fresh, inputs), expected)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    def grads(checkpointing: bool):
        model = BUILDERS[kind]()
        handle = inject(model, preset="double_seq_bn", ln_after=True)
        perturb(handle.parameters(), seed=4)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs
        model(**sample_inputs()).logits.pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        return [p.grad for p in handle.parameters()]

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None and g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# ---- errors ---------------------------------------------------------------------------------------------

def test_apply_to_the_wrong_model_is_refused():
    adapter = inject(BUILDERS["llama"]()).to_adapter()
    with pytest.raises(BaseModelError):
        adapterkit.apply(adapter, BUILDERS["gpt2"](), registry=REG)
    wide = adapterkit.inject(BUILDERS["llama"](), "bottleneck", registry=REG).to_adapter()
    path = next(iter(wide.targets))
    wide.manifest.targets[path]["shape"] = [64]
    with pytest.raises(BaseModelError, match="shape"):
        adapterkit.apply(wide, BUILDERS["llama"](), registry=REG)


def test_post_add_needs_a_post_ln_model():
    with pytest.raises(UsageError, match="post-LN"):
        inject(BUILDERS["llama"](), residual_before_ln="post_add")
    inject(BUILDERS["bert"](), residual_before_ln="post_add")  # fine where the block has its own LayerNorm


def test_model_without_transformer_layers_is_refused():
    with pytest.raises(UsageError, match="found no transformer layer"):
        inject(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_validate_with_base(tmp_path, tiny_base_dirs):
    handle = inject(BUILDERS["llama"](), preset="par_bn")
    path = adapterkit.save(handle.to_adapter(), tmp_path / "a", registry=REG)
    assert adapterkit.validate(path, base=tiny_base_dirs["llama"], registry=REG).valid
    report = adapterkit.validate(path, base=tiny_base_dirs["gpt2"], registry=REG)
    assert not report.valid
