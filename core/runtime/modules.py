"""The modules of a live torch model an adapter can wrap: their kinds, the walk, the selection.

Every method plugin selects its modules with :func:`select_modules` (PEFT's rules,
:mod:`adapterkit.core.format.targeting`), and the adapter pool wraps the same kinds.
A *wrapper* is any module holding the module it wraps as ``base_layer`` (PEFT's
convention, and every adapterkit method's): the walk sees it in place of the wrapped
module and does not descend into it, so a second injection sees the same paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import UsageError
from adapterkit.core.format.targeting import ALL_LINEAR, CONV1D, LINEAR, excluded, in_layers, is_head, selects

KINDS = (LINEAR, CONV1D)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional here
        return None
    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (transformers Conv1D, weight ``[in, out]``) or None if neither.

    A bitsandbytes ``Linear4bit`` is an ``nn.Linear`` subclass: ``"linear"``.
    """
    if isinstance(module, nn.Linear):
        return LINEAR
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return CONV1D
    return None


def unwrapped(module: nn.Module) -> nn.Module:
    """The module a wrapper stands for (its ``base_layer``, recursively), or ``module`` itself."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def walk_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every sub-module in model order; a wrapper is visited, its insides are not."""
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if unwrapped(child) is child:
                yield from visit(child, path)

    yield from visit(model, "")


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings``), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def select_modules(model: nn.Module, target_modules: str | Sequence[str], *,
                   layers_to_transform: int | Sequence[int] | None = None,
                   layers_pattern: str | Sequence[str] | None = None,
                   exclude_modules: str | Sequence[str] | None = None, kinds: Sequence[str] = KINDS,
                   method: str = "the method", location: str = "$.method.config.target_modules") -> dict[str, nn.Module]:
    """The modules PEFT's selection rules pick (:func:`~adapterkit.core.format.targeting.selects`), by path, in
    model order (wrappers included as themselves).

    ``"all-linear"`` selects every module of ``kinds`` but the output head (in ``layers_to_transform``, not
    excluded). Raises ``UsageError`` when a selected module is not of ``kinds`` or nothing is selected.
    """
    head = output_embeddings(model)
    selected: dict[str, nn.Module] = {}
    for path, module in walk_modules(model):
        base = unwrapped(module)
        kind = module_kind(base)
        if target_modules == ALL_LINEAR:
            if (kind not in kinds or is_head(path) or head in (module, base) or excluded(path, exclude_modules)
                    or not in_layers(path, layers_to_transform, layers_pattern)):
                continue
        elif not selects(path, target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                         exclude_modules=exclude_modules):
            continue
        if kind not in kinds:
            names = {LINEAR: "nn.Linear", CONV1D: "transformers Conv1D"}
            raise UsageError(
                f"target_modules selects {path!r}, a {type(base).__name__}; {method} adapts only "
                f"{' and '.join(names.get(k, k) for k in kinds)} modules", location=location, found=path,
                hint="name the linear layers inside it instead (e.g. its q_proj / v_proj)", code="bad_target",
            )
        selected[path] = module
    if not selected:
        raise UsageError(
            "target_modules selects no module of the model", location=location, found=target_modules,
            hint='use module-name suffixes such as ["q_proj", "v_proj"], a regex matching whole module paths, '
            'or "all-linear"; check layers_to_transform and exclude_modules too', code="no_targets",
        )
    return selected


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The stored weight of a linear / Conv1D module (through any wrappers)."""
    return unwrapped(module).get_parameter("weight")


def describe(module: nn.Module) -> tuple[str, list[int]] | None:
    """(kind, stored weight shape) of a linear / Conv1D module, as a target records it; None otherwise."""
    base = unwrapped(module)
    kind = module_kind(base)
    return None if kind is None else (kind, list(base.get_parameter("weight").shape))


def check_free_name(name: Any) -> None:
    """An adapter name a wrapper can key its dicts by: a non-empty string without a dot."""
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError("adapter name must be a non-empty string without '.'", found=name, code="bad_name")


__all__ = ["KINDS", "check_free_name", "describe", "module_kind", "output_embeddings", "replace_module",
           "select_modules", "unwrapped", "walk_modules", "weight_of"]
