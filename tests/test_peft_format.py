"""The PEFT format plugin against the real PEFT: read, write back, round trips, refusals.

Adapters are made by PEFT itself on tiny models, so the tests check the real
layout (keys, config fields, fan_in_fan_out, subfolders, .bin) and compare
logits through PEFT and through adapterkit's own injection.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch
import peft
import safetensors.numpy as safetensors_numpy

import adapterkit  # noqa: E402
from adapterkit.core.errors import (  # noqa: E402
    FormatError, LossyConversionError, TensorFileError, UnsafeFileError,
)
from adapterkit.plugins.peft import PeftFormat  # noqa: E402
from adapterkit.plugins.peft.rules import selects  # noqa: E402
from adapterkit.plugins.peft.selection import exact_regex  # noqa: E402
from helpers import bits, make_lora_adapter  # noqa: E402
from models import BUILDERS, sample_inputs  # noqa: E402

FMT = PeftFormat()
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# name -> (model kind, LoraConfig options, dtype of the saved adapter)
CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}, "float32"),
    "patterns": ("llama", {
        "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.05,
        "rank_pattern": {"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"v_proj": 3, "layers.0.self_attn.q_proj": 5},
    }, "float32"),
    "rslora": ("llama", {"target_modules": ["q_proj", "o_proj", "up_proj"], "use_rslora": True, "lora_alpha": 12},
               "float32"),
    "layers": ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}, "float32"),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "task_type": "CAUSAL_LM"}, "float32"),
    "bf16": ("llama", {"target_modules": ["q_proj", "k_proj", "gate_proj"]}, "bfloat16"),
}


def peft_adapter(kind: str, options: dict, folder: Path, dtype: str = "float32", adapter_name: str = "default",
                 safe: bool = True) -> Path:
    """Train-free PEFT adapter with random non-zero A and B, saved by PEFT itself."""
    torch.manual_seed(7)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **options})
    model = peft.get_peft_model(BUILDERS[kind](seed=0), config, adapter_name=adapter_name)
    if dtype != "float32":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=safe)
    return folder / adapter_name if adapter_name != "default" else folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs()).logits.float()


def peft_logits(kind: str, folder: Path) -> torch.Tensor:
    """Logits of a fresh float32 base with the adapter folder loaded by PEFT."""
    return logits(peft.PeftModel.from_pretrained(BUILDERS[kind](seed=0), str(folder)).eval())


def peft_lora_layers(model) -> dict:
    """Module path -> PEFT LoRA layer holding adapter "default"."""
    return {
        name.removeprefix("base_model.model."): module for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, model kind, folder PEFT saved, reference logits through PEFT)."""
    kind, options, dtype = CASES[request.param]
    folder = peft_adapter(kind, options, tmp_path_factory.mktemp(request.param), dtype)
    return request.param, kind, folder, peft_logits(kind, folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    kind, options, dtype = CASES["llama"]
    return peft_adapter(kind, options, tmp_path_factory.mktemp("llama_base_case"), dtype)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    tensors = safetensors_numpy.load_file(str(folder / WEIGHTS))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


# ---- reading -------------------------------------------------------------------

def test_read_matches_peft_modules(case):
    name, kind, folder, _ = case
    adapter = FMT.read(folder)
    config = json.loads((folder / CONFIG).read_text())
    model = peft.PeftModel.from_pretrained(BUILDERS[kind](seed=0), str(folder))
    layers = peft_lora_layers(model)
    assert set(adapter.targets) == set(layers)
    rslora = bool(config.get("use_rslora"))
    for module, target in adapter.targets.items():
        layer = layers[module]
        assert target["r"] == layer.r["default"]
        assert target["alpha"] == layer.lora_alpha["default"]
        scale = target["alpha"] / (math.sqrt(target["r"]) if rslora else target["r"])
        assert scale == pytest.approx(layer.scaling["default"])
        assert target["shape"] == list(layer.get_base_layer().weight.shape)
        assert target["kind"] == ("conv1d" if kind == "gpt2" else "linear")
    assert adapter.manifest.dtype == CASES[name][2]
    assert adapter.manifest.provenance["converted_from"] == {"format": "peft", "config": config}
    assert adapter.manifest.base_model["fingerprint"].startswith("sha256:")
    if config.get("task_type") == "CAUSAL_LM":
        assert adapter.manifest.task == "causal-lm"


def test_read_is_byte_for_byte(case):
    _, _, folder, _ = case
    adapter = FMT.read(folder)
    original = safetensors_numpy.load_file(str(folder / WEIGHTS))
    assert len(original) == len(adapter.tensors)
    for key, array in original.items():
        module, which = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key).groups()
        ours = adapter.tensors[f"{module}.lora.{which}"]
        assert ours.dtype.itemsize == array.dtype.itemsize and ours.shape == array.shape
        assert ours.tobytes() == array.tobytes()


