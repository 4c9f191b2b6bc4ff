"""core/format/safetensors_io.py: interoperability with the safetensors library, determinism, strict header checks."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterkit.core.format import safetensors_io as sio
from adapterkit.core.errors import TensorFileError
from helpers import bits, raw_safetensors

import safetensors.numpy as safetensors_numpy

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype("<f4"),
        "f16": rng.standard_normal((4,)).astype("<f2"),
        "f64": rng.standard_normal((2, 2, 2)).astype("<f8"),
        "i64": rng.integers(-(2**40), 2**40, (3,)).astype("<i8"),
        "i32": rng.integers(-100, 100, (2, 3)).astype("<i4"),
        "i8": rng.integers(-100, 100, (5,)).astype("i1"),
        "u8": rng.integers(0, 255, (5,)).astype("u1"),
        "bool": rng.integers(0, 2, (3,)).astype("?"),
        "scalar": np.array(3.5, dtype="<f4"),
        "empty": np.zeros((0, 4), dtype="<f4"),
        "special": np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], dtype="<f4"),
    }


def assert_same(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert bits(ours[key]) == bits(theirs[key]), key


# ---- interoperability with the safetensors library ---------------------------------

def test_reads_files_written_by_safetensors_numpy(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "lib.safetensors"
    safetensors_numpy.save_file(arrays, str(path), metadata={"format": "np", "k": "v"})
    ours, metadata = sio.load(path)
    assert_same(ours, arrays)
    assert metadata == {"format": "np", "k": "v"}


def test_safetensors_numpy_reads_our_files(tmp_path):
    arrays = sample_arrays(1)
    path = tmp_path / "ours.safetensors"
    sio.save(path, arrays, {"format": "pt"})
    assert_same(safetensors_numpy.load_file(str(path)), arrays)


def test_torch_bfloat16_round_trips_with_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(4, 6, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(3, generator=generator).to(torch.float16),
        "f32": torch.randn(2, 3, generator=generator),
        "bf16_special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3e38]).to(torch.bfloat16),
    }
    theirs = tmp_path / "torch.safetensors"
    save_file(tensors, str(theirs))
    ours, _ = sio.load(theirs)
    assert ours["bf16"].dtype == BF16
    for key, tensor in tensors.items():
        expected = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = ours[key].view(np.int16) if ours[key].dtype == BF16 else ours[key]
        assert got.shape == tuple(tensor.shape) and got.tobytes() == expected.tobytes(), key

    back = tmp_path / "ours.safetensors"
    sio.save(back, ours)
    reloaded = load_file(str(back))
    for key, tensor in tensors.items():
        assert reloaded[key].dtype == tensor.dtype
        assert torch.equal(reloaded[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_float8_and_bfloat16_numpy_round_trip(tmp_path):
    arrays = {
        "bf16": np.array([1.5, -2.0, 0.0, np.nan], dtype=BF16),
        "e4m3": np.array([1.0, -0.5, 448.0], dtype=ml_dtypes.float8_e4m3fn),
        "e5m2": np.array([1.0, -0.5, 57344.0], dtype=ml_dtypes.float8_e5m2),
    }
    sio.save(tmp_path / "x.safetensors", arrays)
    header = sio.read_header(tmp_path / "x.safetensors")
    assert {k: v.dtype for k, v in header.tensors.items()} == {"bf16": "BF16", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
    assert_same(sio.load(tmp_path / "x.safetensors")[0], arrays)


# ---- the writer ------------------------------------------------------------------

def test_serialize_is_deterministic_and_order_independent():
    arrays = sample_arrays()
    reordered = dict(reversed(list(arrays.items())))
    assert sio.serialize(arrays, {"b": "2", "a": "1"}) == sio.serialize(reordered, {"a": "1", "b": "2"})


def test_serialize_layout_sorted_contiguous_aligned():
    data = sio.serialize({"b": np.ones(3, "<f4"), "a": np.zeros(2, "<f2")}, {"format": "pt"})
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert list(header) == ["__metadata__", "a", "b"]
    assert header["a"]["data_offsets"] == [0, 4] and header["b"]["data_offsets"] == [4, 16]
    assert len(data) == 8 + length + 16


def test_serialize_writes_non_contiguous_and_big_endian_arrays_correctly(tmp_path):
    base = np.arange(12, dtype="<f4").reshape(3, 4)
    arrays = {"t": base.T, "be": np.arange(5, dtype=">f4"), "slice": base[:, ::2]}
    sio.save(tmp_path / "x.safetensors", arrays)
    loaded, _ = sio.load(tmp_path / "x.safetensors")
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
        assert loaded[key].dtype.byteorder in "<=|"
    assert sio.read_header(tmp_path / "x.safetensors").tensors["be"].dtype == "F32"


def test_loaded_arrays_are_writable_copies(tmp_path):
    sio.save(tmp_path / "x.safetensors", {"a": np.ones(3, "<f4")})
    array = sio.load(tmp_path / "x.safetensors")[0]["a"]
    array[0] = 5.0  # must not raise (a read-only frombuffer view would)
    assert array[0] == 5.0


def test_unsupported_dtype_is_a_tensor_file_error():
    with pytest.raises(TensorFileError) as info:
        sio.serialize({"c": np.ones(2, dtype=np.complex64)})
    assert info.value.code == "bad_dtype" and "complex64" in str(info.value)


def test_non_finite_count():
    assert sio.non_finite_count(np.array([1.0, np.nan, np.inf, -np.inf], "<f4")) == 3
    assert sio.non_finite_count(np.array([1.0, np.nan], dtype=BF16)) == 1
    assert sio.non_finite_count(np.array([np.inf, 2.0], "<f2")) == 1
    assert sio.non_finite_count(np.array([1, 2], "<i8")) == 0
    assert sio.non_finite_count(np.array([True, False])) == 0
    assert sio.non_finite_count(np.zeros((0,), "<f4")) == 0


# ---- the reader's checks -------------------------------------------------------------

def entry(dtype: str = "F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "empty file": (b"", "too short"),
    "seven bytes": (b"\x01\x00\x00\x00\x00\x00\x00", "too short"),
    "header length > file": (raw_safetensors({"a": entry()}, b"\0" * 8, length=10_000), "exceeds the file size"),
    "header length huge": (struct.pack("<Q", 2**63) + b"{}", "exceeds the file size"),
    "header not JSON": (raw_safetensors(b"{not json", b""), "not valid JSON"),
    "header not UTF-8": (raw_safetensors(b'{"\xff": 1}', b""), "not valid JSON"),
    "header not an object": (raw_safetensors([1, 2, 3]), "must be a JSON object"),
    "header a string": (raw_safetensors("text"), "must be a JSON object"),
    "entry not an object": (raw_safetensors({"a": [1, 2]}), "entry must be an object"),
    "unknown dtype": (raw_safetensors({"a": entry(dtype="F128")}, b"\0" * 8), "unknown dtype"),
    "dtype a list": (raw_safetensors({"a": entry(dtype=["F32"])}, b"\0" * 8), "unknown dtype"),
    "dtype an object": (raw_safetensors({"a": entry(dtype={"F32": 1})}, b"\0" * 8), "unknown dtype"),
    "dtype missing": (raw_safetensors({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    "negative shape": (raw_safetensors({"a": entry(shape=(-2,))}, b"\0" * 8), "non-negative"),
    "float shape": (raw_safetensors({"a": entry(shape=(2.0,))}, b"\0" * 8), "non-negative"),
    "bool shape": (raw_safetensors({"a": entry(shape=(True,), offsets=(0, 4))}, b"\0" * 4), "non-negative"),
    "offsets not a pair": (raw_safetensors({"a": entry(offsets=(0,))}, b"\0" * 8), "two integers"),
    "float offsets": (raw_safetensors({"a": entry(offsets=(0, 8.0))}, b"\0" * 8), "two integers"),
    "offsets outside data": (raw_safetensors({"a": entry(offsets=(0, 16))}, b"\0" * 8), "outside the data area"),
    "offsets reversed": (raw_safetensors({"a": entry(shape=(0,), offsets=(8, 0))}, b"\0" * 8), "outside the data area"),
    "byte-count mismatch": (raw_safetensors({"a": entry(shape=(3,), offsets=(0, 8))}, b"\0" * 8), "byte count"),
    "overlapping offsets": (
        raw_safetensors({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    "identical offsets": (
        raw_safetensors({"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}, b"\0" * 8), "overlaps"),
    "hole": (raw_safetensors({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\0" * 20), "hole"),
    "hole at the start": (raw_safetensors({"a": entry(offsets=(4, 12))}, b"\0" * 12), "hole"),
    "trailing bytes": (raw_safetensors({"a": entry()}, b"\0" * 12), "trailing bytes"),
    "data but no tensors": (raw_safetensors({}, b"\0" * 4), "trailing bytes"),
    "duplicate keys": (
        raw_safetensors(b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}",
                        b"\0" * 8), "duplicate key"),
    "metadata not strings": (raw_safetensors({"__metadata__": {"a": 1}}), "__metadata__"),
    "metadata not an object": (raw_safetensors({"__metadata__": [1]}), "__metadata__"),
    "nested too deeply": (raw_safetensors(b"[" * 50_000 + b"]" * 50_000), "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_raise_tensor_file_error(tmp_path, name):
    data, needle = MALFORMED[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(TensorFileError) as info:
        sio.load(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_malformed_files_are_also_rejected_by_the_safetensors_library(tmp_path):
    """Sanity check of the hand-made files: the reference reader refuses the same ones."""
    refused = 0
    for name in ("header length > file", "overlapping offsets", "hole", "byte-count mismatch", "unknown dtype"):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(MALFORMED[name][0])
        try:
            safetensors_numpy.load_file(str(path))
        except Exception:
            refused += 1
    assert refused == 5


def test_error_names_the_tensor_key(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_safetensors({"model.x.lora.A": entry(shape=(3,))}, b"\0" * 8))
    with pytest.raises(TensorFileError) as info:
        sio.read_header(path)
    assert info.value.location == "model.x.lora.A"
    assert info.value.expected == 12 and info.value.found == 8


def test_missing_file(tmp_path):
    with pytest.raises(TensorFileError) as info:
        sio.read_header(tmp_path / "nope.safetensors")
    assert info.value.code == "missing_file"


def test_read_tensor_on_a_file_truncated_after_the_header_was_read(tmp_path):
    path = tmp_path / "x.safetensors"
    sio.save(path, {"a": np.ones(16, "<f4")})
    header = sio.read_header(path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(TensorFileError) as info:
        sio.read_tensor(header, "a")
    assert info.value.code == "truncated"


def test_falsy_non_object_metadata_is_rejected(tmp_path):
    """[] / 0 / "" / false are not string maps either (only null or an object are)."""
    accepted = []
    for value in ([], 0, "", False):
        path = tmp_path / "x.safetensors"
        path.write_bytes(raw_safetensors({"__metadata__": value}))
        try:
            sio.load(path)
            accepted.append(value)
        except TensorFileError as exc:
            assert "__metadata__" in str(exc)
    assert accepted == []


def test_null_or_empty_metadata_is_accepted(tmp_path):
    for header in ({"__metadata__": None}, {"__metadata__": {}}, {}):
        path = tmp_path / "x.safetensors"
        path.write_bytes(raw_safetensors(header))
        assert sio.load(path) == ({}, {})


def test_zero_sized_tensors_and_empty_file(tmp_path):
    path = tmp_path / "x.safetensors"
    sio.save(path, {"a": np.zeros((0,), "<f4"), "b": np.zeros((2, 0), "<f2"), "c": np.ones(2, "<f4")})
    loaded, _ = sio.load(path)
    assert loaded["a"].shape == (0,) and loaded["b"].shape == (2, 0)
    sio.save(path, {})
    assert sio.load(path) == ({}, {})


# ---- fuzzing: any corruption is a TensorFileError, nothing else ----------------------

VALID = sio.serialize(
    {"a": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.ones(3, dtype=BF16), "c": np.arange(2, dtype="<i8")},
    {"format": "pt"},
)


def _read_or_tensor_file_error(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        sio.load(path)
    except TensorFileError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, len(VALID) - 1), value=st.integers(0, 255))
def test_fuzz_one_byte_changed(tmp_path, position, value):
    data = bytearray(VALID)
    data[position] = value
    _read_or_tensor_file_error(tmp_path, bytes(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(VALID) - 1))
def test_fuzz_truncated(tmp_path, cut):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(VALID[:cut])
    with pytest.raises(TensorFileError):
        sio.load(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["a", "dtype", "shape", "data_offsets", "__metadata__"]), children, max_size=4),
    max_leaves=12,
), data=st.binary(max_size=24))
def test_fuzz_arbitrary_headers(tmp_path, header, data):
    encoded = json.dumps(header).encode()
    _read_or_tensor_file_error(tmp_path, raw_safetensors(encoded, data))


def test_non_finite_count_does_not_overflow_float64():
    """Finite float64 values beyond float32's range are finite (no cast through float32)."""
    assert sio.non_finite_count(np.array([1e300, -1e300, np.finfo(np.float64).max], "<f8")) == 0
    assert sio.non_finite_count(np.array([1e300, np.nan], "<f8")) == 1
