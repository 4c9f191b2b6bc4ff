"""The torch side of the public API: inject a method into a model, apply a saved adapter.

This module imports torch; the rest of the core does not.
"""

from __future__ import annotations

from adapterkit.core.format.provenance import created_by, now_utc

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapterkit.core.errors import BaseModelError, UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import base_fields, targets_fingerprint
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.format.module_index import ModuleIndex, resolve_targets
from adapterkit.core.format.targeting import PARAMETER
from adapterkit.core.format.torch_bridge import dtype_name, to_numpy, to_torch
from adapterkit.core.plugin.method import Method
from adapterkit.core.plugin.registry import Registry, default_registry

ATTACHED = "adapterkit_adapters"


@contextlib.contextmanager
def method_disabled(method: Any, model: torch.nn.Module) -> Iterator[None]:
    """Every adapter of ``method`` on ``model`` switched off inside the block, back on after it."""
    method.set_enabled(model, False)
    try:
        yield
    finally:
        method.set_enabled(model, True)


@dataclass
class InjectedAdapter:
    """One adapter living in a model: its parameters, merge state and manifest data."""

    model: torch.nn.Module
    method: Method
    config: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    name: str = "default"
    merged: bool = False

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters to train."""
        return self.method.trainable_parameters(self.model, self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors under canonical keys."""
        return self.method.extract_state(self.model, self.name)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.method.load_state(self.model, tensors, self.name)

    def merge(self) -> None:
        if not self.merged:
            self.method.merge(self.model, self.name)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.method.unmerge(self.model, self.name)
            self.merged = False

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Run the base model alone inside this block."""
        return method_disabled(self.method, self.model)

    def to_adapter(
        self,
        *,
        dtype: str | None = None,
        task: str | None = None,
        base_name: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        annotations: Mapping[str, Any] | None = None,
    ) -> Adapter:
        """Snapshot the adapter as an :class:`Adapter` ready to save."""
        tensors = self.state_dict()
        dtype = dtype or dtype_name(next(iter(tensors.values())).dtype)
        arrays = {k: to_numpy(v.to(_torch_dtype(dtype)) if v.is_floating_point() else v) for k, v in tensors.items()}
        manifest = Manifest(
            method=self.method.name,
            method_version=self.method.version,
            config=self.method.minimal_config(self.config),
            targets=self.targets,
            dtype=dtype,
            base_model=base_model_fields(self.model, self.targets, base_name),
            task=task or guess_task(self.model),
            provenance={"created_by": created_by(), "created_at": now_utc(), **(provenance or {})},
            annotations=dict(annotations or {}),
        )
        return Adapter(manifest, arrays)


def _torch_dtype(name: str) -> torch.dtype:
    from adapterkit.core.format.torch_bridge import torch_dtype

    return torch_dtype(name)


def base_model_fields(model: torch.nn.Module, targets: Mapping[str, Mapping[str, Any]], name: str | None) -> dict[str, Any]:
    config = getattr(model, "config", None)
    fields: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    if config is not None:
        fields.update(base_fields(model))
        fields["name"] = name or getattr(config, "name_or_path", None) or None
    elif name:
        fields["name"] = name
    fields["num_parameters"] = base_parameter_count(model)
    return {k: v for k, v in fields.items() if v}


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the base alone (adapter parameters excluded), counted once each."""
    adapter_ids = set()
    for injected in getattr(model, ATTACHED, {}).values():
        adapter_ids.update(id(p) for p in injected.method.trainable_parameters(model, injected.name))
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or id(param) in adapter_ids:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def guess_task(model: torch.nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForSequenceClassification", "sequence-classification"),
        ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
        ("ForConditionalGeneration", "seq2seq-lm"), ("Model", "feature-extraction"),
    ):
        if name.endswith(suffix):
            return task
    return None


def attached(model: torch.nn.Module) -> dict[str, InjectedAdapter]:
    """The adapters injected into ``model``, by name."""
    return getattr(model, ATTACHED, {})


