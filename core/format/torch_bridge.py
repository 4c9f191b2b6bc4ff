"""numpy <-> torch without copies where possible (bfloat16 included)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

_TORCH_BY_NAME = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
_NUMPY_BY_TORCH = {
    torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"), torch.float64: np.dtype("<f8"),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.int64: np.dtype("<i8"), torch.int32: np.dtype("<i4"),
    torch.uint8: np.dtype("u1"), torch.int8: np.dtype("i1"), torch.bool: np.dtype("?"),
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _TORCH_BY_NAME.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported adapter dtype {dtype}")


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    if array.dtype.kind == "V" or array.dtype.name.startswith("float8"):
        raise ValueError(f"dtype {array.dtype} has no torch equivalent here")
    return torch.from_numpy(array.copy())


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()
