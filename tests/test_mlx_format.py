"""The mlx format against the real mlx-lm: a PEFT adapter converted to mlx gives PEFT's logits in mlx-lm,
and mlx-lm's own adapters round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx_lm  # noqa: F401
import peft

from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load_adapters, load_model  # noqa: E402
from models import sample_inputs, tiny_llama  # noqa: E402

import adapterkit  # noqa: E402
from adapterkit.core.format import safetensors_io  # noqa: E402
from adapterkit.core.format.adapter import Adapter  # noqa: E402
from adapterkit.core.format.base_model import targets_fingerprint  # noqa: E402
from adapterkit.core.errors import FormatError, LossyConversionError  # noqa: E402
from adapterkit.core.format.manifest import Manifest  # noqa: E402
from adapterkit.core.plugin.registry import Registry, get_plugin_manager  # noqa: E402
from adapterkit.plugins import mlx_format  # noqa: E402
from adapterkit.plugins.lora.method import LoraMethod  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry(*get_plugin_manager(plugins=[("mlx", mlx_format)], only={"adapterkit", "lora", "mlx"}))


def peft_case(seed: int = 0, **lora: object) -> tuple[Adapter, np.ndarray]:
    """A PEFT LoRA on the tiny llama with random A and B: (the same adapter in canonical form, PEFT's logits)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**lora)).eval()
    generator = torch.Generator().manual_seed(seed)
    targets, tensors = {}, {}
    with torch.no_grad():
        for path, layer in model.named_modules():
            if not isinstance(layer, peft.tuners.lora.LoraLayer):
                continue
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
            module = path.removeprefix("base_model.model.")
            targets[module] = {"kind": "linear", "shape": list(layer.base_layer.weight.shape),
                               "r": layer.r["default"], "alpha": layer.lora_alpha["default"]}
            tensors[f"{module}.lora.A"], tensors[f"{module}.lora.B"] = a.numpy().copy(), b.numpy().copy()
        logits = model(input_ids=sample_inputs()["input_ids"]).logits.numpy()
    config = {"r": lora["r"], "alpha": lora["lora_alpha"], "target_modules": lora["target_modules"]}
    if lora.get("use_rslora"):
        config["use_rslora"] = True
    manifest = Manifest(method="lora", config=config, targets=targets, dtype="float32", task="causal-lm",
                        base_model={"name": "tiny-llama", "fingerprint": targets_fingerprint(targets)})
    return Adapter(manifest, tensors), logits


def mlx_logits(base, adapter_dir) -> np.ndarray:
    model, _ = load_model(base)
    load_adapters(model, str(adapter_dir))
    return np.array(model(mx.array(sample_inputs()["input_ids"].numpy())))


@pytest.fixture(scope="module")
def mixed():
    """Last block only, per-module ranks and alphas (scale ratios 2, 3 and 1.5)."""
    return peft_case(r=4, lora_alpha=8, target_modules=ALL, layers_to_transform=[1],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 24, "down_proj": 12})


def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    for field in ("config", "targets", "dtype", "base_model", "task"):
        assert getattr(got.manifest, field) == getattr(want.manifest, field), field
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, array in want.tensors.items():
        assert got.tensors[key].dtype == array.dtype and got.tensors[key].tobytes() == array.tobytes(), key


