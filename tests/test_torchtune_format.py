"""The torchtune format against the real torchtune: its own PEFT export of our file equals the source PEFT
adapter, its LoRA model loads our file and gives PEFT's logits, and its own checkpoints round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("torchtune")

from models import sample_inputs, tiny_llama  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torchtune.models.convert_weights import (  # noqa: E402
    hf_to_tune,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.llama2 import lora_llama2  # noqa: E402
from torchtune.modules.peft import (  # noqa: E402
    get_adapter_state_dict,
    get_lora_module_names,
    validate_missing_and_unexpected_for_lora,
)

import adapterkit  # noqa: E402
from adapterkit.core.adapter import Adapter  # noqa: E402
from adapterkit.core.base_model import targets_fingerprint  # noqa: E402
from adapterkit.core.errors import FormatError, LossyConversionError, UnsafeFileError  # noqa: E402
from adapterkit.core.manifest import Manifest  # noqa: E402
from adapterkit.core.plugins import Registry, get_plugin_manager  # noqa: E402
from adapterkit.plugins import torchtune_format  # noqa: E402
from adapterkit.plugins.torchtune_names import hf_to_meta, meta_to_hf  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = {"num_heads": 4, "num_kv_heads": 2, "dim": 32, "head_dim": 8}  # models.tiny_llama


@pytest.fixture(scope="module")
def reg() -> Registry:
    plugins = [("torchtune", torchtune_format)]
    return Registry(*get_plugin_manager(plugins=plugins, only={"adapterkit", "lora", "torchtune"}))


def peft_case(seed: int = 0, **lora: object) -> tuple[Adapter, np.ndarray, dict[str, torch.Tensor]]:
    """A random PEFT LoRA on the tiny llama: (canonical adapter, PEFT logits, PEFT state dict)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**lora)).eval()
    generator = torch.Generator().manual_seed(seed)
    targets, tensors = {}, {}
    with torch.no_grad():
        for path, layer in model.named_modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
                b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
                module = path.removeprefix("base_model.model.")
                targets[module] = {"kind": "linear", "shape": list(layer.base_layer.weight.shape),
                                   "r": layer.r["default"], "alpha": layer.lora_alpha["default"]}
                tensors[f"{module}.lora.A"], tensors[f"{module}.lora.B"] = a.numpy().copy(), b.numpy().copy()
        logits = model(input_ids=sample_inputs()["input_ids"]).logits.numpy()
    config = {"r": lora["r"], "alpha": lora["lora_alpha"], "target_modules": lora["target_modules"]}
    manifest = Manifest(method="lora", config=config, targets=targets, dtype="float32", task="causal-lm",
                        base_model={"name": "tiny-llama", "fingerprint": targets_fingerprint(targets)})
    return Adapter(manifest, tensors), logits, peft.get_peft_model_state_dict(model)


def load_pt(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "adapter_model.pt", weights_only=True)


def tune_model(attn: list[str], mlp: bool, output: bool, rank: int, alpha: float):
    return lora_llama2(attn, mlp, output, vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                       max_seq_len=64, intermediate_dim=64, norm_eps=1e-6, lora_rank=rank, lora_alpha=alpha).eval()


def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    for field in ("config", "targets", "dtype", "base_model", "task"):
        assert getattr(got.manifest, field) == getattr(want.manifest, field), field
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, array in want.tensors.items():
        assert got.tensors[key].dtype == array.dtype and got.tensors[key].tobytes() == array.tobytes(), key


def test_torchtune_peft_export_of_our_file_is_the_source(tiny_base_dirs, tmp_path, reg):
    adapter, _, want = peft_case(r=4, lora_alpha=8, target_modules=ALL)
    out = adapterkit.save(adapter, tmp_path / "tt", format="torchtune", registry=reg, base=tiny_base_dirs["llama"])
    ours = load_pt(out)
    names = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")
    assert set(ours) == {f"layers.{i}.{m}.lora_{w}.weight" for i in (0, 1) for w in "ab" for m in names}
    # torchtune keeps q/k in Meta's rotary order: the rows of B differ from PEFT's
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(ours["layers.0.attn.q_proj.lora_b.weight"], want[q_b])
    exported = tune_to_peft_adapter_weights(ours, **HEADS)
    assert sorted(exported) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((out / "adapter_config.json").read_text())
    config.pop("adapterkit")
    recipe = {"r": 4, "lora_alpha": 8, "peft_type": "LORA",
              "target_modules": get_lora_module_names(["q_proj", "k_proj", "v_proj", "output_proj"], True, False)}
    assert config == tune_to_peft_adapter_config(recipe, base_model_name_or_path="tiny-llama")
    assert adapterkit.detect_format(out, registry=reg) == "torchtune"
    assert_same_adapter(adapterkit.load(out, format="torchtune", registry=reg, base=tiny_base_dirs["llama"]), adapter)


