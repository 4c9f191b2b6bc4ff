"""Lower an adapter to plain LoRA factors by truncated SVD of each module's delta (numpy only).

Any method whose per-module weight update is computable through its capabilities lowers:

- :class:`~adapterkit.LowRank` (LoRA, QLoRA, a plugin's VeRA ...): the exact factors; the SVD
  of ``scale * B @ A`` comes from two thin QRs and the SVD of an ``r x r`` core, never from
  the ``[out, in]`` matrix;
- :class:`~adapterkit.DeltaWeight`: the dense update;
- :class:`~adapterkit.MergedWeight` (DoRA, (IA)^3): ``merged(W) - W``, which needs the base
  weight ``W``: each one is read alone from the base's safetensors (headers, then that tensor),
  never the whole model. A method that also changes a module's bias (:class:`~adapterkit.MergedBias`)
  is refused on a module whose bias it changes: a LoRA cannot hold that.

A dense delta ``D`` (``[out, in]``) is truncated through the eigen-decomposition of the
Gram matrix of its shorter side (``D Dᵀ`` or ``Dᵀ D``, float64): its top-``k`` eigenvectors
``U`` give ``B = U`` and ``A = Uᵀ D`` (the orthogonal projection, so the full rank is exact).
Each module's relative Frobenius error ``||D - B A|| / ||D||`` is computed from the
kept energy, ``||D||² - ||A||²``.

``rank`` chooses one rank for every module, clamped to the module's ``min(out, in)`` (which is
then exact; the report gives the rank written); ``energy`` ``E`` in (0, 1] chooses each
module's smallest ``k`` with ``sum(S[:k]²) >= E * sum(S²)``. ``target="vllm"`` rounds each
rank up to a ``--max-lora-rank`` vLLM accepts and keeps that many directions (zero-padded past
the delta's own rank).
With a ``target`` the result must pass that runtime's ``validate --target`` rules.

The result is an adapter of the input's method when it is :class:`~adapterkit.FromFactors`,
else of the first installed method that is (LoRA), with scale 1 on every module (alpha = r)
and per-module ranks where they differ.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import AdapterkitError, BaseModelError, PluginError, UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.format.provenance import created_by, now_utc
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.ops.compose import factor_method, like_config, source_record
from adapterkit.core.ops.merge import single_threaded_blas
from adapterkit.core.plugin.capabilities import (
    DeltaWeight, Factors, LowRank, MergedBias, MergedWeight, can_merge, module_delta,
)
from adapterkit.core.plugin.registry import Registry, default_registry

__all__ = ["LoweredModule", "Lowering", "to_lora"]



@dataclass(frozen=True)
class LoweredModule:
    """One module of a lowering: the rank written and the relative Frobenius error of its delta."""

    module: str
    rank: int
    error: float  # ||D - B A||_F / ||D||_F (0 for a zero delta)
    norm: float  # ||D||_F
    shape: tuple[int, int]  # [out, in]


@dataclass
class Lowering:
    """The result of :func:`to_lora`: the adapter, each module's rank and error, the worst and the total."""

    adapter: Adapter
    source_method: str
    modules: list[LoweredModule]
    rank: int | None = None
    energy: float | None = None
    target: str | None = None
    validation: ValidationReport | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def worst(self) -> LoweredModule:
        return max(self.modules, key=lambda m: (m.error, m.module))

    @property
    def total_error(self) -> float:
        """``sqrt(sum ||D - B A||²) / sqrt(sum ||D||²)`` over every module."""
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        whole = sum(m.norm ** 2 for m in self.modules)
        return math.sqrt(lost / whole) if whole > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "source_method": self.source_method, "method": self.adapter.method,
            "rank": self.rank, "energy": self.energy, "target": self.target,
            "modules": [{"module": m.module, "rank": m.rank, "error": m.error, "shape": list(m.shape)}
                        for m in self.modules],
            "worst": {"module": worst.module, "rank": worst.rank, "error": worst.error},
            "total_error": self.total_error,
            "ranks": sorted({m.rank for m in self.modules}),
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "warnings": list(self.warnings),
        }


