"""The kohya file: one ``*.safetensors``, its tensors grouped per lora_name, alpha tensors, metadata."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError, UsageError
from adapterkit.core.format import safetensors_io

from .names import split_prefix

DEFAULT_FILE = "lora.safetensors"
#: safetensors dtype -> manifest dtype of the float dtypes an adapter may have
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NUMPY = safetensors_io.DTYPES


def find_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if path.is_dir() and not (path / "adapter.json").exists() and not (path / "adapter_config.json").exists():
        found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        return found[0] if len(found) == 1 else None
    return None


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's key, dtype, shape and bytes: tells whether a write changes the tensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.asarray(tensors[key])
        digest.update(f"{key}\0{safetensors_io.dtype_name(array)}\0{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def group(raw: Mapping[str, np.ndarray], file: str) -> dict[str, dict[str, np.ndarray]]:
    """lora_name -> {leaf: tensor} (leaf: the key after the lora_name and its dot, e.g. ``lora_down.weight``)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in raw.items():
        lora_name, dot, leaf = key.partition(".")
        if not dot or not leaf or split_prefix(lora_name) is None:
            raise FormatError("not a kohya key", file=file, location=key,
                              expected="<lora_te*|lora_unet>_<module>.<tensor> (lora_down.weight, hada_w1_a, lokr_w1, alpha, ...)",
                              code="unknown_key")
        modules.setdefault(lora_name, {})[leaf] = array
    if not modules:
        raise TensorFileError("holds no tensors", file=file, code="empty")
    return modules


def float_dtype(arrays: Mapping[str, np.ndarray], file: str, what: str) -> str:
    """The one float dtype of ``arrays`` (``"float16"``, ...), else a TensorFileError."""
    names = {safetensors_io.dtype_name(a) for a in arrays.values()}
    if len(names) != 1:
        raise TensorFileError(f"{what} have mixed dtypes; an adapter has one dtype", file=file, found=sorted(names),
                              hint="cast every tensor to one dtype and save again", code="mixed_dtype")
    name = names.pop()
    if name not in DTYPES:
        raise TensorFileError(f"{what} must be a float dtype", file=file, expected=sorted(DTYPES), found=name,
                              code="bad_dtype")
    return DTYPES[name]


def read_alpha(tensor: np.ndarray | None, r: int, name: str, file: str, record: dict[str, Any]) -> int | float:
    """The module's alpha as sd-scripts and LyCORIS read it: 0 or missing means r (scale 1)."""
    if tensor is None:
        record["missing"].append(name)
        return r
    if tensor.size != 1:
        raise TensorFileError("alpha must be a scalar", file=file, location=f"{name}.alpha", found=list(tensor.shape),
                              code="shape")
    record["dtypes"][name] = safetensors_io.dtype_name(tensor)
    value = float(tensor.astype(np.float64).reshape(()))
    if value == 0:
        record["zero"].append(name)
        return r
    if not (math.isfinite(value) and value > 0):
        raise FormatError("alpha must be a finite number > 0 (or 0 for 'alpha = r')", file=file, location=f"{name}.alpha",
                          found=value, code="bad_alpha")
    return int(value) if value.is_integer() else value


def alpha_tensor(value: float, dtype: str, name: str, round_alpha: bool) -> np.ndarray:
    """A 0-dim alpha in ``dtype`` (sd-scripts saves it in the weights' dtype); float32 when that dtype would round it."""
    np_dtype = _NUMPY.get(dtype, _NUMPY["F32"])
    if np_dtype.kind in "iu":  # an integer alpha (diffusers' convert_state_dict_to_kohya writes r as int64)
        if float(value).is_integer():
            return np.array(int(value), dtype=np_dtype)
        np_dtype = _NUMPY["F32"]
    for candidate in (np_dtype, _NUMPY["F32"]):
        array = np.array(value, dtype=candidate)
        if float(array.astype(np.float64)) == value:
            return array
    if round_alpha:
        return np.array(value, dtype=np.float32)
    raise LossyConversionError(f"alpha {value!r} cannot be stored exactly in a {dtype} or float32 tensor",
                               location=f"{name}.alpha",
                               hint="pass round_alpha=True to store float32(alpha) (a relative change below 1e-7)",
                               code="inexact_alpha")


def metadata(source: Mapping[str, Any], out: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> dict[str, str]:
    """The original ``__metadata__`` (its sshs_* hashes only when the tensors are unchanged), else the codec's fields."""
    original = source.get("config")
    if isinstance(original, dict):
        if source.get("tensors_sha256") == tensors_digest(out):
            return dict(original)
        return {k: v for k, v in original.items() if not k.startswith("sshs_")}
    bad = sorted(k for k, v in fields.items() if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
        raise UsageError("a kohya codec's metadata fields must be strings", found=bad, code="bad_codec")
    return dict(fields)


def is_plain(name: Any) -> bool:
    return isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name and not name.startswith(".")


def plain_name(name: str) -> str:
    if not is_plain(name):
        raise UsageError("filename must be a plain *.safetensors file name", found=name, code="bad_option")
    return name