@pytest.fixture(scope="module")
def mixed():
    """Last block only, gate/down without up, per-module ranks and alphas (scale ratios 2, 3, 1.5)."""
    return peft_case(seed=1, r=4, lora_alpha=8, target_modules=[n for n in ALL if n != "up_proj"],
                     layers_to_transform=[1], rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 24, "down_proj": 12})


def test_torchtune_model_loads_our_file_and_gives_peft_logits(mixed, tiny_base_dirs, tmp_path, reg):
    adapter, want, _ = mixed
    out = adapterkit.save(adapter, tmp_path / "tt", format="torchtune", registry=reg, base=tiny_base_dirs["llama"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    attn = ["q_proj", "k_proj", "v_proj", "output_proj"]
    model = tune_model(attn, True, False, config["r"], config["lora_alpha"])
    base_missing, base_unexpected = model.load_state_dict(hf_to_tune(tiny_llama().state_dict(), **HEADS), strict=False)
    lora_missing, lora_unexpected = model.load_state_dict(load_pt(out), strict=False)
    validate_missing_and_unexpected_for_lora(attn, True, False, base_missing, base_unexpected,
                                             lora_missing, lora_unexpected)
    with torch.no_grad():
        got = model(sample_inputs()["input_ids"]).numpy()
        base_logits = tiny_llama()(input_ids=sample_inputs()["input_ids"]).logits.numpy()
    assert np.abs(want - base_logits).max() > 0.1  # the adapter matters
    assert np.abs(got - want).max() < 1e-4
    # fill-ins (layer 0, and up_proj of layer 1) have B = 0
    assert not load_pt(out)["layers.0.attn.q_proj.lora_b.weight"].any()
    assert not load_pt(out)["layers.1.mlp.w3.lora_b.weight"].any()


def test_folded_modules_keep_their_delta_and_round_trip(mixed, tiny_base_dirs, tmp_path, reg):
    adapter, _, want = mixed
    out = adapterkit.save(adapter, tmp_path / "tt", format="torchtune", registry=reg, base=tiny_base_dirs["llama"])
    exported = tune_to_peft_adapter_weights(load_pt(out), **HEADS)
    for module, target in adapter.targets.items():
        key = f"base_model.model.{module}.lora_"
        a, b = exported[key + "A.weight"].double(), exported[key + "B.weight"].double()
        ours = (8 / 4) * b @ a
        theirs = (target["alpha"] / target["r"]) * want[key + "B.weight"].double() @ want[key + "A.weight"].double()
        assert (ours - theirs).abs().max() < 1e-6, module
    back = adapterkit.load(out, format="torchtune", registry=reg, base=tiny_base_dirs["llama"])
    assert not back.warnings
    assert_same_adapter(back, adapter)


@pytest.fixture(scope="module")
def native(tiny_base_dirs, tmp_path_factory):
    """A checkpoint folder as torchtune's FullModelHFCheckpointer writes it (adapter_model.pt, PEFT copy, config)."""
    torch.manual_seed(3)
    model = tune_model(["q_proj", "v_proj"], False, True, 4, 16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    state = get_adapter_state_dict(model.state_dict())
    folder = tmp_path_factory.mktemp("native") / "epoch_0"
    folder.mkdir()
    torch.save(state, folder / "adapter_model.pt")
    peft_copy = tune_to_peft_adapter_weights(state, **HEADS)
    save_file(peft_copy, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    recipe = {"r": 4, "lora_alpha": 16, "peft_type": "LORA",
              "target_modules": get_lora_module_names(["q_proj", "v_proj"], False, True)}
    with open(folder / "adapter_config.json", "w") as handle:
        json.dump(tune_to_peft_adapter_config(recipe, base_model_name_or_path=str(tiny_base_dirs["llama"])), handle)
    return folder


def test_reading_torchtune_matches_torchtune_peft_export(native, reg):
    # the folder also holds torchtune's PEFT copy, so detection leaves it to the peft format
    assert not torchtune_format.TorchtuneFormat().detect(native)
    adapter = adapterkit.load(native, format="torchtune", registry=reg)  # base from base_model_name_or_path
    peft_copy = dict(adapterkit.core.safetensors_io.load(native / "adapter_model.safetensors")[0])
    assert len(adapter.targets) == 5 and all(t["r"] == 4 and t["alpha"] == 16 for t in adapter.targets.values())
    for module in adapter.targets:
        for which in "AB":
            got = adapter.tensors[f"{module}.lora.{which}"]
            assert got.tobytes() == peft_copy[f"base_model.model.{module}.lora_{which}.weight"].tobytes(), module
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert adapter.config == {"r": 4, "alpha": 16, "target_modules": ["lm_head", *modules]}


def test_torchtune_round_trip_is_exact(native, tiny_base_dirs, tmp_path, reg):
    adapter = adapterkit.load(native / "adapter_model.pt", format="torchtune", registry=reg)
    out = adapterkit.save(adapter, tmp_path / "tt", format="torchtune", registry=reg)  # base from the manifest name
    got, want = load_pt(out), load_pt(native)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    config.pop("adapterkit")
    assert config == json.loads((native / "adapter_config.json").read_text())


def test_meta_order_is_torchtunes():
    b = torch.randn(32, 3)
    hf = torch.from_numpy(meta_to_hf(b.numpy(), 4, 8))
    assert torch.equal(hf, tune_to_peft_adapter_weights({"layers.0.attn.q_proj.lora_b.weight": b}, **HEADS)[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert np.array_equal(hf_to_meta(hf.numpy(), 4, 8), b.numpy())


def test_refusals(native, tiny_base_dirs, tmp_path, reg):
    pt_only = tmp_path / "pt_only"
    pt_only.mkdir()
    (pt_only / "adapter_model.pt").write_bytes((native / "adapter_model.pt").read_bytes())
    assert adapterkit.detect_format(pt_only, registry=reg) == "torchtune"
    with pytest.raises(FormatError, match="does not store alpha") as info:
        adapterkit.load(pt_only, registry=reg, base=tiny_base_dirs["llama"])
    assert info.value.code == "alpha_missing"
    with pytest.raises(FormatError, match="head counts") as info:
        adapterkit.load(pt_only, registry=reg, alpha=16)
    assert info.value.code == "base_missing"
    adapter = adapterkit.load(pt_only, registry=reg, alpha=16, base=tiny_base_dirs["llama"])
    assert adapter.targets["lm_head"]["alpha"] == 16

    dora = tmp_path / "dora"
    dora.mkdir()
    torch.save({**load_pt(native), "layers.0.attn.q_proj.magnitude": torch.ones(32)}, dora / "adapter_model.pt")
    with pytest.raises(FormatError, match="DoRA"):
        adapterkit.load(dora, registry=reg, alpha=16, base=tiny_base_dirs["llama"])

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"layers.0.attn.q_proj.lora_a.weight": Payload()}, evil / "adapter_model.pt")
    with pytest.raises(UnsafeFileError):
        adapterkit.load(evil, format="torchtune", registry=reg, alpha=16)
    assert not marker.exists()

    embed = Manifest(method="lora", config={}, dtype="float32",
                     targets={"model.embed_tokens": {"kind": "linear", "shape": [128, 32], "r": 2, "alpha": 2}})
    tensors = {"model.embed_tokens.lora.A": np.zeros((2, 32), np.float32),
               "model.embed_tokens.lora.B": np.zeros((128, 2), np.float32)}
    with pytest.raises(LossyConversionError, match="cannot adapt"):
        adapterkit.save(Adapter(embed, tensors), tmp_path / "e", format="torchtune", registry=reg,
                        base=tiny_base_dirs["llama"])
    with pytest.raises(FormatError, match="needs the base") as info:
        adapterkit.save(Adapter(embed, tensors), tmp_path / "f", format="torchtune", registry=reg)
    assert info.value.code == "base_missing"
