"""The in-memory adapter: a manifest plus canonical tensors (numpy arrays)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import TensorFileError
from adapterkit.core.format.manifest import Manifest

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def canonical_key(module: str, method: str, param: str) -> str:
    """``<module path>.<method>.<param>``, e.g. ``model.layers.0.self_attn.q_proj.lora.A``."""
    return f"{module}.{method}.{param}"


def shared_key(method: str, param: str) -> str:
    """``<method>.<param>``: a tensor shared by every module of the adapter (VeRA's ``vera.A``)."""
    return f"{method}.{param}"


def is_shared_key(key: str, method: str) -> bool:
    """Whether ``key`` is a shared tensor key of ``method`` (no module path in front)."""
    return key.startswith(method + ".") and "." not in key[len(method) + 1:]


def split_key(key: str, method: str) -> tuple[str, str] | None:
    """(module, param) of a canonical key of ``method``, or None if it is not one."""
    marker = f".{method}."
    index = key.rfind(marker)
    if index <= 0:
        return None
    return key[:index], key[index + len(marker):]


def check_tensor_dims(tensors: Mapping[str, Any], file: str | None = None) -> None:
    """Refuse a tensor with an empty (or negative) dimension, naming it as the file names it.

    No adapter tensor is empty: a LoRA factor of rank 0, a prompt of no tokens or a vector of no
    entries means a damaged file. Every reader calls this on the tensors it read, before it builds
    targets from their shapes.
    """
    for key, array in tensors.items():
        shape = tuple(int(d) for d in getattr(array, "shape", ()))
        if any(d < 1 for d in shape):
            raise TensorFileError("tensor has an empty dimension (no adapter tensor is empty)", file=file,
                                  location=str(key), found=list(shape),
                                  hint="the file is damaged or was written by a broken tool; save the adapter again",
                                  code="shape")


@dataclass
class Adapter:
    """An adapter in adapterkit's canonical layout, whatever format it came from."""

    manifest: Manifest
    tensors: dict[str, np.ndarray]
    source: Path | None = None
    source_format: str = "adapterkit"
    warnings: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        return self.manifest.targets

    @property
    def num_parameters(self) -> int:
        return int(sum(t.size for t in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))

    def module_tensors(self, module: str) -> dict[str, np.ndarray]:
        """The tensors of one module, keyed by param name (``A``, ``B``, ...), plus the shared ones under their keys.

        This is what a method's capability calls take (:mod:`adapterkit.core.plugin.capabilities`).
        """
        prefix = f"{module}.{self.method}."
        own = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return {**own, **self.shared_tensors()}

    def shared_tensors(self) -> dict[str, np.ndarray]:
        """Tensors shared by every module (``<method>.<param>``, e.g. VeRA's projections)."""
        return {k: v for k, v in self.tensors.items() if is_shared_key(k, self.method)}
