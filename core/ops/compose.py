"""Combine adapters of one method, made for one base model, into a new adapter (numpy only).

Which strategies a method gets follows from its capabilities:

- a :class:`~adapterkit.LowRank` method (LoRA, a plugin's VeRA or AdaLoRA ...) gets
  adapterkit's own strategies below, on its low-rank factors; the result holds plain
  factors, so it is an adapter of the input method when that method is
  :class:`~adapterkit.FromFactors`, else of the first installed one that is (LoRA);
- a :class:`~adapterkit.Composable` method composes through its own strategies
  (``compose_strategies`` / ``compose``); this module checks the inputs and options,
  writes the manifest and provenance, and checks the plugin's result against the
  method's expected tensors.

The low-rank strategies (docs/compose.md gives the math as implemented):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: combine
  the A factors and the B factors separately, each adapter's ``weight * scale``
  split as ``sqrt`` over A (with its sign) and B, as PEFT's
  ``add_weighted_adapter`` does. The ranks of a module must be equal.
- ``cat``: concatenate the factors (rank = sum of ranks); exact.
- ``svd``: the best rank-``rank`` approximation of ``sum_i w_i s_i B_i A_i``,
  computed from the stacked factors (two thin QRs and the SVD of a small core),
  never from the full [out, in] matrix.

The result has scale 1 on every module (alpha = r) and records the
composition (sources with their fingerprints and sha256, strategy, weights,
density, rank, seed) in its manifest's provenance.
"""

from __future__ import annotations

from adapterkit.core.format.provenance import created_by, now_utc

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapterkit.core.errors import UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.ops import compose_math as cm
from adapterkit.core.ops.merge import single_threaded_blas
from adapterkit.core.plugin.capabilities import (
    LOW_RANK_STRATEGIES, Composable, Factors, FromFactors, LowRank, RuntimeComposable, can_merge,
)
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.store.consistency import same_base

__all__ = ["STRATEGIES", "compose"]

FACTOR_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
STRATEGIES = LOW_RANK_STRATEGIES
DENSITY_STRATEGIES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_STRATEGIES = ("ties", "dare_ties")
RANDOM_STRATEGIES = ("dare_linear", "dare_ties")


