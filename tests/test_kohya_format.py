"""The kohya format plugin against sd-scripts' layout (networks/lora.py, networks/lora_anima.py).

Files are built here the way sd-scripts names them: ``create_modules`` walks the
text encoder's root (an LLM's inner ``.model``), and for every Linear child of an
attention / MLP block writes ``(prefix + "." + name + "." + child).replace(".", "_")``.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file  # what sd-scripts' save_weights uses (torch flavour): 0-dim alpha stays 0-dim

import adapterkit
from adapterkit.core.format import safetensors_io
from adapterkit.core.errors import FormatError, LossyConversionError
from adapterkit.plugins import kohya
from adapterkit.plugins.lora import LoraMethod
from helpers import make_lora_adapter, registry_with

METADATA = {
    "ss_network_module": "networks.lora_anima", "ss_network_dim": "4", "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"train_llm_adapter": "False"}), "sshs_model_hash": "0123abcd",
    "sshs_legacy_hash": "89ab", "modelspec.sai_model_spec": "1.0.0", "modelspec.title": "tiny",
}


@pytest.fixture(scope="module")
def registry():
    return registry_with(("kohya", kohya))


@pytest.fixture(scope="module")
def te_modules():
    """sd-scripts lora name -> (module path in the causal LM, in, out) for the tiny llama as a text encoder."""
    import torch
    from models import tiny_llama

    root = tiny_llama().model  # anima_utils.load_qwen3_text_encoder: AutoModelForCausalLM(...).model
    out = {}
    for name, module in root.named_modules():
        if module.__class__.__name__ in ("LlamaAttention", "LlamaMLP"):  # TEXT_ENCODER_TARGET_REPLACE_MODULE
            for child, sub in module.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    lora_name = f"lora_te.{name}.{child}".replace(".", "_")
                    out[lora_name] = (f"model.{name}.{child}", sub.in_features, sub.out_features)
    return out


@pytest.fixture(scope="module")
def te_names(te_modules):
    return {name: (fan_in, fan_out) for name, (_, fan_in, fan_out) in te_modules.items()}


def kohya_file(path, names, r=4, dtype=np.float16, alpha=2.0, seed=0, metadata=METADATA):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (fan_in, fan_out) in sorted(names.items()):
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((r, fan_in)) * 0.1).astype(dtype)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((fan_out, r)) * 0.1).astype(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=dtype)  # save_weights casts alpha too
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_round_trip_is_byte_identical(tmp_path, te_names, registry):
    file = kohya_file(tmp_path / "anima_te.safetensors", te_names)
    assert adapterkit.detect_format(file, registry=registry) == "kohya"
    adapter = adapterkit.load(file, registry=registry)
    assert "model.layers.0.self_attn.q_proj" in adapter.targets and "model.layers.1.mlp.down_proj" in adapter.targets
    assert adapter.targets["model.layers.0.mlp.gate_proj"] == {"kind": "linear", "shape": [64, 32], "r": 4, "alpha": 2}
    assert adapter.manifest.dtype == "float16"
    native = adapterkit.save(adapter, tmp_path / "native", registry=registry)  # the manifest is schema-valid
    out = adapterkit.save(adapterkit.load(native, registry=registry), tmp_path / "out", format="kohya", registry=registry)
    written = out / "anima_te.safetensors"
    original, meta = safetensors_io.load(file)
    again, meta_again = safetensors_io.load(written)
    assert meta_again == meta == METADATA
    assert set(again) == set(original)
    for key, array in original.items():
        assert again[key].dtype == array.dtype and again[key].shape == array.shape, key  # alpha stays 0-dim
        assert again[key].tobytes() == array.tobytes(), key


def test_missing_and_zero_alpha_mean_rank(tmp_path, te_names, registry):
    file = kohya_file(tmp_path / "a.safetensors", te_names, r=4, alpha=None)
    tensors, meta = safetensors_io.load(file)
    tensors["lora_te_layers_0_self_attn_q_proj.alpha"] = np.array(0, dtype=np.float16)
    tensors["lora_te_layers_0_self_attn_k_proj.alpha"] = np.array(8, dtype=np.float16)
    save_file(tensors, str(file), metadata=meta)
    adapter = adapterkit.load(file, registry=registry)
    assert adapter.targets["model.layers.0.self_attn.q_proj"]["alpha"] == 4  # 0 -> r
    assert adapter.targets["model.layers.0.self_attn.v_proj"]["alpha"] == 4  # missing -> r
    assert adapter.targets["model.layers.0.self_attn.k_proj"]["alpha"] == 8
    out = adapterkit.save(adapter, tmp_path / "out", format="kohya", registry=registry)
    again, _ = safetensors_io.load(out / "a.safetensors")
    assert set(again) == set(tensors)  # still missing where it was missing
    assert again["lora_te_layers_0_self_attn_q_proj.alpha"] == 0


def test_integer_alpha_as_diffusers_writes_it(tmp_path, te_names, registry):
    """diffusers' convert_state_dict_to_kohya saves alpha = torch.tensor(len(down)): an int64 r."""
    file = kohya_file(tmp_path / "i.safetensors", te_names, alpha=None, metadata={})
    tensors, _ = safetensors_io.load(file)
    for name in te_names:
        tensors[f"{name}.alpha"] = np.array(4, dtype=np.int64)
    save_file(tensors, str(file))
    adapter = adapterkit.load(file, registry=registry)
    assert {t["alpha"] for t in adapter.targets.values()} == {4}
    out = adapterkit.save(adapter, tmp_path / "out", format="kohya", registry=registry)
    again, _ = safetensors_io.load(out / "i.safetensors")
    assert all(again[k].dtype == v.dtype and again[k].tobytes() == v.tobytes() for k, v in tensors.items())


