"""A small, strict safetensors reader and writer on numpy (no torch needed).

The reader checks every claim of the header against the real file before it
allocates anything: header length, JSON object, known dtypes, shapes whose
byte count equals the offsets, offsets inside the data area, no overlaps and
no holes. bfloat16 and float8 arrays use ``ml_dtypes``.

The writer is deterministic: tensors sorted by key, contiguous, header padded
with spaces to a multiple of 8 bytes, so the same tensors give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from adapterkit.core.errors import TensorFileError
from adapterkit.core.io import atomic_write_bytes

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 32  # numpy's own limit is 64; no adapter tensor comes near either

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_BY_NUMPY = {v: k for k, v in DTYPES.items()}


def dtype_name(array: np.ndarray) -> str:
    """The safetensors dtype name of a numpy array."""
    try:
        return _BY_NUMPY[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise TensorFileError(f"dtype {array.dtype} cannot be stored in safetensors", code="bad_dtype") from None


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check a safetensors header without reading tensor data."""
    path = str(path)
    if not os.path.isfile(path):
        raise TensorFileError("tensor file not found", file=path, code="missing_file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise TensorFileError(
                "file is too short to be safetensors", file=path, expected=">= 8 bytes", found=file_size,
                code="truncated",
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, file_size - 8):
            raise TensorFileError(
                "safetensors header length exceeds the file size (truncated or not safetensors)",
                file=path, expected=f"<= {min(MAX_HEADER_BYTES, file_size - 8)}", found=length, code="truncated",
            )
        raw = handle.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise TensorFileError("safetensors header is nested too deeply", file=path, code="bad_header") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise TensorFileError(f"safetensors header is not valid JSON: {exc}", file=path, code="bad_header") from None
    if not isinstance(parsed, dict):
        raise TensorFileError(
            "safetensors header must be a JSON object", file=path, found=type(parsed).__name__, code="bad_header"
        )
    data_start = 8 + length
    data_size = file_size - data_start
    metadata = parsed.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TensorFileError(
            "__metadata__ must map strings to strings", file=path, location="__metadata__", code="bad_header"
        )
    tensors: dict[str, TensorInfo] = {}
    for key, entry in parsed.items():
        tensors[key] = _check_entry(path, key, entry, data_start, data_size)
    _check_coverage(path, tensors, data_start, data_size)
    return Header(path, tensors, metadata, data_start, file_size)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_entry(path: str, key: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    def fail(message: str, expected: object = None, found: object = None) -> TensorFileError:
        return TensorFileError(message, file=path, location=key, expected=expected, found=found, code="bad_header")

    if not isinstance(entry, dict):
        raise fail("tensor entry must be an object", found=type(entry).__name__)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise fail("unknown dtype", expected=sorted(DTYPES), found=dtype)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise fail("shape must be a list of non-negative integers", found=shape)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise fail("data_offsets must be two integers", found=offsets)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise fail("data_offsets fall outside the data area", expected=f"0 <= begin <= end <= {data_size}", found=offsets)
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) * DTYPES[dtype].itemsize >= 2**63:
        # numpy cannot make such an array, even an empty one ([0, 2**40, 2**40]): refuse it here, cleanly
        raise fail("shape is too large for an array", expected=f"<= {MAX_DIMS} dimensions, < 2**63 bytes", found=shape)
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise fail("byte count does not match dtype and shape", expected=nbytes, found=end - begin)
    return TensorInfo(key, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_coverage(path: str, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            what = "overlaps another tensor" if info.start < cursor else "leaves a hole before it"
            raise TensorFileError(
                f"tensor data {what}", file=path, location=info.key,
                expected=cursor - data_start, found=info.start - data_start, code="bad_header",
            )
        cursor = info.end
    if cursor != data_start + data_size:
        raise TensorFileError(
            "file has trailing bytes after the last tensor", file=path,
            expected=cursor, found=data_start + data_size, code="bad_header",
        )


def read_tensor(header: Header, key: str) -> np.ndarray:
    """Read one tensor (a fresh, writable array)."""
    info = header.tensors[key]
    with open(header.path, "rb") as handle:
        handle.seek(info.start)
        data = handle.read(info.nbytes)
    if len(data) != info.nbytes:
        raise TensorFileError("file ended inside tensor data", file=header.path, location=key, code="truncated")
    return np.frombuffer(bytearray(data), dtype=DTYPES[info.dtype]).reshape(info.shape)


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file."""
    header = read_header(path)
    return {key: read_tensor(header, key) for key in header.tensors}, dict(header.metadata)


def serialize(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes: sorted keys, contiguous data, 8-byte aligned header."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs: list[bytes] = []
    offset = 0
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key]).reshape(np.shape(tensors[key]))  # keep 0-d scalars 0-d
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        blob = array.tobytes()
        header[key] = {"dtype": dtype_name(array), "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def save(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    atomic_write_bytes(Path(path), serialize(tensors, metadata))


def non_finite_count(array: np.ndarray) -> int:
    """How many NaN or infinite values a float array holds (0 for integer arrays)."""
    if array.dtype.kind == "f":
        return int(array.size - np.count_nonzero(np.isfinite(array)))
    if array.dtype in (DTYPES["BF16"], DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
        return int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32))))
    return 0