def compose(
    adapters: Sequence[Adapter | str | os.PathLike[str]],
    strategy: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    seed: int | None = None,
    *,
    majority_sign: str = "total",
    dtype: str | None = None,
    base: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
) -> Adapter:
    """A new LoRA adapter combining ``adapters`` (Adapter objects or paths, any format).

    :param strategy: one of :data:`STRATEGIES`.
    :param weights: one weight per adapter (default 1.0 each); may be negative.
    :param density: fraction of entries kept by ``ties``, ``dare_*``, ``magnitude_prune`` (0 < d <= 1).
    :param rank: output rank of ``svd`` (default: the largest input rank).
    :param seed: random seed of ``dare_*`` (default: drawn, and recorded in the provenance).
    :param majority_sign: sign election of ``ties`` / ``dare_ties``: ``total`` or ``frequency``.
    :param dtype: tensor dtype of the result (default: the inputs' common dtype, else float32).
    :param base: a local HF model folder, for input formats whose reader needs the base (torchtune, ...).
    """
    registry = registry or default_registry()
    loaded = [_load(a, registry, base) for a in adapters]
    if not loaded:
        raise UsageError("compose needs at least one adapter", hint="pass two or more adapter folders",
                         code="bad_option")
    method = _check_methods(loaded, registry)
    base_model = same_base(loaded)
    if isinstance(method, LowRank):
        weights = _check_options(len(loaded), strategy, weights, density, rank, seed, majority_sign, dtype)
        method, config, targets, tensors, settings = _compose_low_rank(method, loaded, weights, strategy, density,
                                                                       rank, seed, majority_sign, registry)
    else:
        weights, settings = _check_plugin_options(method, len(loaded), strategy, weights, density, rank, seed,
                                                  majority_sign, dtype)
        config, targets, tensors = method.compose(loaded, weights, strategy, dict(settings))
        tensors = {k: np.asarray(v) for k, v in tensors.items()}

    out_dtype = dtype or _common_dtype(loaded)
    from adapterkit.core.format.safetensors_io import DTYPES

    np_dtype = DTYPES[{"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}[out_dtype]]
    tensors = {k: v.astype(np_dtype, copy=False) for k, v in tensors.items()}
    composition = {
        "strategy": strategy,
        "weights": [float(w) for w in weights],
        "sources": [source_record(a) for a in loaded],
        **settings,
    }
    manifest = Manifest(
        method=method.name,
        method_version=method.version,
        config=config,
        targets=targets,
        dtype=out_dtype,
        base_model={**base_model, "fingerprint": targets_fingerprint(targets)},
        task=_common([a.manifest.task for a in loaded]),
        provenance={"created_by": created_by("compose"), "created_at": now_utc()},
    )
    _record_composition(manifest, composition)
    adapter = Adapter(manifest, tensors)
    if not isinstance(registry.method(adapter.method), LowRank):
        _check_plugin_result(method, adapter, strategy, registry)
    return adapter


def _compose_low_rank(method: Any, loaded: list[Adapter], weights: list[float], strategy: str, density: float | None,
                      rank: int | None, seed: int | None, majority_sign: str,
                      registry: Registry) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]],
                                                   dict[str, np.ndarray], dict[str, Any]]:
    """The low-rank strategies: (output method, config, targets, tensors, the settings the provenance records)."""
    out = factor_method(method, registry)
    configs = [method.resolve_config(a.config) for a in loaded]
    modules = sorted({m for a in loaded for m in a.targets})
    factors = {module: [(a.targets[module], method.lora_factors(module, a.targets[module], config,
                                                                 a.module_tensors(module)), weight)
                        for a, config, weight in zip(loaded, configs, weights, strict=True) if module in a.targets]
               for module in modules}
    if strategy == "svd" and rank is None:
        rank = max((int(f.a.shape[0]) for parts in factors.values() for _, f, _ in parts), default=1)
    if strategy in RANDOM_STRATEGIES and seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    rng = np.random.default_rng(seed) if strategy in RANDOM_STRATEGIES else None

    combined: dict[str, tuple[Mapping[str, Any], Factors]] = {}
    with single_threaded_blas():
        for module in modules:
            # (A [r, in], B [out, r], weight * scale) of each adapter holding the module (rank-0 modules add nothing)
            parts = [(np.asarray(f.a, dtype=np.float32), np.asarray(f.b, dtype=np.float32), weight * f.scale)
                     for _, f, weight in factors[module] if f.a.shape[0]]
            target = factors[module][0][0]
            if not parts:
                continue
            if strategy == "cat":
                new_a = np.concatenate([a * np.float32(c) for a, _, c in parts], axis=0)
                new_b = np.concatenate([b for _, b, _ in parts], axis=1)
            elif strategy == "svd":
                assert rank is not None
                new_a, new_b = cm.low_rank_svd([b for _, b, _ in parts], [a for a, _, _ in parts],
                                               [c for _, _, c in parts], rank)
            else:
                new_a, new_b = _combine_factors(module, parts, strategy, density, rng, majority_sign)
            combined[module] = ({"kind": target["kind"], "shape": list(target["shape"])}, Factors(new_a, new_b, 1.0))
    if not combined:
        raise UsageError("every module of the inputs has rank 0: there is nothing to compose", code="empty_adapter")
    settings: dict[str, Any] = {}
    if strategy in DENSITY_STRATEGIES:
        settings["density"] = float(density)  # type: ignore[arg-type]
    if strategy == "svd":
        settings["rank"] = rank
    if strategy in RANDOM_STRATEGIES:
        settings["seed"] = seed
    if strategy in SIGN_STRATEGIES:
        settings["majority_sign"] = majority_sign
    config, targets, tensors = out.from_factors(combined, like_config(loaded, set(combined), out is method))
    return out, config, targets, tensors, settings


def factor_method(method: Any, registry: Registry, purpose: str = "composed into one") -> Any:
    """The method that holds the result's factors: the input's, else the first installed :class:`FromFactors`."""
    if isinstance(method, FromFactors):
        return method
    found = next((m for m in registry.methods.values() if isinstance(m, FromFactors)), None)
    if found is None:
        raise UsageError(f"no installed method holds plain low-rank factors, so {method.name!r} adapters cannot be "
                         f"{purpose}", hint="install the lora method's plugin (it ships with adapterkit)",
                         code="not_composable")
    return found


def like_config(adapters: list[Adapter], modules: set[str], same_method: bool) -> dict[str, Any] | None:
    """A source config whose selection the result keeps: the inputs agree on it and on their modules."""
    selection = {(repr(a.config.get("target_modules")), repr(a.config.get("layers_to_transform"))) for a in adapters}
    dropout = _common([a.config.get("dropout", 0.0) for a in adapters])
    like: dict[str, Any] = {"dropout": dropout} if dropout else {}
    if same_method and len(selection) == 1 and all(set(a.targets) == modules for a in adapters):
        first = adapters[0].config
        like.update({k: first[k] for k in first if k not in ("r", "alpha", "rank_pattern", "alpha_pattern")})
    return like


# ---- checks -------------------------------------------------------------------

