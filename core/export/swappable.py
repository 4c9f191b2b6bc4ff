"""Low-rank adapters as ONNX Runtime sees them: input names, factors, ``.onnx_adapter`` files.

In a swappable ONNX export (docs/onnx.md) every adapted module ``m`` reads two
graph inputs, named after Olive's convention (microsoft/Olive ``convert_adapters``):

- ``<m>.lora_A.weight`` float32 ``[in, r]``: the canonical A transposed;
- ``<m>.lora_B.weight`` float32 ``[r, out]``: the canonical B transposed, with the
  module's scale folded in (``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA);

so the module computes ``y = base(x) + (x @ A) @ B`` and the graph needs no scale
input. An ``.onnx_adapter`` file (ONNX Runtime's FlatBuffer, written through
``onnxruntime.AdapterFormat``) holds exactly these tensors under these names.

A method provides the factors by being :class:`~adapterkit.LowRank` (``lora_factors``).
Torch-free: numpy (and onnxruntime for the file functions, imported when called).
"""

from __future__ import annotations


from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from adapterkit.core.errors import UsageError
from adapterkit.core.format.onnx_adapter_file import input_names
from adapterkit.core.plugin.capabilities import LowRank

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.core.format.adapter import Adapter
    from adapterkit.core.plugin.registry import Registry


@dataclass
class ModuleFactors:
    """One adapted module's factors in graph orientation: A ``[in, r]``, B ``[r, out]`` (scale folded)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.a.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[1])

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


def adapter_factors(adapter: Adapter, registry: Registry | None = None) -> dict[str, ModuleFactors]:
    """Every adapted module's factors (module path -> factors); UsageError when the method has none."""
    from adapterkit.core.plugin.registry import default_registry

    registry = registry or default_registry()
    method = registry.method(adapter.method)
    config = method.resolve_config(adapter.config)
    out: dict[str, ModuleFactors] = {}
    if not isinstance(method, LowRank):
        raise UsageError(
            f"method {adapter.method!r} gives no low-rank factors, so its adapters cannot be graph inputs of a "
            "swappable ONNX model", location="$.method.name",
            hint="export it with --mode merged (the adapter is then part of the graph)", code="not_swappable",
        )
    for module, target in sorted(adapter.targets.items()):
        a, b, scale = method.lora_factors(module, target, config, adapter.module_tensors(module))
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UsageError(f"method {adapter.method!r} lora_factors gave shapes {list(a.shape)} and "
                             f"{list(b.shape)} for {module}", location=module, expected="[r, in] and [out, r]",
                             hint="this is a bug in the method's plugin", code="bad_factors")
        if a.shape[0] == 0:
            continue  # a pruned module (AdaLoRA rank 0): no update, the graph's rank-0 default
        out[module] = ModuleFactors(np.ascontiguousarray(a.T), np.ascontiguousarray((b * np.float32(scale)).T))
    if not out:
        raise UsageError("the adapter has no targets", code="no_targets")
    return out


def factor_parameters(factors: Mapping[str, ModuleFactors]) -> dict[str, np.ndarray]:
    """Graph input name -> tensor, for every module (what an ``.onnx_adapter`` file holds)."""
    params: dict[str, np.ndarray] = {}
    for module, f in sorted(factors.items()):
        name_a, name_b = input_names(module)
        params[name_a], params[name_b] = f.a, f.b
    return params


# ---- .onnx_adapter files (onnxruntime.AdapterFormat) ----------------------------


def onnx_adapter_parameters(adapter: Adapter, registry: Registry | None = None) -> dict[str, np.ndarray]:
    """What an ``.onnx_adapter`` file of ``adapter`` holds: graph input name -> float32 factor (scale folded)."""
    return factor_parameters(adapter_factors(adapter, registry))