def to_lora(
    adapter: Adapter | str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    *,
    target: str | None = None,
    base: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
) -> Lowering:
    """Lower ``adapter`` (an Adapter or a path, any format) to plain low-rank factors.

    :param rank: one rank for every module (>= 1; clamped to each module's ``min(out, in)``).
    :param energy: instead of ``rank``, the fraction of each module's squared singular values kept, in (0, 1].
        Neither: the full rank of each module's delta (exact).
    :param target: ``vllm`` (ranks rounded up to one vLLM accepts), ``llama.cpp`` or ``onnxruntime``: the result
        must pass that runtime's ``validate --target`` rules.
    :param base: local HF folder of the base model; needed by a :class:`~adapterkit.MergedWeight` method (DoRA).
    Raises :class:`~adapterkit.UsageError` (nothing computed) for a method without a computable delta,
    a bad rank or energy, or a missing base.
    """
    registry = registry or default_registry()
    _check_options(rank, energy, target)
    source = adapter if isinstance(adapter, Adapter) else _load(adapter, registry)
    method = registry.method(source.method)
    _check_method(method)
    out = factor_method(method, registry, "lowered to LoRA")
    config = method.resolve_config(source.config)
    reader = _BaseReader(base, source) if _needs_base(method) else None  # an additive update needs no base

    factors: dict[str, tuple[Mapping[str, Any], Factors]] = {}
    lowered: list[LoweredModule] = []
    with single_threaded_blas():
        for module, tgt in sorted(source.targets.items()):
            a, b, energies, norm2, shape = _module_svd(method, module, tgt, config, source.module_tensors(module),
                                                      reader)
            k = _choose_rank(energies, norm2, shape, rank, energy)
            if target == "vllm":  # the rank written anyway: its directions all count (zero-padded past the delta's)
                k = _vllm_rank(module, k)
            a_k, b_k, kept = _truncate(a, b, energies, k)
            error = math.sqrt(max(norm2 - kept, 0.0) / norm2) if norm2 > 0 else 0.0
            factors[module] = ({"kind": tgt.get("kind", "linear"), "shape": list(tgt["shape"])},
                               Factors(a_k.astype(np.float32), b_k.astype(np.float32), 1.0))
            lowered.append(LoweredModule(module, int(a_k.shape[0]), error, math.sqrt(norm2), shape))
    if not factors:
        raise UsageError(f"the {source.method} adapter adapts no module: there is nothing to lower",
                         code="empty_adapter")
    new_config, targets, tensors = out.from_factors(factors, like_config([source], set(factors), out is method))
    result = Adapter(_manifest(source, out, new_config, targets, rank, energy, target), tensors)
    lowering = Lowering(result, source.method, lowered, rank, energy, target)
    if target is not None:
        lowering.validation = _check_target(result, target, registry, base)
    return lowering


# ---- checks ---------------------------------------------------------------------

def _check_options(rank: int | None, energy: float | None, target: str | None) -> None:
    def fail(message: str, **kw: Any) -> UsageError:
        return UsageError(message, code="bad_option", **kw)

    if rank is not None and energy is not None:
        raise fail("pass a rank or an energy, not both", hint="--rank R gives every module rank R; "
                                                              "--energy E chooses each module's rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise fail("rank must be an integer >= 1", location="rank", expected=">= 1", found=rank)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise fail("energy must be in (0, 1]", location="energy", expected="0 < E <= 1", found=energy,
                   hint="the fraction of each module's squared singular values kept, e.g. 0.99")
    from adapterkit.core.check.targets import TARGETS

    if target is not None and target not in TARGETS:
        raise fail(f"unknown runtime target {target!r}", location="target", expected=list(TARGETS), found=target)


def _check_method(method: Any) -> None:
    if not can_merge(method):
        raise UsageError(f"method {method.name!r} has no per-module weight delta, so it cannot be lowered to LoRA",
                         expected="a method with LowRank, DeltaWeight or MergedWeight",
                         found=f"{method.name} (capabilities: {', '.join(_capabilities(method)) or 'none'})",
                         hint="only adapters that change the weights of linear modules lower to LoRA",
                         code="no_delta")


def _capabilities(method: Any) -> list[str]:
    from adapterkit.core.plugin.capabilities import names

    return names(method)


def _needs_base(method: Any) -> bool:
    return not isinstance(method, (LowRank, DeltaWeight)) and isinstance(method, MergedWeight)


def _load(path: str | os.PathLike[str], registry: Registry) -> Adapter:
    from adapterkit.core.store.adapters import load

    return load(path, registry=registry)


