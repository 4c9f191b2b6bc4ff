"""QLoRA (method ``qlora``): 4-bit base through bitsandbytes on CPU, LoRA on top.

Injection and the quantisation rule, training on a tiny llama, save -> load ->
apply onto a float model (deterministic quantisation: identical outputs),
validate, merge (in the model and into a base folder), the rounding error the
quantisation adds, PEFT folders, and the memory of the 4-bit weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import torch
import bitsandbytes as bnb

import adapterkit  # noqa: E402
from adapterkit.core.errors import BaseModelError, UsageError  # noqa: E402
from adapterkit.plugins.lora import quant  # noqa: E402
from adapterkit.plugins.lora.layer import LoraLayer, lora_layers  # noqa: E402
from adapterkit.plugins.lora.qlora import (  # noqa: E402
    QloraMethod, model_quantization_error, quantization_error, quantize_base,
)
from adapterkit.testing import perturb  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

LLAMA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs()).logits


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def quantized_paths(model) -> set[str]:
    """Paths of the 4-bit modules (a wrapped one is reported at the wrapper's path)."""
    out = set()
    for path, module in model.named_modules():
        if quant.is_quantized(module):
            out.add(path.removesuffix(".base_layer"))
    return out


def test_injection_quantises_every_linear_but_the_head():
    model = BUILDERS["llama"]()
    linears = {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p != "lm_head"}
    handle = adapterkit.inject(model, "qlora", **LLAMA)
    assert quantized_paths(model) == linears and isinstance(model.lm_head, torch.nn.Linear)
    assert not quant.is_quantized(model.lm_head)
    for path, layer in lora_layers(model):
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and path in handle.targets
        weight = layer.base_layer.weight
        assert (weight.quant_type, weight.blocksize, weight.compress_statistics) == ("nf4", 64, True)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in handle.parameters()}
    # the manifest records the quantisation, defaults included, and the float base's shapes
    adapter = handle.to_adapter()
    assert {k: adapter.config[k] for k in ("quant_type", "double_quant", "blocksize", "compute_dtype", "quantize")} == {
        "quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32", "quantize": "all-linear"}
    assert adapter.targets["model.layers.0.self_attn.v_proj"]["shape"] == [16, 32]


def test_quantize_targets_only_and_conv1d():
    model = BUILDERS["gpt2"]()
    handle = adapterkit.inject(model, "qlora", r=4, target_modules=["c_attn"], quantize="targets", quant_type="fp4")
    assert quantized_paths(model) == set(handle.targets) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    target = handle.targets["transformer.h.0.attn.c_attn"]
    assert target["kind"] == "conv1d" and target["shape"] == [32, 96]  # the float base's Conv1D, [in, out]
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (layer.base_layer.in_features, layer.base_layer.out_features) == (32, 96)
    assert layer.base_layer.weight.quant_type == "fp4"


