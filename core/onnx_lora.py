"""Low-rank adapters as ONNX Runtime sees them: input names, factors, ``.onnx_adapter`` files.

In a swappable ONNX export (docs/onnx.md) every adapted module ``m`` reads two
graph inputs, named after Olive's convention (microsoft/Olive ``convert_adapters``):

- ``<m>.lora_A.weight`` float32 ``[in, r]``: the canonical A transposed;
- ``<m>.lora_B.weight`` float32 ``[r, out]``: the canonical B transposed, with the
  module's scale folded in (``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA);

so the module computes ``y = base(x) + (x @ A) @ B`` and the graph needs no scale
input. An ``.onnx_adapter`` file (ONNX Runtime's FlatBuffer, written through
``onnxruntime.AdapterFormat``) holds exactly these tensors under these names.

A method provides the factors through :meth:`adapterkit.core.method.Method.export_factors`;
:func:`default_export_factors` is its default. Torch-free: numpy (and onnxruntime
for the file functions, imported when called).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FormatError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .method import Method
    from .plugins import Registry

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
FILE_SUFFIX = ".onnx_adapter"
#: relative tolerance of the check that a method's update really is ``s * B @ A``
_FACTOR_RTOL = 1e-5


def input_names(module: str) -> tuple[str, str]:
    """The graph input names of ``module``'s factors: (``<module>.lora_A.weight``, ``<module>.lora_B.weight``)."""
    return module + A_SUFFIX, module + B_SUFFIX


def split_name(name: str) -> tuple[str, str] | None:
    """(module, "A" or "B") of an input name, or None when it is not one."""
    for suffix, param in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], param
    return None


def default_export_factors(method: Method, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                           tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Factors of a method whose update is ``s * B @ A`` over canonical ``A`` ``[r, in]`` and ``B`` ``[out, r]``.

    ``s`` is read from the method itself: :meth:`Method.delta_weight` of unit
    tensors gives ``s`` exactly (as float32), and the real tensors are then
    checked to give ``s * B @ A``. None when the method is not mergeable, merges
    through ``merged_weight`` (a non-additive update: DoRA, or QLoRA's
    quantised base), or holds other tensors.
    """
    if not method.mergeable or callable(getattr(method, "merged_weight", None)):
        return None
    prefix = f"{module}.{method.name}."
    params = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    if set(params) != {"A", "B"}:
        return None
    a, b = np.asarray(params["A"], dtype=np.float32), np.asarray(params["B"], dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        return None
    r = a.shape[0]
    unit_a, unit_b = np.zeros_like(a), np.zeros_like(b)
    if r:
        unit_a[0, 0] = unit_b[0, 0] = 1.0
    key_a, key_b = prefix + "A", prefix + "B"  # delta_weight takes canonical keys (the Method contract)
    probe = method.delta_weight(module, target, config, {key_a: unit_a, key_b: unit_b})
    if probe is None or probe.ndim != 2 or not r:
        return None
    scale = np.float32(probe[0, 0])
    delta = method.delta_weight(module, target, config, {key_a: a, key_b: b})
    product = (b @ a) * scale
    if delta is None or not (_close(delta, product) or _close(delta, product.T)):
        return None
    return np.ascontiguousarray(a.T), np.ascontiguousarray((b * scale).T)


def _close(x: np.ndarray, y: np.ndarray) -> bool:
    if x.shape != y.shape:
        return False
    bound = _FACTOR_RTOL * max(float(np.abs(y).max(initial=0.0)), 1e-30)
    return bool(np.abs(x.astype(np.float32) - y).max(initial=0.0) <= bound)


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
    from .plugins import default_registry

    registry = registry or default_registry()
    method = registry.method(adapter.method)
    config = method.resolve_config(adapter.config)
    out: dict[str, ModuleFactors] = {}
    for module, target in sorted(adapter.targets.items()):
        tensors = adapter.module_tensors(module)
        factors = method.export_factors(module, target, config, tensors)
        if factors is None:
            raise UsageError(
                f"method {adapter.method!r} gives no low-rank factors for {module}, so its adapters cannot be "
                "graph inputs of a swappable ONNX model", location=module,
                hint="export it with --mode merged (the adapter is then part of the graph)", code="not_swappable",
            )
        a, b = (np.ascontiguousarray(np.asarray(t, dtype=np.float32)) for t in factors)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise UsageError(f"method {adapter.method!r} export_factors gave shapes {list(a.shape)} and "
                             f"{list(b.shape)} for {module}", location=module, expected="[in, r] and [r, out]",
                             hint="this is a bug in the method's plugin", code="bad_factors")
        out[module] = ModuleFactors(a, b)
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

def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(".onnx_adapter files are read and written through onnxruntime, which is not installed",
                         hint="pip install onnxruntime (1.20 or later)", code="missing_dependency") from None
    return onnxruntime


def write_adapter_file(params: Mapping[str, np.ndarray], path: str | os.PathLike[str], *,
                       adapter_version: int = 1, model_version: int = 1) -> None:
    """Write ``params`` (name -> float array) as an ONNX Runtime ``.onnx_adapter`` file."""
    ort = _onnxruntime()

    if not params:
        raise UsageError("an .onnx_adapter file needs at least one parameter", code="empty_adapter")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    # OrtValues view the arrays' memory: keep the contiguous copies alive until the file is written
    arrays = {name: np.ascontiguousarray(value) for name, value in sorted(params.items())}
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()})
    fmt.export_adapter(str(path))


@dataclass
class AdapterFile:
    """The content of an ``.onnx_adapter`` file."""

    params: dict[str, np.ndarray]
    format_version: int
    adapter_version: int
    model_version: int


def read_adapter_file(path: str | os.PathLike[str]) -> AdapterFile:
    """Read an ``.onnx_adapter`` file (copies the tensors out of ONNX Runtime's mapping)."""
    ort = _onnxruntime()

    from .onnx_adapter_check import check_adapter_file

    path = Path(path)
    check_adapter_file(path)  # offsets, sizes and fields checked in Python before ONNX Runtime's C++ reader runs
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}
        versions = fmt.get_format_version(), fmt.get_adapter_version(), fmt.get_model_version()
    except Exception as exc:  # onnxruntime raises plain RuntimeError / Fail for a bad file
        raise FormatError(f"not a readable ONNX Runtime adapter file ({type(exc).__name__}: {exc})", file=str(path),
                          hint="write it with onnxruntime.AdapterFormat (or adapterkit convert --to onnx-adapter)",
                          code="bad_file") from None
    return AdapterFile(params, *(int(v) for v in versions))
