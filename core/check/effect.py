"""Does the adapter change anything? Each module's update, told from its tensors through the method's capabilities.

An adapter that loads without an error and changes nothing is the costliest kind of broken:
a LoRA saved before training (every B zero), a broken export. :func:`check_effect` decides,
per module, with the capability that can tell:

- :class:`~adapterkit.LowRank`: the update ``scale * B @ A`` is zero when ``||B A||_F`` is,
  computed from the ``r x r`` Gram matrices (``||B A||_F^2 = tr(B^T B A A^T)``), never the full matrix;
- :class:`~adapterkit.DeltaWeight`: the delta weight is all zeros;
- :class:`~adapterkit.MergedWeight` (DoRA, (IA)^3): the merged weight equals the base weight
  (and, for :class:`~adapterkit.MergedBias`, the merged bias the base bias). "Identity" is
  not zero for these: DoRA is a no-op when ``B A = 0`` and its magnitude equals the base rows'
  norm, (IA)^3 when its vectors are ones. With ``--base`` the module's own base weight is read
  (only for these methods, one module at a time); without it a random weight is tried: a
  method that leaves a random weight unchanged leaves every weight unchanged, and one that
  changes it may still be the identity on the real base, which is then "not checked";
- anything else (bottleneck layers, virtual tokens): no capability tells it from the tensors;
  ``validate --probe`` measures the model's outputs instead.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.format.targeting import is_stacked
from adapterkit.core.plugin.capabilities import DeltaWeight, LowRank, MergedBias, MergedWeight

ZERO, CHANGES, UNKNOWN = "zero", "changes", "unknown"
#: a low-rank update counts as zero below this share of ||B|| ||A|| (float rounding of an exact zero)
_REL_ZERO = 1e-6
#: a merged weight equals the base below this share of max |W| (the method's float32 recomputation)
_REL_SAME = 1e-6
_SHOWN = 8


@dataclass
class Effects:
    """Per module: ``zero`` (changes nothing), ``changes``, or ``unknown`` (why, in ``reasons``)."""

    status: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def of(self, kind: str) -> list[str]:
        return sorted(m for m, s in self.status.items() if s == kind)

    def to_dict(self) -> dict[str, Any]:
        return {"modules": len(self.status), "zero": self.of(ZERO), "changes": len(self.of(CHANGES)),
                "unknown": self.of(UNKNOWN)}


def module_effects(adapter: Adapter, method: Any, base: Any = None) -> Effects:
    """Each module's effect (``base``: a :class:`~adapterkit.core.format.base_model.BaseModelInfo` or None)."""
    effects = Effects()
    config = method.resolve_config(adapter.config)
    weights = _BaseWeights(base) if base is not None else None
    for module, target in sorted(adapter.targets.items()):
        tensors = adapter.module_tensors(module)
        status, reason = _effect(method, module, target, config, tensors, weights)
        effects.status[module] = status
        if reason:
            effects.reasons[module] = reason
    return effects


def _effect(method: Any, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
            tensors: Mapping[str, np.ndarray], weights: _BaseWeights | None) -> tuple[str, str | None]:
    if isinstance(method, LowRank):
        if is_stacked(target):  # one pair per expert
            f = method.stacked_factors(module, target, config, tensors)
            if f is None:
                return UNKNOWN, "the method gives no per-expert factors for this stacked parameter"
            zero = all(low_rank_is_zero(a, b, f.scale) for a, b in zip(f.a, f.b))
            return (ZERO if zero else CHANGES), None
        f = method.lora_factors(module, target, config, tensors)
        return (ZERO if low_rank_is_zero(f.a, f.b, f.scale) else CHANGES), None
    if isinstance(method, DeltaWeight):
        delta = np.asarray(method.delta_weight(module, target, config, tensors))
        return (CHANGES if np.any(delta) else ZERO), None
    if isinstance(method, MergedWeight):
        try:
            return _merged_effect(method, module, target, config, tensors, weights)
        except AdapterkitError as exc:  # the method cannot merge this module into that weight: not decided here
            return UNKNOWN, f"the {getattr(method, 'name', '?')} merge of this module failed: {exc.message}"
    return UNKNOWN, (f"method {getattr(method, 'name', '?')!r} has no capability that tells its effect from the "
                     "tensors (--probe measures the outputs)")