def _load(adapter: Adapter | str | os.PathLike[str], registry: Registry, base: Any = None) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    from adapterkit.core.store.adapters import load

    return load(adapter, base=base, registry=registry)


def _check_options(n: int, strategy: str, weights: Sequence[float] | None, density: float | None, rank: int | None,
                   seed: int | None, majority_sign: str, dtype: str | None) -> list[float]:
    def fail(message: str, **kw: Any) -> UsageError:
        return UsageError(message, code="bad_option", **kw)

    if n < 1:
        raise fail("compose needs at least one adapter", hint="pass two or more adapter folders")
    if strategy not in STRATEGIES:
        raise fail(f"unknown strategy {strategy!r}", expected=list(STRATEGIES), found=strategy)
    if weights is None:
        weights = [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise fail(f"{len(weights)} weight(s) given for {n} adapter(s)", expected=n, found=len(weights),
                   hint="pass one weight per adapter, e.g. --weights 0.7,0.3")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise fail("weights must be finite numbers", found=weights)
    if strategy in DENSITY_STRATEGIES:
        if density is None:
            raise fail(f"strategy {strategy} needs a density", hint="pass --density, e.g. 0.5 keeps half the entries")
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise fail("density must be in (0, 1]", found=density, hint="the fraction of entries kept, e.g. 0.5")
    elif density is not None:
        raise fail(f"density has no effect with strategy {strategy}", expected=list(DENSITY_STRATEGIES),
                   hint="leave --density out, or choose a pruning strategy")
    if rank is not None:
        if strategy != "svd":
            raise fail(f"rank has no effect with strategy {strategy} (only svd chooses its rank)",
                       hint="cat's rank is the sum of the input ranks; linear keeps the input rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise fail("rank must be an integer >= 1", found=rank)
    if seed is not None:
        if strategy not in RANDOM_STRATEGIES:
            raise fail(f"seed has no effect with strategy {strategy} (only dare_* is random)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise fail("seed must be an integer >= 0", found=seed)
    if majority_sign not in cm.SIGN_METHODS:
        raise fail(f"unknown majority sign method {majority_sign!r}", expected=list(cm.SIGN_METHODS))
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise fail(f"unknown dtype {dtype!r}", expected=["float32", "float16", "bfloat16"])
    return [float(w) for w in weights]


def _check_methods(adapters: list[Adapter], registry: Registry) -> Any:
    methods = sorted({a.method for a in adapters})
    if len(methods) > 1:
        raise UsageError("adapters of different methods cannot be composed", found=methods,
                         hint="lower them to LoRA first (adapterkit to-lora), or compose the adapters of each method separately", code="mixed_methods")
    method = registry.method(methods[0])
    if not isinstance(method, (LowRank, Composable)):
        raise UsageError(f"method {methods[0]!r} has no compose strategies", found=methods[0], code="not_composable",
                         expected=f"a method with low-rank factors, or one whose plugin declares compose strategies "
                                  f"(installed: {', '.join(_composable_methods(registry))})",
                         hint=_other_ways(method))
    return method


def _other_ways(method: Any) -> str:
    """What a user of a method without compose strategies can do instead."""
    if isinstance(method, RuntimeComposable) and method.composition_kinds:
        return (f"run them together at runtime instead: adapterkit compose --runtime "
                f"{'|'.join(method.composition_kinds)} writes a composition folder (docs/compose.md)")
    if can_merge(method):
        return "merge them into the base one after the other instead (adapterkit merge)"
    return f"method {method.name!r} has no way to combine adapters; use them one at a time"


def _composable_methods(registry: Registry) -> list[str]:
    """Installed methods that ``compose`` accepts: low-rank ones, and those whose plugin declares strategies."""
    return sorted(name for name, method in registry.methods.items() if isinstance(method, (LowRank, Composable)))


def _check_plugin_options(method: Any, n: int, strategy: str, weights: Sequence[float] | None, density: float | None,
                          rank: int | None, seed: int | None, majority_sign: str,
                          dtype: str | None) -> tuple[list[float], dict[str, Any]]:
    """Weights and the options a plugin's strategy receives (density, rank, seed: the ones given)."""
    def fail(message: str, **kw: Any) -> UsageError:
        return UsageError(message, code="bad_option", **kw)

    if strategy not in method.compose_strategies:  # a Composable method (the caller checked)
        raise fail(f"method {method.name!r} has no compose strategy {strategy!r}", found=strategy,
                   expected=list(method.compose_strategies))
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise fail(f"{len(weights)} weight(s) given for {n} adapter(s)", expected=n, found=len(weights),
                   hint="pass one weight per adapter, e.g. --weights 0.7,0.3")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise fail("weights must be finite numbers", found=weights)
    if majority_sign != "total":
        raise fail(f"majority_sign is a LoRA ties / dare_ties setting; method {method.name!r} does not take it")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise fail(f"unknown dtype {dtype!r}", expected=["float32", "float16", "bfloat16"])
    options = {k: v for k, v in (("density", density), ("rank", rank), ("seed", seed)) if v is not None}
    return [float(w) for w in weights], options


def _check_plugin_result(method: Any, adapter: Adapter, strategy: str, registry: Registry) -> None:
    """A plugin's compose must give an adapter consistent with its own expected tensors."""
    from adapterkit.core.errors import AdapterkitError
    from adapterkit.core.store.consistency import ValidationReport, check_tensors

    report = ValidationReport(f"compose ({method.name} {strategy})")
    check_tensors(adapter, registry, report)
    if report.errors:
        first = report.errors[0]
        raise AdapterkitError(f"method {method.name!r} composed an inconsistent adapter: {first.message}",
                              location=first.location, code="bad_plugin_result",
                              hint=f"a bug in the plugin that provides {method.name!r}; report it to its authors")






# ---- per-module math ------------------------------------------------------------

def _combine_factors(module: str, parts: list[tuple[np.ndarray, np.ndarray, float]], strategy: str,
                     density: float | None, rng: np.random.Generator | None,
                     sign_method: str) -> tuple[np.ndarray, np.ndarray]:
    ranks = sorted({a.shape[0] for a, _, _ in parts})
    if len(ranks) > 1:
        raise UsageError(
            f"strategy {strategy} combines the A and B factors entry by entry, so a module's ranks must be equal",
            location=module, found=ranks, hint="use --strategy cat (exact, ranks add up) or svd (choose the rank)",
            code="rank_mismatch")
    # weight * scale is split over the two factors: sqrt on each side, the sign on A's.
    weights_a = np.array([math.copysign(math.sqrt(abs(c)), 1.0 if c >= 0 else -1.0) for _, _, c in parts], np.float32)
    weights_b = np.array([math.sqrt(abs(c)) for _, _, c in parts], np.float32)
    out = []
    for tensors, w in (([a for a, _, _ in parts], weights_a), ([b for _, b, _ in parts], weights_b)):
        if strategy == "linear":
            out.append(cm.weighted_sum(tensors, w))
        elif strategy == "ties":
            out.append(cm.ties(tensors, w, density, sign_method))  # type: ignore[arg-type]
        elif strategy == "magnitude_prune":
            out.append(cm.magnitude_prune(tensors, w, density))  # type: ignore[arg-type]
        elif strategy == "dare_linear":
            out.append(cm.dare_linear(tensors, w, density, rng))  # type: ignore[arg-type]
        else:
            out.append(cm.dare_ties(tensors, w, density, rng, sign_method))  # type: ignore[arg-type]
    return out[0].astype(np.float32, copy=False), out[1].astype(np.float32, copy=False)


# ---- the output manifest ---------------------------------------------------------

def _common(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


def _common_dtype(adapters: list[Adapter]) -> str:
    dtypes = {a.manifest.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in ("float32", "float16", "bfloat16") else "float32"


def source_record(adapter: Adapter) -> dict[str, Any]:
    record: dict[str, Any] = {"method": adapter.method, "format": adapter.source_format}
    if adapter.source is not None:
        record["path"] = str(adapter.source)
    for key in ("name", "fingerprint"):
        if adapter.manifest.base_model.get(key):
            record[f"base_{key}"] = adapter.manifest.base_model[key]
    record["fingerprint"] = targets_fingerprint(adapter.targets)
    files = {name: entry["sha256"] for name, entry in adapter.manifest.tensors.items() if "sha256" in entry}
    if files and adapter.source_format == "adapterkit":
        record["sha256"] = files
    else:
        record["tensors_sha256"] = _tensors_sha256(adapter)
    return record


def _tensors_sha256(adapter: Adapter) -> str:
    """sha256 of the canonical safetensors bytes of the tensors (= the native file's sha256)."""
    from adapterkit.core.format.safetensors_io import serialize
    from adapterkit.core.store.native import SAFETENSORS_METADATA

    return hashlib.sha256(serialize(adapter.tensors, SAFETENSORS_METADATA)).hexdigest()


def _record_composition(manifest: Manifest, composition: dict[str, Any]) -> None:
    """Put the composition in provenance.composition (annotations until the schema knows that field)."""
    from adapterkit.core.format.manifest import schema

    known = schema()["properties"]["provenance"].get("properties", {})
    if "composition" in known:
        manifest.provenance["composition"] = composition
    else:
        manifest.annotations["adapterkit.composition"] = composition


