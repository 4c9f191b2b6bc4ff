"""A minimal safetensors reader / writer on numpy (float dtypes only, bfloat16 via ml_dtypes).

adapterkit's own safetensors module is internal; a plugin carries the few lines it needs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    """The JSON header (tensor name -> dtype, shape, data_offsets; and ``__metadata__``)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > MAX_HEADER:
            raise ValueError(f"header of {size} bytes is larger than {MAX_HEADER}")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def load(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a float safetensors file as numpy arrays (copies)."""
    data = Path(path).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    body = memoryview(data)[8 + size:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key}: dtype {info['dtype']} is not a float dtype")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if not 0 <= start <= end <= len(body) or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {key}: data_offsets {info['data_offsets']} do not fit its shape and the file")
        out[key] = np.frombuffer(body[start:end], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return out


def save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (sorted keys, 8-byte aligned header) as safetensors."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": CODES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