def test_manifest_config_follows_lora_conventions(tmp_path):
    folder = peft_adapter("llama", CASES["patterns"][1], tmp_path)
    config = FMT.read(folder).manifest.config
    assert config == {
        "r": 4, "dropout": 0.05, "target_modules": ["down_proj", "q_proj", "v_proj"],
        "rank_pattern": {"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"v_proj": 3, "layers.0.self_attn.q_proj": 5},
    }
    targets = FMT.read(folder).targets
    assert targets["model.layers.1.self_attn.q_proj"]["r"] == 6
    assert targets["model.layers.0.self_attn.q_proj"]["alpha"] == 5
    assert targets["model.layers.0.mlp.down_proj"] == {"kind": "linear", "shape": [32, 64], "r": 2, "alpha": 8}


# ---- writing back to PEFT --------------------------------------------------------

def test_write_back_is_exact(case, tmp_path):
    _, kind, folder, reference = case
    out = adapterkit.save(FMT.read(folder), tmp_path / "out", format="peft")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    assert (out / CONFIG).read_text() == (folder / CONFIG).read_text()
    ours, original = safetensors_numpy.load_file(str(out / WEIGHTS)), safetensors_numpy.load_file(str(folder / WEIGHTS))
    assert sorted(ours) == sorted(original)
    assert all(ours[k].dtype == original[k].dtype and ours[k].tobytes() == original[k].tobytes() for k in ours)
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), "np") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert max_diff(peft_logits(kind, out), reference) <= 1e-5


def test_native_round_trip(case, tmp_path):
    _, kind, folder, reference = case
    adapter = FMT.read(folder)
    adapterkit.save(adapter, tmp_path / "native")
    loaded = adapterkit.load(tmp_path / "native")
    assert loaded.manifest.targets == adapter.manifest.targets
    assert loaded.manifest.config == adapter.manifest.config
    assert loaded.manifest.provenance == adapter.manifest.provenance
    assert {k: bits(v) for k, v in loaded.tensors.items()} == {k: bits(v) for k, v in adapter.tensors.items()}
    out = adapterkit.save(loaded, tmp_path / "peft", format="peft")
    assert json.loads((out / CONFIG).read_text()) == json.loads((folder / CONFIG).read_text())
    assert max_diff(peft_logits(kind, out), reference) <= 1e-5


