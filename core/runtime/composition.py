"""Runtime composition in a live model: activate a block of injected adapters, deactivate it, save and reload it.

This module imports torch (through :mod:`.session`). The blocks are
:mod:`adapterkit.core.format.composition`; the folder format is
:mod:`adapterkit.core.store.composition_folder`; the math is the members' method's
(:meth:`adapterkit.Method.activate_composition`), docs/compose.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterkit.core.errors import UsageError
from adapterkit.core.format import composition as comp
from adapterkit.core.plugin.capabilities import composition_refusal
from adapterkit.core.plugin.method import Method
from adapterkit.core.plugin.registry import Registry
from adapterkit.core.runtime.inject import InjectedAdapter, apply, attached, method_disabled
from adapterkit.core.store.composition_folder import load_composition, save_composition

ACTIVE = "adapterkit_composition"


@dataclass
class ActiveComposition:
    """A composition running in ``model``: its block, the members' method and their handles."""

    model: torch.nn.Module
    composition: comp.Block
    method: Method

    @property
    def members(self) -> dict[str, InjectedAdapter]:
        handles = attached(self.model)
        return {name: handles[name] for name in self.composition.members()}

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Run the base model alone inside this block (every adapter of the members' method off)."""
        return method_disabled(self.method, self.model)

    def deactivate(self) -> None:
        deactivate(self.model)

    def save(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, dtype: str | None = None,
             base_name: str | None = None, annotations: Mapping[str, Any] | None = None,
             registry: Registry | None = None) -> Path:
        """Write the composition folder with every member's current weights copied in (``adapters/<name>``)."""
        adapters = {name: handle.to_adapter(dtype=dtype, base_name=base_name) for name, handle in self.members.items()}
        return save_composition(out_dir, self.composition, adapters, overwrite=overwrite, annotations=annotations,
                                registry=registry)


def active_composition(model: torch.nn.Module) -> ActiveComposition | None:
    """The composition running in ``model``, or None."""
    return getattr(model, ACTIVE, None)


def activate(model: torch.nn.Module, composition: Any, *, registry: Registry | None = None) -> ActiveComposition:
    """Run only the adapters of ``composition``, combined as it says, until :func:`deactivate`.

    ``composition`` is a block (``Stack``, ``Average``, ``WeightedSum``), its JSON dict, one
    adapter name or a list of names (a ``Stack``). Every member must be injected into ``model``
    (``inject`` / ``apply``) under its name, all of one method, none merged. A method that cannot
    run the composition is refused with its reason before anything changes.
    """
    del registry  # the members' handles carry their method
    block = comp.check(comp.parse(composition), location="composition")
    handles = attached(model)
    missing = [name for name in block.members() if name not in handles]
    if missing:
        raise UsageError(f"adapter {missing[0]!r} of the composition is not injected into the model",
                         expected=sorted(handles), found=missing,
                         hint="inject or apply every member under its name first", code="unknown_adapter")
    members = [handles[name] for name in block.members()]
    methods = sorted({handle.method.name for handle in members})
    if len(methods) > 1:
        raise UsageError("a composition's members must be of one method", found=methods,
                         hint="compose adapters of each method separately", code="mixed_methods")
    method = members[0].method
    refusal = composition_refusal(method, block)
    if refusal:
        raise UsageError(refusal, code="composition_unsupported")
    merged = [handle.name for handle in members if handle.merged]
    if merged:
        raise UsageError("merged adapters cannot take part in a runtime composition", found=merged,
                         hint="unmerge them first", code="composition_active")
    previous = active_composition(model)
    if previous is not None and previous.method is not method:
        previous.method.deactivate_composition(model)
    method.activate_composition(model, block)
    active = ActiveComposition(model, block, method)
    object.__setattr__(model, ACTIVE, active)
    return active


def deactivate(model: torch.nn.Module) -> comp.Block | None:
    """Stop the running composition (the model runs as after injection again); returns it, or None."""
    active = active_composition(model)
    if active is None:
        return None
    active.method.deactivate_composition(model)
    object.__delattr__(model, ACTIVE)
    return active.composition


def apply_composition(path: str | os.PathLike[str], model: torch.nn.Module, *,
                      registry: Registry | None = None) -> ActiveComposition:
    """Load a composition folder, apply every member to ``model`` under its name, and activate it.

    Every member is loaded and the composition checked before the model changes.
    """
    folder = load_composition(path, registry=registry)
    block = folder.composition
    taken = [name for name in folder.adapters if name in attached(model)]
    if taken:
        raise UsageError(f"the model already holds an adapter named {taken[0]!r}", found=taken,
                         hint="apply the composition to a fresh model", code="duplicate_adapter")
    from adapterkit.core.store.composition_folder import check_members

    check_members(block, folder.adapters, registry or _default())
    for name in block.members():
        apply(folder.adapters[name], model, name=name, registry=registry)
    return activate(model, block)


def _default() -> Registry:
    from adapterkit.core.plugin.registry import default_registry

    return default_registry()
