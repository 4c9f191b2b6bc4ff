"""The in-memory adapter: a manifest plus canonical tensors (numpy arrays)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import Manifest

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def canonical_key(module: str, method: str, param: str) -> str:
    """``<module path>.<method>.<param>``, e.g. ``model.layers.0.self_attn.q_proj.lora.A``."""
    return f"{module}.{method}.{param}"


def split_key(key: str, method: str) -> tuple[str, str] | None:
    """(module, param) of a canonical key of ``method``, or None if it is not one."""
    marker = f".{method}."
    index = key.rfind(marker)
    if index <= 0:
        return None
    return key[:index], key[index + len(marker):]


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
        """The tensors of one module, keyed by param name (``A``, ``B``, ...)."""
        prefix = f"{module}.{self.method}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