def test_delta_w_is_sd_scripts_math(tmp_path, te_names, te_modules, registry):
    """sd-scripts: out = org + lora_up(lora_down(x)) * multiplier * alpha / lora_dim."""
    file = kohya_file(tmp_path / "d.safetensors", te_names, r=4, dtype=np.float32, alpha=3.0)
    raw, _ = safetensors_io.load(file)
    adapter = adapterkit.load(file, registry=registry)
    method = LoraMethod()
    assert set(adapter.targets) == {module for module, _, _ in te_modules.values()}
    for name, (module, _, _) in te_modules.items():
        down, up = raw[f"{name}.lora_down.weight"].astype(np.float64), raw[f"{name}.lora_up.weight"].astype(np.float64)
        alpha = float(raw[f"{name}.alpha"])
        want = up @ down * (alpha / down.shape[0])
        got = method.delta_weight(module, adapter.targets[module], adapter.config, adapter.tensors)
        assert np.allclose(got, want, atol=1e-6), name


def test_names_with_and_without_base(tmp_path, te_names, tiny_base_dirs, registry):
    file = kohya_file(tmp_path / "n.safetensors", te_names)
    plain = adapterkit.load(file, registry=registry)
    with_base = adapterkit.load(file, registry=registry, base=tiny_base_dirs["llama"])
    assert plain.targets == with_base.targets
    assert plain.warnings and not with_base.warnings
    assert with_base.manifest.provenance["converted_from"]["roots"] == {"lora_te": "model"}


def tiny_base(folder, modules):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["ToyForCausalLM"]}))
    safetensors_io.save(folder / "model.safetensors", {f"{m}.weight": np.zeros((8, 8), np.float32) for m in modules})
    return folder


def test_ambiguous_names(tmp_path, registry):
    file = kohya_file(tmp_path / "x.safetensors", {"lora_te_layers_0_my_proj": (8, 8)})
    with pytest.raises(FormatError, match="cannot tell where 'my' begins") as error:
        adapterkit.load(file, registry=registry)
    assert error.value.code == "ambiguous_name" and "--base" in error.value.hint
    base = tiny_base(tmp_path / "base", ["model.layers.0.my_proj", "model.norm_out"])
    adapter = adapterkit.load(file, registry=registry, base=base)
    assert list(adapter.targets) == ["model.layers.0.my_proj"]

    clash = kohya_file(tmp_path / "y.safetensors", {"lora_te_a_b_c": (8, 8)})
    base2 = tiny_base(tmp_path / "base2", ["model.a_b.c", "model.a.b_c"])
    with pytest.raises(FormatError, match="several modules") as error:
        adapterkit.load(clash, registry=registry, base=base2)
    assert error.value.found == ["model.a.b_c", "model.a_b.c"]
    with pytest.raises(FormatError, match="no module of the base"):
        adapterkit.load(file, registry=registry, base=base2)