class _BaseReader:
    """One base weight (and bias) at a time from a local HF folder's safetensors: headers, then that tensor."""

    def __init__(self, base: str | os.PathLike[str] | None, adapter: Adapter):
        if base is None:
            raise UsageError(f"method {adapter.method!r} computes its update from the base weight: "
                             "lowering it needs the base model", location="base",
                             hint="pass --base BASE, the local HF model folder the adapter was made for",
                             code="base_needed")
        from adapterkit.core.format.base_model import read_base_model

        self.info = read_base_model(base)
        self.path = Path(base)
        self._headers: dict[str, Any] = {}
        want = adapter.manifest.base_model.get("model_type")
        if want and self.info.model_type and want != self.info.model_type:
            raise BaseModelError("base model_type differs from the one the adapter was made for",
                                 file=str(self.path / "config.json"), location="model_type", expected=want,
                                 found=self.info.model_type, hint="pass the base model the adapter was trained on",
                                 code="wrong_base")

    def read(self, name: str) -> np.ndarray | None:
        from adapterkit.core.format import safetensors_io

        key = self.info.resolve(name)
        if key is None:
            return None
        file = self.info.weights[key].file
        if file not in self._headers:
            self._headers[file] = safetensors_io.read_header(self.path / file)
        return safetensors_io.read_tensor(self._headers[file], key)

    def weight(self, module: str, shape: list[int]) -> np.ndarray:
        weight = self.read(f"{module}.weight")
        if weight is None:
            raise BaseModelError("adapted module does not exist in the base model", file=str(self.path),
                                 location=f"{module}.weight", hint="is this the right base model?", code="wrong_base")
        if list(weight.shape) != list(shape):
            raise BaseModelError("base weight shape differs from the adapter's target", file=str(self.path),
                                 location=f"{module}.weight", expected=list(shape), found=list(weight.shape),
                                 hint="the adapter was made for another base model", code="wrong_base")
        return weight.astype(np.float64)


# ---- per-module math --------------------------------------------------------------

def _module_svd(method: Any, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                tensors: Mapping[str, np.ndarray], reader: _BaseReader | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, tuple[int, int]]:
    """``(A [n, in], B [out, n], energies [n], ||D||², (out, in))``: ``D = B A`` with orthogonal directions
    sorted by decreasing energy (``energies[i]`` = the squared singular value of direction ``i``)."""
    kind = target.get("kind", "linear")
    if isinstance(method, LowRank):
        f = method.lora_factors(module, target, config, tensors)
        a, b = np.asarray(f.a, dtype=np.float64), np.asarray(f.b, dtype=np.float64)
        shape = (int(b.shape[0]), int(a.shape[1]))
        if a.shape[0] == 0:
            return np.zeros((0, shape[1])), np.zeros((shape[0], 0)), np.zeros(0), 0.0, shape
        return (*_factored_svd(a, b, float(f.scale)), shape)
    weight = reader.weight(module, list(target["shape"])) if reader is not None else None
    delta = module_delta(method, module, target, config, tensors, weight)
    if delta is None or list(np.shape(delta)) != list(target["shape"]):
        raise PluginError(f"method {method.name!r} gave {'no' if delta is None else list(np.shape(delta))} "
                          f"update for {module}", location=module, expected=list(target["shape"]),
                          hint="this is a bug in the method's plugin", code="bad_merge")
    if isinstance(method, MergedBias) and reader is not None:
        _check_bias(method, module, target, config, tensors, reader)
    d = np.asarray(delta, dtype=np.float64)
    if kind == "conv1d":
        d = d.T  # factors are [out, in] whatever the stored orientation
    return (*_dense_svd(d), (int(d.shape[0]), int(d.shape[1])))