def low_rank_is_zero(a: np.ndarray, b: np.ndarray, scale: float) -> bool:
    """Whether ``scale * B @ A`` is zero, from the r x r Gram matrices (exact zeros first)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0 or scale == 0 or not np.any(a) or not np.any(b):
        return True
    squared = float(np.trace((b.T @ b) @ (a @ a.T)))
    bound = _REL_ZERO * float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return max(squared, 0.0) ** 0.5 <= bound


def _merged_effect(method: Any, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                   tensors: Mapping[str, np.ndarray], weights: _BaseWeights | None) -> tuple[str, str | None]:
    shape = tuple(int(d) for d in target["shape"])
    if weights is not None:
        weight, bias = weights.get(module)
        if weight is not None and weight.shape == shape:
            same = _identity_on(method, module, target, config, tensors, weight, bias)
            return (ZERO if same else CHANGES), None
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    bias = rng.standard_normal(shape[0 if target.get("kind") != "conv1d" else 1]).astype(np.float32)
    if _identity_on(method, module, target, config, tensors, weight, bias):
        return ZERO, None  # unchanged on a random weight: unchanged on every weight
    if weights is None:
        return UNKNOWN, (f"whether the {getattr(method, 'name', '?')} update is the identity depends on the base "
                         "weights (pass --base)")
    return UNKNOWN, "the base weight of this module was not found"


def _identity_on(method: Any, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                 tensors: Mapping[str, np.ndarray], weight: np.ndarray, bias: np.ndarray | None) -> bool:
    base = np.asarray(weight, dtype=np.float32)
    merged = np.asarray(method.merged_weight(module, target, config, tensors, base), dtype=np.float32)
    if not _same(merged, base):
        return False
    if isinstance(method, MergedBias) and bias is not None:
        base_bias = np.asarray(bias, dtype=np.float32)
        return _same(np.asarray(method.merged_bias(module, target, config, tensors, base_bias), np.float32), base_bias)
    return True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.max(np.abs(a - b), initial=0.0) <= _REL_SAME * max(scale, 1e-30))


class _BaseWeights:
    """Reads single base weights (and biases) from the checkpoint, on demand."""

    def __init__(self, info: Any):
        from adapterkit.core.format.module_index import ModuleIndex

        self.info, self.index, self._headers = info, ModuleIndex.from_base(info), {}

    def _read(self, key: str | None) -> np.ndarray | None:
        from adapterkit.core.format import safetensors_io

        if key is None or key not in self.info.weights:
            return None
        file = self.info.weights[key].file
        if file not in self._headers:
            self._headers[file] = safetensors_io.read_header(Path(self.info.path) / file)
        return np.asarray(safetensors_io.read_tensor(self._headers[file], key), dtype=np.float32)

    def get(self, module: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        landing = self.index.land(module)
        if landing is None:
            return None, None
        key = landing.key or landing.tied_to
        bias_key = landing.key.removesuffix(".weight") + ".bias" if landing.key else None
        return self._read(key), self._read(bias_key)


def check_effect(report: ValidationReport, adapter: Adapter, registry: Any, base: str | Path | None = None,
                 strict: bool = False) -> Effects | None:
    """Add to ``report`` whether the adapter (or some of its modules) changes nothing; ``strict``: errors."""
    try:
        method = registry.method(adapter.method)
    except AdapterkitError:
        return None  # the method check already reported it
    info = None
    if base is not None and isinstance(method, MergedWeight) and not isinstance(method, (LowRank, DeltaWeight)):
        from adapterkit.core.format.base_model import read_base_model

        try:
            info = read_base_model(base)
        except AdapterkitError:
            info = None  # check_base reported it
    effects = module_effects(adapter, method, info)
    zero, unknown = effects.of(ZERO), effects.of(UNKNOWN)
    add = report.error if strict else report.warn
    total = len(effects.status)
    if zero and len(zero) == total:
        add(AdapterkitError(
            f"the adapter changes nothing: the update of every one of its {total} module(s) is zero",
            file=report.path, location="$.targets", found=_listed(zero), code="no_effect",
            hint=_hint(method) + ("" if strict else "; validate --strict makes this an error")))
    elif zero:
        add(AdapterkitError(
            f"{len(zero)} of the adapter's {total} modules change nothing (their update is zero)",
            file=report.path, location="$.targets", found=_listed(zero), code="zero_modules",
            hint="a module whose factors stayed at their initial zeros was not trained (frozen, or dropped from the "
                 "optimiser)" + ("" if strict else "; validate --strict makes this an error")))
    if unknown:
        reasons = sorted(set(effects.reasons[m] for m in unknown))
        report.not_checked.append(f"whether {len(unknown)} module(s) change anything: {'; '.join(reasons)}")
    if len(unknown) < total:
        report.checks.append("whether each module's update is zero")
    return effects


def _hint(method: Any) -> str:
    if isinstance(method, LowRank):
        return "its low-rank factors multiply to zero (B is zero: saved before training, or a broken export)"
    return "its parameters are at the method's identity (saved before training, or a broken export)"


def _listed(modules: list[str]) -> str:
    shown = ", ".join(modules[:_SHOWN])
    return shown + (f" and {len(modules) - _SHOWN} more" if len(modules) > _SHOWN else "")