def test_quantisation_matches_transformers_bitsandbytes_load(tiny_base_dirs):
    """Our 4-bit base is bit for bit what transformers' BitsAndBytesConfig loading makes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_base_dirs["llama"], quantization_config=config,
                                                  device_map="cpu", dtype=torch.float32)
    mine = BUILDERS["llama"]()
    quantize_base(mine, {})
    for path, module in theirs.named_modules():
        if quant.is_quantized(module):
            assert torch.equal(module.weight.data, mine.get_submodule(path).weight.data), path
    assert quantized_paths(theirs) == quantized_paths(mine)
    # an adapter applies onto their already-4-bit model and gives the same logits as on ours
    handle = adapterkit.inject(mine, "qlora", **LLAMA)
    perturb(handle.parameters())
    applied = adapterkit.apply(handle.to_adapter(), theirs)
    assert torch.equal(logits(applied), logits(mine))


def test_training_lowers_the_loss_and_changes_only_lora():
    torch.manual_seed(0)
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(handle.parameters(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\nQLoRA on a tiny 4-bit llama, 5 AdamW steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_save_load_apply_to_a_float_model_is_identical(tmp_path):
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA, blocksize=128, double_quant=False)
    perturb(handle.parameters())
    expected = logits(model)
    path = adapterkit.save(handle.to_adapter(), tmp_path / "a")
    report = adapterkit.validate(path)
    assert report.valid, [str(e) for e in report.errors]
    assert json.loads((path / "adapter.json").read_text())["method"]["config"]["blocksize"] == 128
    fresh = adapterkit.apply(adapterkit.load(path), BUILDERS["llama"]())  # float32: apply quantises it
    assert torch.equal(logits(fresh), expected)
    assert quantized_paths(fresh) == quantized_paths(model)
    # a base quantised with other settings is refused
    other = BUILDERS["llama"]()
    quantize_base(other, {"blocksize": 64})
    with pytest.raises(BaseModelError, match="other settings"):
        adapterkit.apply(adapterkit.load(path), other)


def test_merge_in_the_model_and_exact_unmerge():
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA)
    perturb(handle.parameters())
    adapted = logits(model)
    four_bit = {p: layer.base_layer for p, layer in lora_layers(model)}
    packed = {p: m.weight.data.clone() for p, m in four_bit.items()}
    handle.merge()
    assert max_diff(logits(model), adapted) <= 1e-5
    method = QloraMethod()
    for path, layer in lora_layers(model):
        assert type(layer.base_layer) is torch.nn.Linear  # dense: dequantised W + update
        tensors = {k: v.numpy() for k, v in handle.state_dict().items() if k.startswith(path + ".")}
        fp_weight = BUILDERS["llama"]().get_submodule(path).weight.detach().numpy()
        expected = method.merged_weight(path, handle.targets[path], handle.config, tensors, fp_weight)
        assert np.abs(layer.base_layer.weight.detach().numpy() - expected).max() <= 1e-6
    handle.unmerge()
    for path, layer in lora_layers(model):
        assert layer.base_layer is four_bit[path] and torch.equal(layer.base_layer.weight.data, packed[path])
    assert torch.equal(logits(model), adapted)
    handle.merge()
    model = handle.method.unload(model)  # merge + unload = a dense merged model
    assert max_diff(logits(model), adapted) <= 1e-5 and not lora_layers(model)


def test_quantization_error_is_reported():
    model = BUILDERS["llama"]()
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    nf4 = quantization_error(weight.numpy(), {})
    fp4 = quantization_error(weight, {"quant_type": "fp4"})
    for error in (nf4, fp4):
        assert 0 < error["mean_abs"] <= error["max_abs"] and 0 < error["relative_fro"] < 0.3
    assert nf4["relative_fro"] < fp4["relative_fro"]  # NF4 fits normally distributed weights better
    dequantised = quant.roundtrip(weight, quant.QuantSpec())
    assert abs(float((dequantised - weight).abs().max()) - nf4["max_abs"]) < 1e-7
    report = model_quantization_error(model, {})
    assert set(report["modules"]) == quantized_paths(_quantized_llama())
    print(f"\nNF4 rounding of the tiny llama: max |Q(W) - W| = {report['max_abs']:.4g}, "
          f"relative (Frobenius) {report['relative_fro']:.3%}")


def test_streaming_merge_into_a_base_folder(tiny_base_dirs, tmp_path):
    """``merge_into_base`` uses QloraMethod.merged_weight: Q(W) + update in float32."""
    from transformers import AutoModelForCausalLM

    from adapterkit.core.ops.merge import merge_into_base

    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA, quantize="targets")  # non-adapted layers stay float
    perturb(handle.parameters())
    out = merge_into_base(handle.to_adapter(), tiny_base_dirs["llama"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(logits(merged), logits(model)) <= 1e-5


def test_quantized_modules_of_a_base_folder(tiny_base_dirs):
    method = QloraMethod()
    modules = method.quantized_modules({}, tiny_base_dirs["llama"])
    assert set(modules) == quantized_paths(_quantized_llama())
    assert modules["model.layers.0.self_attn.k_proj"] == {"kind": "linear", "shape": [16, 32]}
    gpt2 = method.quantized_modules({"target_modules": ["c_attn"], "quantize": "targets"}, tiny_base_dirs["gpt2"])
    assert gpt2 == {f"transformer.h.{i}.attn.c_attn": {"kind": "conv1d", "shape": [32, 96]} for i in (0, 1)}


def _quantized_llama():
    model = BUILDERS["llama"]()
    quantize_base(model, {})
    return model


def test_peft_round_trip_keeps_the_quantisation(tmp_path):
    import peft

    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA, quant_type="fp4", blocksize=256)
    perturb(handle.parameters())
    adapter = handle.to_adapter()
    adapterkit.save(adapter, tmp_path / "peft", format="peft")
    back = adapterkit.load(tmp_path / "peft")
    assert back.method == "qlora" and back.config["quant_type"] == "fp4" and back.config["blocksize"] == 256
    assert all(np.array_equal(back.tensors[k], v) for k, v in adapter.tensors.items())
    assert torch.equal(logits(adapterkit.apply(back, BUILDERS["llama"]())), logits(model))
    # PEFT reads it as a plain LoRA: same A and B on its own (float or 4-bit) base
    loaded = peft.PeftModel.from_pretrained(BUILDERS["llama"](), str(tmp_path / "peft"))
    state = peft.get_peft_model_state_dict(loaded)
    assert set(state) == {f"base_model.model.{k.replace('.qlora.', '.lora_')}.weight" for k in adapter.tensors}
    # once PEFT saves it again, the record is gone: it reads as lora
    loaded.save_pretrained(tmp_path / "resaved")
    assert adapterkit.load(tmp_path / "resaved").method == "lora"


def test_bfloat16_compute_trains():
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA, compute_dtype="bfloat16")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in handle.parameters())  # LoRA trains in float32
    out = model(**sample_inputs(), labels=sample_inputs()["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and all(p.grad is not None for p in handle.parameters())


@pytest.mark.parametrize("options,pattern", [
    ({"quant_type": "int4"}, r"quant_type must be one of \['nf4', 'fp4'\]"),
    ({"blocksize": 48}, "blocksize must be one of"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"double_quant": "yes"}, "double_quant"),
    ({"quantize": "everything"}, "quantize"),
    ({"bnb_4bit_quant_type": "nf4"}, "did you mean 'quant_type'"),
    ({"lora_alpha": 16}, "did you mean 'alpha'"),
])
def test_config_errors(options, pattern):
    with pytest.raises(UsageError, match=pattern):
        adapterkit.inject(BUILDERS["llama"](), "qlora", target_modules=["q_proj"], **options)


def test_memory_ratio_of_the_4bit_weights():
    """Packed 4-bit data + quant state vs the float32 weights they replace (the benchmark does SmolLM2)."""
    model = BUILDERS["llama"]()
    float_bytes = {p: m.weight.numel() * 4 for p, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and p != "lm_head"}
    quantize_base(model, {})
    four_bit = {p: quant.quantized_bytes(model.get_submodule(p)) for p in float_bytes}
    ratio = sum(four_bit.values()) / sum(float_bytes.values())
    print(f"\ntiny llama (32-wide layers): 4-bit {sum(four_bit.values())} B / float32 "
          f"{sum(float_bytes.values())} B = {ratio:.3f}x (per-layer constants dominate at this size)")
    big = torch.nn.Linear(512, 512)
    layer = quant.quantize_module(big, "linear", quant.QuantSpec())
    big_ratio = quant.quantized_bytes(layer) / (big.weight.numel() * 4)
    print(f"one 512x512 layer: {big_ratio:.3f}x")
    assert big_ratio <= 0.3 and isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), bnb.nn.Linear4bit)


def test_wrapped_layer_reports_the_float_shape():
    model = BUILDERS["llama"]()
    adapterkit.inject(model, "qlora", **LLAMA)
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert isinstance(layer, LoraLayer) and (layer.in_features, layer.out_features) == (32, 16)
    assert layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (16, 4)


def test_onnx_merged_export(tiny_base_dirs, tmp_path):
    """prepare_export merges and stands dense Q(W) layers in for the 4-bit ones; ONNX Runtime verifies it."""
    from adapterkit.core.export.onnx import export_onnx

    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", **LLAMA)
    perturb(handle.parameters())
    export_onnx(handle.to_adapter(), tiny_base_dirs["llama"], tmp_path / "onnx")  # raises when ORT disagrees
    assert any((tmp_path / "onnx").iterdir())