def test_clip_and_multi_prefix_files(tmp_path, registry):
    names = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (8, 16),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (8, 8),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (8, 16),
    }
    file = kohya_file(tmp_path / "sdxl.safetensors", names, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    adapter = adapterkit.load(file, registry=registry)
    assert set(adapter.targets) == {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
        "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    }
    out = adapterkit.save(adapter, tmp_path / "out", format="kohya", registry=registry)
    assert set(safetensors_io.load(out / "sdxl.safetensors")[0]) == set(safetensors_io.load(file)[0])

    single = kohya_file(tmp_path / "sd1.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_out_proj": (8, 8)})
    assert list(adapterkit.load(single, registry=registry).targets) == ["text_model.encoder.layers.0.self_attn.out_proj"]


def test_write_from_a_peft_style_adapter(tmp_path, registry):
    adapter = make_lora_adapter(dtype="float16")  # tiny llama q/v, r 4, alpha 8
    adapter.manifest.targets["model.layers.1.self_attn.v_proj"]["alpha"] = 2049  # not a float16
    out = adapterkit.save(adapter, tmp_path / "k", format="kohya", registry=registry)
    tensors, meta = safetensors_io.load(out / "lora.safetensors")
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "Dynamic"}
    assert tensors["lora_te_layers_0_self_attn_q_proj.alpha"].dtype == np.float16
    assert tensors["lora_te_layers_1_self_attn_v_proj.alpha"].dtype == np.float32  # f16 would round 2049
    assert tensors["lora_te_layers_0_self_attn_q_proj.lora_down.weight"].tobytes() == \
        adapter.tensors["model.layers.0.self_attn.q_proj.lora.A"].tobytes()
    back = adapterkit.load(out, registry=registry)
    assert back.targets == adapter.targets
    assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())

    odd = make_lora_adapter(dtype="bfloat16")
    odd.tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in odd.tensors.items()}
    odd.manifest.targets["model.layers.0.self_attn.q_proj"]["alpha"] = 0.1
    with pytest.raises(LossyConversionError, match="round_alpha"):
        adapterkit.save(odd, tmp_path / "odd", format="kohya", registry=registry)
    out = adapterkit.save(odd, tmp_path / "odd2", format="kohya", registry=registry, round_alpha=True)
    assert safetensors_io.load(out / "lora.safetensors")[0]["lora_te_layers_0_self_attn_q_proj.alpha"] == np.float32(0.1)

    rs = make_lora_adapter(config={"r": 4, "alpha": 8, "use_rslora": True})
    out = adapterkit.save(rs, tmp_path / "rs", format="kohya", registry=registry, prefix="lora_te1", root="")
    tensors, _ = safetensors_io.load(out / "lora.safetensors")
    assert tensors["lora_te1_model_layers_0_self_attn_q_proj.alpha"] == 16  # 8 * sqrt(4): alpha/r == 8/sqrt(4)


def test_refuses_what_plain_lora_cannot_hold(tmp_path, registry):
    base = {"lora_te_layers_0_self_attn_q_proj": (8, 8)}
    for extra, match in ((".dora_scale", "DoRA"), (".hada_w1_a", "LoHa")):
        file = kohya_file(tmp_path / f"f{match}.safetensors", base)
        tensors, meta = safetensors_io.load(file)
        tensors["lora_te_layers_0_self_attn_q_proj" + extra] = np.ones((1, 8), np.float16)
        save_file(tensors, str(file), metadata=meta)
        with pytest.raises(LossyConversionError, match=match):
            adapterkit.load(file, registry=registry)
    conv = tmp_path / "conv.safetensors"
    safetensors_io.save(conv, {
        "lora_unet_conv_in.lora_down.weight": np.ones((4, 8, 3, 3), np.float16),
        "lora_unet_conv_in.lora_up.weight": np.ones((8, 4, 1, 1), np.float16),
    })
    with pytest.raises(LossyConversionError, match="Conv2d"):
        adapterkit.load(conv, registry=registry)


def test_detect(tmp_path, te_names, registry):
    fmt = registry.format("kohya")
    file = kohya_file(tmp_path / "k.safetensors", te_names)
    assert fmt.detect(file) and fmt.detect(tmp_path)
    native = adapterkit.save(make_lora_adapter(), tmp_path / "native", registry=registry)
    assert not fmt.detect(native) and not fmt.detect(native / "adapter.safetensors")
    assert not fmt.detect(tmp_path / "missing.safetensors")
