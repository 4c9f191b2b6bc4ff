"""The native adapterkit folder: deterministic bytes, bit-exact round trips, refusal of invalid adapters."""

from __future__ import annotations

import hashlib
import json

import ml_dtypes
import numpy as np
import pytest

import adapterkit
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.manifest import MANIFEST_NAME
from adapterkit.core.store.native import TENSOR_FILE
from helpers import bits, llama_targets, make_lora_adapter, read_manifest, write_adapter

FILES = (MANIFEST_NAME, TENSOR_FILE)


def file_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def rich_adapter(dtype: str = "float32", seed: int = 0):
    return make_lora_adapter(
        dtype=dtype, seed=seed, task="causal-lm",
        base_model={"name": "tiny", "model_type": "llama", "architecture": "LlamaForCausalLM", "num_parameters": 12345},
        provenance={"created_by": "tests", "created_at": "2025-01-01T00:00:00Z", "training": {"steps": 3}},
        annotations={"org.example.owner": "ünïcode"},
    )


# ---- determinism -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_saving_twice_gives_identical_bytes(tmp_path, dtype):
    a = adapterkit.save(rich_adapter(dtype), tmp_path / "a")
    b = adapterkit.save(rich_adapter(dtype), tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    assert file_bytes(a) == file_bytes(b)


def test_tensor_and_target_insertion_order_does_not_change_the_bytes(tmp_path):
    adapter = rich_adapter()
    shuffled = rich_adapter()
    shuffled.tensors = dict(reversed(list(shuffled.tensors.items())))
    shuffled.manifest.targets = dict(reversed(list(shuffled.manifest.targets.items())))
    shuffled.manifest.config = dict(reversed(list(shuffled.manifest.config.items())))
    a = adapterkit.save(adapter, tmp_path / "a")
    b = adapterkit.save(shuffled, tmp_path / "b")
    assert file_bytes(a) == file_bytes(b)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_load_then_save_gives_identical_bytes(tmp_path, dtype):
    first = adapterkit.save(rich_adapter(dtype), tmp_path / "first")
    second = adapterkit.save(adapterkit.load(first), tmp_path / "second")
    third = adapterkit.save(adapterkit.load(second), tmp_path / "third")
    assert file_bytes(first) == file_bytes(second) == file_bytes(third)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_tensors_round_trip_bit_exact(tmp_path, dtype):
    adapter = rich_adapter(dtype)
    key = "model.layers.0.self_attn.q_proj.lora.B"
    special = adapter.tensors[key].copy()
    info = np.finfo(special.dtype) if dtype != "bfloat16" else ml_dtypes.finfo(ml_dtypes.bfloat16)
    flat = special.reshape(-1)
    flat[:6] = [0.0, -0.0, info.max, info.min, info.smallest_subnormal, -info.smallest_normal]
    adapter.tensors[key] = special
    loaded = adapterkit.load(adapterkit.save(adapter, tmp_path / "x"))
    assert sorted(loaded.tensors) == sorted(adapter.tensors)
    for name, array in adapter.tensors.items():
        assert loaded.tensors[name].dtype == array.dtype
        assert bits(loaded.tensors[name]) == bits(array), name


def test_manifest_round_trips(tmp_path):
    adapter = rich_adapter()
    loaded = adapterkit.load(adapterkit.save(adapter, tmp_path / "x"))
    want = adapter.manifest.to_dict()
    got = loaded.manifest.to_dict()
    assert got.pop("tensors") and want.pop("tensors") == {}
    assert got == want


# ---- what is written -----------------------------------------------------------

def test_adapter_json_is_canonical(tmp_path):
    folder = write_adapter(tmp_path)
    raw = (folder / MANIFEST_NAME).read_bytes()
    assert raw.endswith(b"}\n") and b"\r" not in raw
    data = json.loads(raw)
    assert raw == (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    # only what is not a default
    assert "version" not in data["method"]
    assert not {"task", "provenance", "annotations"} & set(data)


def test_manifest_records_size_and_sha256_of_the_tensor_file(tmp_path):
    folder = write_adapter(tmp_path)
    data = (folder / TENSOR_FILE).read_bytes()
    assert read_manifest(folder)["tensors"] == {
        TENSOR_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    }


def test_tensor_file_is_sorted_and_readable_by_the_safetensors_library(tmp_path):
    import safetensors.numpy as safetensors_numpy
    adapter = make_lora_adapter()
    folder = adapterkit.save(adapter, tmp_path / "x")
    header = safetensors_io.read_header(folder / TENSOR_FILE)
    assert list(header.tensors) == sorted(adapter.tensors)
    assert header.metadata == {"format": "pt"}
    theirs = safetensors_numpy.load_file(str(folder / TENSOR_FILE))
    for key, array in adapter.tensors.items():
        assert bits(theirs[key]) == bits(array)


def test_load_sets_source(tmp_path):
    folder = write_adapter(tmp_path)
    adapter = adapterkit.load(folder)
    assert adapter.source == folder and adapter.source_format == "adapterkit"
    assert adapterkit.detect_format(folder) == "adapterkit"


def test_detect_format_of_unknown_things(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(adapterkit.FormatError) as info:
        adapterkit.detect_format(tmp_path / "empty")
    assert info.value.code == "unknown_format"
    with pytest.raises(adapterkit.FormatError) as info:
        adapterkit.load(tmp_path / "missing")
    assert info.value.code == "missing_file"


# ---- refusing to write -----------------------------------------------------------

def test_existing_destination_is_refused_and_overwrite_replaces_it(tmp_path):
    folder = write_adapter(tmp_path)
    before = file_bytes(folder)
    with pytest.raises(adapterkit.AdapterkitError) as info:
        adapterkit.save(make_lora_adapter(seed=1), folder)
    assert info.value.code == "output_exists"
    assert file_bytes(folder) == before
    adapterkit.save(make_lora_adapter(seed=1), folder, overwrite=True)
    assert file_bytes(folder) != before
    assert adapterkit.validate(folder).valid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    "spoil, needle",
    [
        (lambda a: a.tensors.pop("model.layers.0.self_attn.q_proj.lora.A"), "expected tensor is missing"),
        (lambda a: a.tensors.update({"x.lora.A": np.ones((1, 1), np.float32)}), "unexpected tensor"),
        (lambda a: a.config.update(r=0), "minimum"),
        (lambda a: a.targets["model.layers.0.self_attn.q_proj"].update(alpha=float("nan")), "alpha"),
        (lambda a: setattr(a.manifest, "dtype", "float16"), "dtype"),
        (lambda a: a.tensors["model.layers.0.self_attn.q_proj.lora.B"].fill(np.inf), "NaN or infinite"),
        (lambda a: setattr(a.manifest, "method", "nosuch"), "unknown method"),
    ],
)
def test_invalid_adapters_are_refused_and_nothing_is_written(tmp_path, spoil, needle):
    adapter = make_lora_adapter()
    spoil(adapter)
    with pytest.raises(adapterkit.AdapterkitError) as info:
        adapterkit.save(adapter, tmp_path / "out")
    assert needle in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_more_targets_round_trip(tmp_path):
    targets = llama_targets(layers=range(2), r=2, alpha=4)
    targets["model.layers.0.self_attn.q_proj"]["r"] = 8  # per-module rank
    adapter = make_lora_adapter(targets=targets, config={"r": 2, "alpha": 4, "rank_pattern": {"layers.0.self_attn.q_proj": 8}})
    loaded = adapterkit.load(adapterkit.save(adapter, tmp_path / "x"))
    assert loaded.tensors["model.layers.0.self_attn.q_proj.lora.A"].shape == (8, 32)
    assert loaded.targets == targets


# ---- with torch: inject -> to_adapter -> save -> load -> apply ---------------------------

def test_torch_round_trip_is_deterministic_and_reproduces_outputs(tmp_path):
    import torch
    from models import sample_inputs, tiny_llama

    injected = adapterkit.inject(tiny_llama(), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for param in injected.parameters():
            param.normal_(0, 0.1)  # B starts at zero; make the adapter do something
        inputs = sample_inputs()
        want = injected.model(**inputs).logits
    adapter = injected.to_adapter(provenance={"created_at": "2025-01-01T00:00:00Z"})
    a = adapterkit.save(adapter, tmp_path / "a")
    b = adapterkit.save(adapterkit.load(a), tmp_path / "b")
    assert file_bytes(a) == file_bytes(b)
    assert adapterkit.validate(a).valid
    model = adapterkit.apply(adapterkit.load(a), tiny_llama())
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.equal(got, want)