def _factored_svd(a: np.ndarray, b: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The SVD of ``scale * B @ A`` from ``B = Qb Rb``, ``Aᵀ = Qa Ra`` and the SVD of the core ``scale Rb Raᵀ``."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(scale * (rb @ ra.T))
    b_all = qb @ (u * s)
    a_all = vt @ qa.T
    energies = s ** 2
    return a_all, b_all, energies, float(energies.sum())


def _dense_svd(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``D = B A`` from the eigenvectors of the Gram matrix of its shorter side (float64)."""
    out, inp = d.shape
    norm2 = float(np.einsum("ij,ij->", d, d))
    if out <= inp:
        w, u = np.linalg.eigh(d @ d.T)
        order = np.argsort(w)[::-1]
        b = u[:, order]
        a = b.T @ d
    else:
        w, v = np.linalg.eigh(d.T @ d)
        order = np.argsort(w)[::-1]
        a = v[:, order].T
        b = d @ v[:, order]
    energies = np.clip(w[order], 0.0, None)
    return a, b, energies, norm2


def _choose_rank(energies: np.ndarray, norm2: float, shape: tuple[int, int], rank: int | None,
                 energy: float | None) -> int:
    full = min(shape)
    if energy is not None:
        if norm2 <= 0:
            return 1
        cumulative = np.cumsum(energies)
        k = int(np.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12))) + 1
        return max(1, min(k, full))
    if rank is not None:
        return min(rank, full)
    return max(1, int(energies.size))  # the delta's own rank (a LowRank method's r): exact


def _truncate(a: np.ndarray, b: np.ndarray, energies: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The first ``k`` directions (zero-padded when there are fewer) and their energy ``||A_k||²``."""
    a_k, b_k = _pad(a[:k], b[:, :k], k)
    # the rows of A are orthogonal and so are the columns of B: ||B A||² = sum_i ||a_i||² ||b_i||²
    kept_a = a_k * np.sqrt(np.sum(b_k ** 2, axis=0))[:, None]
    return a_k, b_k, float(np.einsum("ij,ij->", kept_a, kept_a))


def _pad(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape[0] >= k:
        return a, b
    extra = k - a.shape[0]
    return (np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)], axis=0),
            np.concatenate([b, np.zeros((b.shape[0], extra), b.dtype)], axis=1))


def _vllm_rank(module: str, k: int) -> int:
    from adapterkit.core.check.targets.vllm import MAX_RANKS as VLLM_MAX_RANKS

    rounded = next((r for r in VLLM_MAX_RANKS if r >= k), None)
    if rounded is None:
        raise UsageError(f"{module}: rank {k} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANKS[-1]})",
                         location=module, expected=f"<= {VLLM_MAX_RANKS[-1]}", found=k,
                         hint=f"pass --rank {VLLM_MAX_RANKS[-1]} or a lower --energy", code="vllm_rank")
    return rounded


def _check_bias(method: Any, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                tensors: Mapping[str, np.ndarray], reader: _BaseReader) -> None:
    bias = reader.read(f"{module}.bias")
    if bias is None:
        return
    bias = bias.astype(np.float64)
    merged = np.asarray(method.merged_bias(module, target, config, tensors, bias), dtype=np.float64)
    if not np.allclose(merged, bias, rtol=0, atol=1e-7 * max(1.0, float(np.abs(bias).max(initial=0.0)))):
        raise UsageError(f"method {method.name!r} also changes the bias of {module}, which a LoRA cannot hold",
                         location=f"{module}.bias", hint="merge the adapter into the base instead (adapterkit merge)",
                         code="bias_change")


# ---- the result -------------------------------------------------------------------

def _manifest(source: Adapter, out: Any, config: dict[str, Any], targets: dict[str, dict[str, Any]],
              rank: int | None, energy: float | None, target: str | None) -> Manifest:
    manifest = Manifest(
        method=out.name, method_version=out.version, config=config, targets=targets, dtype="float32",
        base_model={**source.manifest.base_model, "fingerprint": targets_fingerprint(targets)},
        task=source.manifest.task,
        provenance={"created_by": created_by("to-lora"), "created_at": now_utc()},
    )
    manifest.annotations["adapterkit.lowering"] = {
        "source": source_record(source), "rank": rank, "energy": energy, "target": target}
    return manifest


def _check_target(adapter: Adapter, target: str, registry: Registry,
                  base: str | os.PathLike[str] | None) -> ValidationReport:
    """The runtime's ``validate --target`` rules on the result: an error refuses it (nothing is written)."""
    from adapterkit.core.check.targets import check_runtime
    from adapterkit.core.store.consistency import check_tensors

    report = ValidationReport(f"to-lora result ({target})", format="adapterkit", method=adapter.method)
    check_tensors(adapter, registry, report)
    report.adapter = adapter
    check_runtime(report, target, registry, base)
    report.adapter = None
    if report.errors:
        first = report.errors[0]
        raise AdapterkitError(f"the lowered adapter fails the {target} rules: {first.message}",
                              location=first.location, expected=first.expected, found=first.found,
                              hint=first.hint, code=first.code or "target_rules")
    return report