def test_peft_adapter_gives_peft_logits_in_mlx_lm(mixed, tiny_base_dirs, tmp_path, reg):
    adapter, want = mixed
    out = adapterkit.save(adapter, tmp_path / "mlx", format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["fine_tune_type"] == "lora"
    params = config["lora_parameters"]
    assert params["rank"] == 4 and params["scale"] == 2
    assert params["keys"] == sorted(f"{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in ALL)
    tensors, metadata = safetensors_io.load(out / "adapters.safetensors")
    assert metadata == {"format": "mlx"}
    assert tensors["model.layers.1.self_attn.v_proj.lora_a"].shape == (32, 4)  # rank 2 padded to 4
    assert tensors["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 32)
    base_logits = tiny_llama()(input_ids=sample_inputs()["input_ids"]).logits.detach().numpy()
    assert np.abs(want - base_logits).max() > 0.1  # the adapter matters
    assert np.abs(mlx_logits(tiny_base_dirs["llama"], out) - want).max() < 1e-4
    assert adapterkit.detect_format(out, registry=reg) == "mlx"


def test_round_trip_through_mlx_is_exact(mixed, tiny_base_dirs, tmp_path, reg):
    adapter, _ = mixed
    out = adapterkit.save(adapter, tmp_path / "mlx", format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    back = adapterkit.load(out, format="mlx", registry=reg)
    assert not back.warnings
    assert_same_adapter(back, adapter)
    assert back.manifest.provenance["converted_from"]["format"] == "mlx"
    again = adapterkit.save(back, tmp_path / "again", format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    assert (again / "adapters.safetensors").read_bytes() == (out / "adapters.safetensors").read_bytes()


def test_lm_head_rslora_and_all_blocks_without_base(tiny_base_dirs, tmp_path, reg):
    adapter, want = peft_case(seed=1, r=2, lora_alpha=6, target_modules=["q_proj", "lm_head"], use_rslora=True)
    out = adapterkit.save(adapter, tmp_path / "mlx", format="mlx", registry=reg)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == -1 and config["lora_parameters"]["keys"] == ["lm_head", "self_attn.q_proj"]
    assert config["model"] == "tiny-llama" and config["lora_parameters"]["scale"] == 6 / 2**0.5
    assert np.abs(mlx_logits(tiny_base_dirs["llama"], out) - want).max() < 1e-4
    assert_same_adapter(adapterkit.load(out, format="mlx", registry=reg), adapter)


def test_unadapted_blocks_inside_num_layers_change_nothing(tiny_base_dirs, tmp_path, reg):
    # block 1 is inside num_layers=2 but not adapted: mlx-lm gives it LoRA layers with lora_b = 0
    adapter, want = peft_case(seed=2, r=4, lora_alpha=16, target_modules=["v_proj", "up_proj"], layers_to_transform=[0])
    out = adapterkit.save(adapter, tmp_path / "mlx", format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    assert json.loads((out / "adapter_config.json").read_text())["num_layers"] == 2
    assert np.abs(mlx_logits(tiny_base_dirs["llama"], out) - want).max() < 1e-4


@pytest.fixture(scope="module")
def native_mlx(tiny_base_dirs, tmp_path_factory):
    """An adapter made by mlx-lm itself: every linear of the last block, rank 4, scale 10."""
    base = tiny_base_dirs["llama"]
    model, _ = load_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 1, params)
    key = mx.random.key(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape, key=key) * 0.2, model.trainable_parameters()))
    folder = tmp_path_factory.mktemp("native") / "adapters"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params, "model": str(base),
              "batch_size": 4, "iters": 100, "learning_rate": 1e-5, "seed": 0}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return folder, model


def test_mlx_adapter_reads_with_mlx_math(native_mlx, reg):
    folder, model = native_mlx
    adapter = adapterkit.load(folder, registry=reg)  # detected; base found through config["model"]
    assert adapter.source_format == "mlx"
    assert len(adapter.targets) == 7 and all(t["r"] == 4 and t["alpha"] == 40 for t in adapter.targets.values())
    assert adapter.config["layers_to_transform"] == [1] and adapter.manifest.base_model["model_type"] == "llama"
    method = LoraMethod()
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_a"):
            continue
        want = np.array(layer.fuse().weight) - np.array(layer.linear.weight)
        got = method.delta_weight(name, adapter.targets[name], adapter.config, adapter.tensors)
        assert np.abs(got - want).max() < 1e-5, name


def test_mlx_round_trip_keeps_tensors_and_config(native_mlx, tmp_path, reg):
    folder, _ = native_mlx
    adapter = adapterkit.load(folder, format="mlx", registry=reg)
    out = adapterkit.save(adapter, tmp_path / "out", format="mlx", registry=reg)
    got, want = safetensors_io.load(out / "adapters.safetensors")[0], mx.load(str(folder / "adapters.safetensors"))
    assert sorted(got) == sorted(want)
    for key, array in got.items():
        assert array.tobytes() == np.array(want[key]).tobytes(), key
    config = json.loads((out / "adapter_config.json").read_text())
    record = config.pop("adapterkit")
    assert config == json.loads((folder / "adapter_config.json").read_text())  # no keys added, same num_layers
    assert record["version"] == 1


def test_edited_tensors_drop_the_record(mixed, tiny_base_dirs, tmp_path, reg):
    out = adapterkit.save(mixed[0], tmp_path / "mlx", format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    tensors, metadata = safetensors_io.load(out / "adapters.safetensors")
    tensors["model.layers.1.self_attn.q_proj.lora_b"] = tensors["model.layers.1.self_attn.q_proj.lora_b"] * 2
    safetensors_io.save(out / "adapters.safetensors", tensors, metadata)
    back = adapterkit.load(out, format="mlx", registry=reg)
    assert back.warnings and "ignored" in back.warnings[0]
    assert {(t["r"], t["alpha"]) for t in back.targets.values()} == {(4, 8)}  # mlx semantics: rank 4, scale 2


def test_refusals(mixed, native_mlx, tiny_base_dirs, tmp_path, reg):
    with pytest.raises(FormatError, match="number of blocks") as info:
        adapterkit.save(mixed[0], tmp_path / "a", format="mlx", registry=reg)
    assert info.value.code == "base_missing"

    gpt2 = Manifest(method="lora", config={}, dtype="float32",
                    targets={"transformer.h.0.attn.c_attn": {"kind": "conv1d", "shape": [32, 96], "r": 2, "alpha": 2}})
    tensors = {"transformer.h.0.attn.c_attn.lora.A": np.zeros((2, 32), np.float32),
               "transformer.h.0.attn.c_attn.lora.B": np.zeros((96, 2), np.float32)}
    with pytest.raises(LossyConversionError, match="nn.Linear"):
        adapterkit.save(Adapter(gpt2, tensors), tmp_path / "b", format="mlx", registry=reg)

    folder, _ = native_mlx

    def variant(name, edit_config=None, edit_tensors=None):
        target = tmp_path / name
        target.mkdir()
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors, metadata = safetensors_io.load(folder / "adapters.safetensors")
        if edit_config:
            edit_config(config)
        if edit_tensors:
            edit_tensors(tensors)
        (target / "adapter_config.json").write_text(json.dumps(config))
        safetensors_io.save(target / "adapters.safetensors", tensors, metadata)
        return target

    dora = variant("dora", edit_config=lambda c: c.update(fine_tune_type="dora"))
    with pytest.raises(FormatError, match="DoRA"):
        adapterkit.load(dora, format="mlx", registry=reg)
    magnitude = variant("m", edit_tensors=lambda t: t.update(
        {"model.layers.1.self_attn.q_proj.m": np.ones(32, np.float32)}))
    with pytest.raises(FormatError, match="DoRA"):
        adapterkit.load(magnitude, format="mlx", registry=reg)
    rank = variant("rank", edit_config=lambda c: c["lora_parameters"].update(rank=8))
    with pytest.raises(FormatError, match="rank"):
        adapterkit.load(rank, format="mlx", registry=reg)
    depth = variant("depth", edit_tensors=lambda t: t.update({
        "model.layers.0.self_attn.q_proj.lora_a": np.zeros((32, 4), np.float32),
        "model.layers.0.self_attn.q_proj.lora_b": np.zeros((4, 32), np.float32)}))
    head = variant("head", edit_tensors=lambda t: t.update({
        "lm_head.lora_a": np.zeros((32, 4), np.float32), "lm_head.lora_b": np.zeros((4, 128), np.float32)}))
    with pytest.raises(FormatError, match="lora_parameters.keys"):
        adapterkit.load(head, format="mlx", registry=reg)
    with pytest.raises(FormatError, match="outside the last num_layers"):
        adapterkit.load(depth, format="mlx", registry=reg, base=tiny_base_dirs["llama"])
    with pytest.raises(adapterkit.core.errors.UsageError, match="unknown option"):
        adapterkit.load(folder, format="mlx", registry=reg, alpha=3)
