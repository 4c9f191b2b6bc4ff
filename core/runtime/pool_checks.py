"""The checks an adapter passes before the pool stores it: method, targets, tensors, shapes, ranks, values.

Torch is imported (the factors become torch views); the pool (``adapterkit.core.runtime.pool``)
calls :func:`plan_factors` from ``load``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adapterkit.core.errors import UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.targeting import in_out_features
from adapterkit.core.plugin.capabilities import LowRank, can_merge
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.runtime.pool_reader import as_torch, non_finite

#: one module's factors: A ``[r, in]``, B ``[out, r]`` (torch), and the scale of ``B @ A``
Plan = tuple[torch.Tensor, torch.Tensor, float]


def plan_factors(adapter: Adapter, name: str, layers: Mapping[str, Any], max_rank: int,
                 registry: Registry | None = None, finite_checked: bool = False) -> dict[str, Plan]:
    """module path -> (A ``[r, in]``, B ``[out, r]``, scale) of ``adapter`` for the pool's ``layers``.

    Every check the pool makes before anything is stored happens here: the method gives
    low-rank factors (:class:`~adapterkit.LowRank`), its targets are among the pool's, the
    tensors are exactly the expected ones, each factor fits its module, ranks are at most
    ``max_rank``, values are finite (unless the reader checked that already). Raises
    :class:`~adapterkit.core.errors.UsageError` naming the file, the module and the fix.
    Rank-0 modules (AdaLoRA after pruning) are left out.
    """
    where = str(adapter.source) if adapter.source else name
    registry = registry or default_registry()
    method = registry.method(adapter.method)
    if not isinstance(method, LowRank):
        raise UsageError(f"the pool serves adapters with low-rank factors; {where} is a {adapter.method!r} adapter, "
                         "whose method gives none", file=where, found=adapter.method,
                         expected=f"a method with low-rank factors (installed: {', '.join(_low_rank(registry))})",
                         hint=("lower it to a LoRA (adapterkit to-lora), merge it into the base (adapterkit merge) "
                               "or apply it with adapterkit.apply") if can_merge(method)
                         else "apply it with adapterkit.apply",
                         code="unsupported_method")
    config = method.resolve_config(adapter.config)
    outside = sorted(set(adapter.targets) - set(layers))
    if outside:
        raise UsageError(
            f"{len(outside)} module(s) of the adapter are not among the pool's targets", file=where,
            expected=f"a subset of the pool's {len(layers)} targets", found=outside,
            hint="make the pool with target_modules covering them (targets are fixed when the pool is made)",
            code="targets_mismatch",
        )
    expected: set[str] = set(method.shared_tensors(adapter.targets, config))
    for path, target in adapter.targets.items():
        expected.update(method.expected_tensors(path, target, config))
    unexpected = sorted(set(adapter.tensors) - expected)
    if unexpected:
        raise UsageError(f"unexpected tensor in a {adapter.method} adapter", file=where, location=unexpected[0],
                         expected=f"the tensors of its targets ({len(expected)})", code="tensor_mismatch")
    plan = {}
    for path, target in adapter.targets.items():
        layer = layers[path]
        problems = method.check_target(path, target, adapter.config)
        features = (layer.in_features, layer.out_features)
        if not problems and in_out_features(target["kind"], target["shape"]) != features:
            problems.append(f"the adapter's module is a {target['kind']} {target['shape']}; the model's is a "
                            f"{layer.kind} {list(layer.base_layer.weight.shape)}")
        if problems:
            raise UsageError(f"target does not fit the pool: {problems[0]}", file=where, location=path,
                             hint="use the base model the adapter was made for", code="target")
        tensors = adapter.module_tensors(path)
        missing = sorted(k for k in method.expected_tensors(path, target, config) if k not in adapter.tensors)
        if missing:
            raise UsageError(f"{adapter.method} tensors of a target are missing", file=where, location=path,
                             expected=missing, code="missing_tensor")
        a, b, scale = method.lora_factors(path, target, config, tensors)
        r = int(a.shape[0]) if len(a.shape) == 2 else -1
        if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
            raise UsageError("low-rank factors do not fit the module", file=where, location=path,
                             expected={"A": ["r", layer.in_features], "B": [layer.out_features, "r"]},
                             found={"A": list(a.shape), "B": list(b.shape)},
                             hint="use the base model the adapter was made for", code="tensor_shape")
        if r > max_rank:
            raise UsageError(f"rank {r} exceeds the pool's max_rank", file=where, location=path,
                             expected=f"<= {max_rank}", found=r,
                             hint="make the pool with a larger max_rank", code="rank_too_large")
        if r == 0:
            continue  # a pruned module (AdaLoRA): nothing to serve
        if not finite_checked and (non_finite(a) or non_finite(b)):
            raise UsageError("adapter tensors hold NaN or infinite values", file=where, location=path,
                             hint="the training diverged; retrain or restore a checkpoint", code="non_finite")
        plan[path] = (as_torch(a), as_torch(b), float(scale))
    return plan


def _low_rank(registry: Registry) -> list[str]:
    return sorted(name for name, method in registry.methods.items() if isinstance(method, LowRank))