def test_write_without_peft_provenance(case, tmp_path):
    """An adapter that never was PEFT: config derived from the manifest, PEFT gives the same logits."""
    _, kind, folder, reference = case
    adapter = FMT.read(folder)
    adapter.manifest.provenance = {}
    adapter.manifest.config.pop("target_modules", None)  # "all-linear": the writer derives target_modules
    out = adapterkit.save(adapter, tmp_path / "out", format="peft")
    config = json.loads((out / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True and "peft_version" not in config
    for module in adapter.targets:
        assert selects(config, module)
    assert max_diff(peft_logits(kind, out), reference) <= 1e-5
    model = peft.PeftModel.from_pretrained(BUILDERS[kind](seed=0), str(out))
    assert set(peft_lora_layers(model)) == set(adapter.targets)


def test_apply_matches_peft(case):
    """adapterkit's own LoRA injection gives PEFT's logits."""
    _, kind, folder, reference = case
    model = adapterkit.apply(FMT.read(folder), BUILDERS[kind](seed=0))
    assert max_diff(logits(model), reference) <= 1e-5


def test_apply_to_eval_model_stays_in_eval_mode(tmp_path):
    """PEFT's from_pretrained gives an eval model; apply on an eval model must not switch dropout on."""
    folder = peft_adapter("llama", {"target_modules": ["q_proj"], "lora_dropout": 0.5}, tmp_path)
    model = adapterkit.apply(FMT.read(folder), BUILDERS["llama"](seed=0))
    training = sorted(name for name, module in model.named_modules() if module.training)
    assert not training, f"modules in training mode after apply on an eval model: {training[:3]}"


def test_most_common_rank_and_alpha_with_exceptions(tmp_path):
    adapter = FMT.read(peft_adapter("llama", CASES["patterns"][1], tmp_path / "src"))
    adapter.manifest.provenance = {}
    out = adapterkit.save(adapter, tmp_path / "out", format="peft")
    config = json.loads((out / CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {
        "model.layers.0.mlp.down_proj": 2, "model.layers.1.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 6,
    }
    assert config["alpha_pattern"] == {
        "model.layers.0.self_attn.q_proj": 5, "model.layers.0.self_attn.v_proj": 3, "model.layers.1.self_attn.v_proj": 3,
    }


def test_partial_targets_get_an_exact_regex(llama_folder, tmp_path):
    """Leaf names would also select layer 1's q_proj: the writer falls back to an exact regex."""
    adapter = FMT.read(llama_folder)
    dropped = "model.layers.1.self_attn.q_proj"
    del adapter.targets[dropped]
    del adapter.tensors[f"{dropped}.lora.A"], adapter.tensors[f"{dropped}.lora.B"]
    adapter.manifest.provenance = {}
    adapter.manifest.config.pop("target_modules")
    out = adapterkit.save(adapter, tmp_path / "out", format="peft")
    config = json.loads((out / CONFIG).read_text())
    assert isinstance(config["target_modules"], str)
    assert {m for m in [*adapter.targets, dropped] if re.fullmatch(config["target_modules"], m)} == set(adapter.targets)
    model = peft.PeftModel.from_pretrained(BUILDERS["llama"](seed=0), str(out)).eval()
    assert not hasattr(model.get_submodule(f"base_model.model.{dropped}"), "lora_A")
    reference = peft.PeftModel.from_pretrained(BUILDERS["llama"](seed=0), str(llama_folder)).eval()
    reference.get_submodule(f"base_model.model.{dropped}").lora_B["default"].weight.data.zero_()
    assert max_diff(logits(model), logits(reference)) <= 1e-5


def test_base_option_catches_over_selection(llama_folder, tmp_path, tiny_base_dirs):
    """A PEFT adapter with a module removed: the original target_modules would over-select."""
    adapter = FMT.read(llama_folder)
    dropped = "model.layers.0.mlp.down_proj"
    del adapter.targets[dropped]
    del adapter.tensors[f"{dropped}.lora.A"], adapter.tensors[f"{dropped}.lora.B"]
    without = adapterkit.save(adapter, tmp_path / "without", format="peft")
    assert sorted(json.loads((without / CONFIG).read_text())["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    with_base = adapterkit.save(adapter, tmp_path / "with", format="peft", base=tiny_base_dirs["llama"])
    target_modules = json.loads((with_base / CONFIG).read_text())["target_modules"]
    assert isinstance(target_modules, str) and not re.fullmatch(target_modules, dropped)


def test_exact_regex_and_pattern_rules():
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj",
               "lm_head", "encoder.block.0", "x.1.y.2.z"]
    regex = exact_regex(modules)
    assert all(re.fullmatch(regex, m) for m in modules)
    others = ["model.layers.2.self_attn.q_proj", "model.layers.1.mlp.up_proj", "encoder.block.1", "x.1.y.3.z", "lm_headX"]
    for other in others:
        assert not re.fullmatch(regex, other)
    assert adapterkit.pattern_value("model.layers.0.self_attn.v_proj", {"v_proj": 1, "proj": 2}, 0) == 1
    assert adapterkit.pattern_value("model.layers.11.self_attn.q_proj", {"layers.1.self_attn.q_proj": 1}, 0) == 0
    assert adapterkit.pattern_value("model.layers.0.self_attn.q_proj", {"q": 1}, 0) == 0


# ---- other PEFT layouts -----------------------------------------------------------

def test_named_adapter_subfolder(tmp_path):
    sub = peft_adapter("llama", {"target_modules": ["q_proj"]}, tmp_path / "saved", adapter_name="mine")
    assert sub == tmp_path / "saved" / "mine" and FMT.detect(sub) and not FMT.detect(tmp_path / "saved")
    assert set(FMT.read(sub).targets) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    with pytest.raises(FormatError, match=r"\['mine'\]"):
        FMT.read(tmp_path / "saved")


def test_bin_from_peft(tmp_path):
    folder = peft_adapter("gpt2", {"target_modules": ["c_attn"]}, tmp_path / "bin", safe=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / WEIGHTS).exists()
    assert FMT.detect(folder) and adapterkit.detect_format(folder) == "peft"
    state = torch.load(folder / "adapter_model.bin", weights_only=True)
    adapter = FMT.read(folder)
    for key, tensor in state.items():
        module, which = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key).groups()
        assert adapter.tensors[f"{module}.lora.{which}"].tobytes() == tensor.numpy().tobytes()
    out = adapterkit.save(adapter, tmp_path / "out", format="peft")
    assert max_diff(peft_logits("gpt2", out), peft_logits("gpt2", folder)) <= 1e-5


def test_bin_written_with_torch_save(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    tensors = safetensors_numpy.load_file(str(folder / WEIGHTS))
    torch.save({k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in tensors.items()}, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    adapter = FMT.read(folder)
    assert adapter.manifest.dtype == "bfloat16"
    key = next(iter(tensors))
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
    assert module in adapter.targets


class _Evil:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilOpen(_Evil):
    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("evil", [_Evil, _EvilOpen])
def test_malicious_bin_is_refused(llama_folder, tmp_path, evil):
    folder = copy_of(llama_folder, tmp_path)
    marker = tmp_path / "pwned"
    tensors = {k: torch.from_numpy(v.copy()) for k, v in safetensors_numpy.load_file(str(folder / WEIGHTS)).items()}
    torch.save({**tensors, "base_model.model.x.lora_A.weight": evil(marker)}, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    with pytest.raises(UnsafeFileError, match="adapter_model.bin") as info:
        FMT.read(folder)
    assert "safetensors" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"not a torch file at all", b"PK\x03\x04 truncated zip", b"\x80\x02 truncated"])
def test_garbage_bin_is_a_tensor_file_error(llama_folder, tmp_path, data):
    folder = copy_of(llama_folder, tmp_path)
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(data)
    with pytest.raises((TensorFileError, UnsafeFileError), match="adapter_model.bin") as info:
        FMT.read(folder)
    if not data.startswith(b"\x80"):
        assert isinstance(info.value, TensorFileError)


def test_config_without_peft_type(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    del config["peft_type"]
    (folder / CONFIG).write_text(json.dumps(config))
    assert FMT.detect(folder)
    assert len(FMT.read(folder).targets) == 6


def test_base_changing_init_warns(llama_folder, tmp_path):
    folder = copy_of(llama_folder, tmp_path)
    edit_config(folder, init_lora_weights="pissa")
    assert any("pissa" in w and "base" in w for w in FMT.read(folder).warnings)
    assert FMT.read(llama_folder).warnings == []


# ---- refusals ---------------------------------------------------------------------

CONFIG_REFUSALS = [
    ({"peft_type": "FOURIERFT"}, FormatError, r"\$\.peft_type.*no installed plugin reads PEFT FOURIERFT"),
    ({"use_dora": True}, FormatError, r"use_dora is true but .* no DoRA magnitude"),
    ({"modules_to_save": ["lm_head"]}, LossyConversionError, r"\$\.modules_to_save"),
    ({"bias": "all"}, LossyConversionError, r"\$\.bias.*biases"),
    ({"lora_bias": True}, LossyConversionError, r"\$\.lora_bias"),
    ({"rank_pattern": {"q_proj": 8}}, FormatError, r"rank_pattern.*q_proj.*expected 4, found 8"),
    ({"r": 0}, FormatError, r"\$\.r"),
    ({"target_modules": "(unclosed"}, FormatError, r"\$\.target_modules"),
]


@pytest.mark.parametrize("changes,error,pattern", CONFIG_REFUSALS, ids=[next(iter(c)) for c, _, _ in CONFIG_REFUSALS])
def test_config_refusals(llama_folder, tmp_path, changes, error, pattern):
    folder = copy_of(llama_folder, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(error, match=pattern) as info:
        FMT.read(folder)
    assert CONFIG in str(info.value) and info.value.hint


def _drop_b(tensors):
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def _drop_a(tensors):
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]


def _add(key, shape=(4, 32), dtype=np.float32):
    return lambda tensors: tensors.__setitem__(key, np.zeros(shape, dtype))


def _mixed(tensors):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key].astype(np.float16)


TENSOR_REFUSALS = [
    (_drop_b, FormatError, r"q_proj\.lora_A\.weight.*no matching lora_B"),
    (_drop_a, FormatError, r"v_proj\.lora_B\.weight.*no matching lora_A"),
    (_add("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128)), LossyConversionError,
     r"lora_embedding_A.*embedding"),
    (_add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (32,)), LossyConversionError, "DoRA"),
    (_add("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (32,)), LossyConversionError, "lora_bias"),
    (_add("base_model.model.lm_head.weight", (128, 32)), FormatError, r"lm_head\.weight: unknown tensor key"),
    (_add("model.layers.0.self_attn.k_proj.lora_A.weight"), FormatError, "base_model.model. prefix"),
    (_mixed, FormatError, "mixed dtypes"),
]


@pytest.mark.parametrize("edit,error,pattern", TENSOR_REFUSALS, ids=[
    "A-without-B", "B-without-A", "embedding", "dora", "lora-bias", "unknown", "no-prefix", "mixed-dtype"])
def test_tensor_refusals(llama_folder, tmp_path, edit, error, pattern):
    folder = copy_of(llama_folder, tmp_path)
    edit_tensors(folder, edit)
    with pytest.raises(error, match=pattern) as info:
        FMT.read(folder)
    assert WEIGHTS in str(info.value)


def test_real_seq_cls_adapter_with_modules_to_save_is_refused(tmp_path):
    """PEFT adds the classifier head to modules_to_save for SEQ_CLS: its weights would be lost."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    peft.get_peft_model(BUILDERS["bert"](seed=0), config).save_pretrained(tmp_path / "cls")
    with pytest.raises(LossyConversionError, match="modules_to_save"):
        FMT.read(tmp_path / "cls")


def test_writer_refusals(tmp_path):
    adapter = make_lora_adapter()
    adapter.manifest.method = "bottleneck"  # a method without a PEFT codec
    with pytest.raises(LossyConversionError, match="bottleneck"):
        FMT.write(adapter, tmp_path / "a")
    mixed = make_lora_adapter({
        "model.layers.0.self_attn.q_proj": {"kind": "linear", "shape": [32, 32], "r": 4, "alpha": 8},
        "transformer.h.0.attn.c_attn": {"kind": "conv1d", "shape": [32, 96], "r": 4, "alpha": 8},
    })
    with pytest.raises(LossyConversionError, match="fan_in_fan_out"):
        FMT.write(mixed, tmp_path / "b")
    extra = make_lora_adapter()
    extra.tensors["model.layers.0.self_attn.q_proj.lora.m"] = np.ones(32, np.float32)
    with pytest.raises(LossyConversionError, match=r"lora\.m"):
        FMT.write(extra, tmp_path / "c")
    embedding = make_lora_adapter({"model.embed_tokens": {"kind": "embedding", "shape": [128, 32], "r": 4, "alpha": 8}},
                                  tensors={})
    with pytest.raises(LossyConversionError, match="embedding"):
        FMT.write(embedding, tmp_path / "d")
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcd")


# ---- detection, registration, no torch ------------------------------------------------

def test_detect_never_raises(llama_folder, tmp_path):
    assert FMT.detect(llama_folder)
    assert not FMT.detect(llama_folder / CONFIG)
    assert not FMT.detect(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG).write_text("{not json")
    (bad / WEIGHTS).write_bytes(b"")
    assert not FMT.detect(bad)
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    (mlx / CONFIG).write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 8}}))
    (mlx / "adapters.safetensors").write_bytes(b"")
    assert not FMT.detect(mlx)
    other = copy_of(llama_folder, tmp_path)
    edit_config(other, peft_type="FOURIERFT")  # detected (so that reading says what would read it)
    assert FMT.detect(other)
    edit_config(other, peft_type=7)
    assert not FMT.detect(other)


def test_registered_and_auto_detected(llama_folder):
    assert isinstance(adapterkit.default_registry().format("peft"), PeftFormat)
    assert adapterkit.detect_format(llama_folder) == "peft"
    assert adapterkit.load(llama_folder).source_format == "peft"
    assert set(FMT.read(llama_folder / CONFIG).targets) == set(FMT.read(llama_folder).targets)


def test_convert_is_torch_free(llama_folder, tmp_path):
    """Reading and writing safetensors PEFT folders never imports torch."""
    code = (
        "import sys, adapterkit\n"
        "from adapterkit.plugins.peft import PeftFormat\n"
        f"a = PeftFormat().read({str(llama_folder)!r})\n"
        f"PeftFormat().write(a, {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / CONFIG).read_text() == (llama_folder / CONFIG).read_text()


def test_a_classification_adapter_is_written_so_that_peft_loads_it(tmp_path):
    """PEFT's SEQ_CLS model class trains the head with the adapter and requires it in the file (KeyError
    otherwise); adapterkit keeps the head in the base, so the folder says task_type null and PEFT loads it on the
    classifier model, giving adapterkit's logits."""
    from transformers import BertForSequenceClassification

    def classifier():
        return BertForSequenceClassification(BUILDERS["bert"](seed=0).config).eval()

    torch.manual_seed(0)
    model = classifier()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = adapterkit.inject(model, "lora", r=4, target_modules=["query", "value"])
    with torch.no_grad():
        for param in handle.parameters():
            param.normal_(0, 0.2)
    adapter = handle.to_adapter(task="sequence-classification")
    out = adapterkit.save(adapter, tmp_path / "peft", format="peft")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] is None
    inputs = {"input_ids": torch.tensor([[1, 5, 7, 9, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    fresh = classifier()
    fresh.load_state_dict(base_state)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(fresh, str(out)).eval()(**inputs).logits
        ours = model(**inputs).logits
    assert max_diff(theirs, ours) <= 1e-6