def _check_free(model: torch.nn.Module, name: str) -> None:
    if name in attached(model):
        raise UsageError(f"an adapter named {name!r} is already injected", hint="choose another name")


def _attach(model: torch.nn.Module, injected: InjectedAdapter) -> None:
    table = getattr(model, ATTACHED, None)
    if table is None:
        table = {}
        object.__setattr__(model, ATTACHED, table)
    table[injected.name] = injected


def detach(model: torch.nn.Module, name: str) -> InjectedAdapter | None:
    """Forget the handle of adapter ``name`` (the method's unload removes its modules)."""
    return attached(model).pop(name, None)


def inject(
    model: torch.nn.Module,
    method: str,
    config: Mapping[str, Any] | None = None,
    *,
    name: str = "default",
    registry: Registry | None = None,
    **options: Any,
) -> InjectedAdapter:
    """Add a new, trainable adapter of ``method`` to ``model``.

    ``config`` and keyword ``options`` are merged (options win), e.g.
    ``inject(model, "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])``.
    """
    registry = registry or default_registry()
    plugin = registry.method(method)
    _check_free(model, name)
    resolved = plugin.resolve_config({**(config or {}), **options})
    targets = plugin.inject(model, resolved, name)
    injected = InjectedAdapter(model, plugin, resolved, targets, name)
    _attach(model, injected)
    return injected


def live_index(model: torch.nn.Module) -> ModuleIndex:
    """The modules of a live model (a wrapper standing for what it wraps) with their stored weight shapes."""
    from adapterkit.core.runtime.modules import unwrapped, walk_modules

    def shape(module: torch.nn.Module) -> tuple[int, ...] | None:
        weight = getattr(unwrapped(module), "weight", None)
        if not isinstance(weight, torch.Tensor) or hasattr(weight, "quant_state"):  # a 4-bit weight is packed
            return None
        return tuple(int(d) for d in weight.shape)

    return ModuleIndex.from_modules(((path, shape(m)) for path, m in walk_modules(model)))


def check_targets(adapter: Adapter, model: torch.nn.Module) -> None:
    """Every target of ``adapter`` is a module of ``model`` with the recorded shape, resolved as ``validate --base``
    resolves it; else the first problem is raised (a missing module names the closest path the model has)."""
    modules = {m: t for m, t in adapter.targets.items() if t.get("kind") != PARAMETER}
    _, problems = resolve_targets(modules, live_index(model))
    for path, target in sorted(adapter.targets.items()):
        if path in modules:
            continue
        try:
            shape = list(model.get_parameter(path).shape)  # a parameter target names the parameter itself
        except AttributeError:
            problems.append(BaseModelError(f"the adapter targets parameter {path}, which the model does not have",
                                           location=path, hint="is this the right base model?",
                                           code="missing_module"))
            continue
        if shape != [int(d) for d in target["shape"]]:
            problems.append(BaseModelError("the model's parameter has another shape than the adapter's target",
                                           location=path, expected=list(target["shape"]), found=shape,
                                           hint="the adapter was made for another base model", code="wrong_base"))
    if problems:
        first = problems[0]
        if len(problems) > 1:
            first.message += f" (and {len(problems) - 1} more problem(s) like it)"
        raise first


def apply(adapter: Adapter, model: torch.nn.Module, *, name: str = "default", registry: Registry | None = None) -> torch.nn.Module:
    """Inject a saved adapter into ``model`` and load its weights; returns the model.

    The handle is available as ``adapterkit.core.runtime.inject.attached(model)[name]``.
    """
    registry = registry or default_registry()
    plugin = registry.method(adapter.method)
    _check_free(model, name)
    check_targets(adapter, model)
    resolved = plugin.resolve_config(adapter.config)
    targets = plugin.inject(model, resolved, name, targets=adapter.targets)
    plugin.load_state(model, {k: to_torch(v) for k, v in adapter.tensors.items()}, name)
    _attach(model, InjectedAdapter(model, plugin, resolved, targets, name))
    return model
