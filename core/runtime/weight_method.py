"""The torch life cycle of a weight-update method (public: ``adapterkit.WeightAdapterMethod``).

A method plugin whose adapter changes each adapted module's weight (LoHa, LoKr,
VeRA, AdaLoRA, OFT, BOFT, ...) subclasses :class:`WeightAdapterMethod` (beside
:class:`adapterkit.Method` and its capabilities) and gives:

- ``layer_class``: its :class:`adapterkit.WeightAdapterLayer` subclass (in a module that
  imports torch; return it from the ``layer_class`` property so that importing the
  plugin never imports torch);
- :meth:`~WeightAdapterMethod.new_parameters`: one module's parameters, initialised for
  training, under their canonical parameter names;
- optionally :meth:`~WeightAdapterMethod.target_fields` (per-module manifest fields such as
  a rank from a ``rank_pattern``), :meth:`~WeightAdapterMethod.new_dropout`,
  :meth:`~WeightAdapterMethod.new_shared` (tensors shared by every module, VeRA's
  projections) and :meth:`~WeightAdapterMethod.select` (which modules a config adapts).

It implements the torch half of :class:`adapterkit.Method`: ``inject`` (with a config, or
exactly the recorded targets of a saved adapter), ``load_state``, ``extract_state``,
``trainable_parameters``, ``set_enabled``, ``merge``, ``unmerge`` and ``unload``. Canonical
keys are ``<module>.<method>.<param>`` and, for shared tensors, ``<method>.<param>``.

Torch-free at import: torch is imported inside the calls that touch a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import BaseModelError, TensorFileError, UsageError
from adapterkit.core.format.adapter import canonical_key, shared_key

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from adapterkit.core.runtime.weight_layer import WeightAdapterLayer


class WeightAdapterMethod:
    """Mixin: the torch life cycle of a method whose adapters live in :class:`WeightAdapterLayer` wrappers."""

    name: str = ""

    @property
    def layer_class(self) -> type[WeightAdapterLayer]:
        """The method's :class:`WeightAdapterLayer` subclass (import its torch module here)."""
        raise NotImplementedError(f"method {self.name!r} gives no layer_class")

    # ---- what a method gives ----------------------------------------------------------
    def new_parameters(self, layer: WeightAdapterLayer, config: Mapping[str, Any],
                       target: Mapping[str, Any]) -> dict[str, nn.Parameter]:
        """One module's parameters for a new adapter, initialised for training (``param name -> Parameter``)."""
        raise NotImplementedError(f"method {self.name!r} gives no new_parameters")

    def select(self, model: nn.Module, config: Mapping[str, Any]) -> dict[str, nn.Module]:
        """The modules ``config`` adapts (path -> module): PEFT's ``target_modules`` / ``layers_to_transform`` /
        ``layers_pattern`` rules through :func:`adapterkit.select_modules`, minus ``exclude_modules``."""
        from adapterkit.core.runtime.modules import select_modules

        return select_modules(model, config["target_modules"], layers_to_transform=config.get("layers_to_transform"),
                              layers_pattern=config.get("layers_pattern"), exclude_modules=config.get("exclude_modules"),
                              method=self.name)

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        """The method's own fields of a new target (beyond ``kind`` and ``shape``); default none."""
        return {}

    def new_dropout(self, config: Mapping[str, Any], target: Mapping[str, Any]) -> nn.Module | None:
        """The module applied to the adapter's input (training only, e.g. ``nn.Dropout``); default none."""
        return None

    def new_shared(self, model: nn.Module, config: Mapping[str, Any],
                   targets: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Tensors every module of a new adapter shares (``param name -> tensor``); default none.

        An ``nn.Parameter`` with ``requires_grad`` trains (once, whatever the number of modules);
        any other tensor is fixed. :meth:`adapterkit.Method.shared_tensors` must list them.
        """
        return {}

    # ---- the Method contract's torch half ------------------------------------------------
    def inject(self, model: nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        from adapterkit.core.runtime.modules import check_free_name, describe, replace_module

        config = self.resolve_config(config)  # type: ignore[attr-defined]
        check_free_name(adapter_name)
        layer_class = self.layer_class
        modules = self._recorded(model, targets) if targets is not None else self.select(model, config)
        plan: dict[str, dict[str, Any]] = {}
        for path, module in modules.items():
            if isinstance(module, layer_class):
                if adapter_name in module.params:
                    raise UsageError(f"module {path} already holds a {self.name} adapter named {adapter_name!r}",
                                     location=path, hint="inject under another name", code="duplicate_adapter")
            elif getattr(module, "base_layer", None) is not None:
                raise UsageError(f"module {path} is already wrapped by an adapter of another method", location=path,
                                 hint=f"adapt other modules with {self.name}, or use one method per module",
                                 code="wrapped_module")
            kind, shape = describe(module)  # type: ignore[misc]
            recorded = dict(targets[path]) if targets is not None else {}
            fields = recorded or self.target_fields(path, kind, shape, config)
            plan[path] = {**fields, "kind": kind, "shape": shape}
        keep = self._adapter_parameter_ids(model)
        for param in model.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
        from adapterkit.core.runtime.weight_layer import SharedTensors

        tensors = self.new_shared(model, config, plan)
        shared = SharedTensors(tensors) if tensors else None  # one module, held by every layer of the adapter
        for path, target in plan.items():
            module = model.get_submodule(path)
            layer = module if isinstance(module, layer_class) else layer_class(module)
            if layer is not module:
                replace_module(model, path, layer)
            params = self.new_parameters(layer, config, target)
            layer.add_adapter(adapter_name, params, target=target, config=config, dropout=self.new_dropout(config, target),
                              shared=shared)
            for param in params.values():
                param.requires_grad_(True)
        return {path: {k: v for k, v in target.items()} for path, target in plan.items()}

    def load_state(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        import torch

        own = self._named_tensors(model, adapter_name)
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise TensorFileError(f"{self.name} tensors do not match the injected adapter {adapter_name!r}: "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected",
                                  expected={"missing": missing[:5]}, found={"unexpected": unexpected[:5]},
                                  hint=f"the tensors must be the canonical <module>.{self.name}.<param> of exactly "
                                       "the adapted modules (and the adapter's shared tensors)", code="tensor_mismatch")
        for key, value in own.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                raise TensorFileError(f"{self.name} tensor has the wrong shape", location=key, expected=list(value.shape),
                                      found=list(tensors[key].shape), code="tensor_shape")
        layers = self._layers_of(model, adapter_name)
        merged = [layer for _, layer in layers if adapter_name in layer.merged]
        for layer in merged:
            layer.unmerge(adapter_name)
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(torch.as_tensor(tensors[key]).to(device=value.device, dtype=value.dtype))
        for layer in merged:
            layer.merge(adapter_name)

    def extract_state(self, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in self._named_tensors(model, adapter_name).items()}

    def trainable_parameters(self, model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
        import torch

        return [value for value in self._named_tensors(model, adapter_name).values()
                if isinstance(value, torch.nn.Parameter) and value.requires_grad]

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        from adapterkit.core.runtime.weight_layer import weight_layers

        layers = weight_layers(model, self.layer_class)
        for path, layer in layers:
            if not enabled and layer.merged:
                raise UsageError(f"module {path} holds a merged {self.name} adapter; unmerge it before disabling",
                                 location=path, code="merged_adapter")
        for _, layer in layers:
            layer.enabled = bool(enabled)

    def merge(self, model: nn.Module, adapter_name: str = "default") -> None:
        for _, layer in self._layers_of(model, adapter_name):
            layer.merge(adapter_name)

    def unmerge(self, model: nn.Module, adapter_name: str = "default") -> None:
        for _, layer in self._layers_of(model, adapter_name):
            layer.unmerge(adapter_name)

    def unload(self, model: nn.Module) -> nn.Module:
        """Put every base module back; merged adapters stay folded in (merge + unload = a merged model)."""
        from adapterkit.core.runtime.modules import replace_module
        from adapterkit.core.runtime.weight_layer import weight_layers

        for path, layer in weight_layers(model, self.layer_class):
            if path:
                replace_module(model, path, layer.base_layer)
            else:
                model = layer.base_layer
        return model

    # ---- helpers ----------------------------------------------------------------------------
    def _recorded(self, model: nn.Module, targets: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
        """The modules a saved adapter's targets name, each checked against its recorded kind and shape."""
        from adapterkit.core.runtime.modules import describe

        hint = "apply the adapter to the base model it was made for"
        if not targets:
            raise UsageError("the adapter has no targets", code="no_targets")
        modules = {}
        for path, target in targets.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise BaseModelError(f"module {path} not found in the model", location=path, hint=hint,
                                     code="missing_module") from None
            found = describe(module)
            if found is None or found[0] != target.get("kind"):
                raise BaseModelError(f"module {path} is not of the recorded kind", location=path,
                                     expected=target.get("kind"), found=found[0] if found else type(module).__name__,
                                     hint=hint, code="kind_mismatch")
            if found[1] != [int(d) for d in target["shape"]]:
                raise BaseModelError(f"module {path}: base weight shape differs from the adapter's", location=path,
                                     expected=list(target["shape"]), found=found[1], hint=hint, code="shape_mismatch")
            modules[path] = module
        return modules

    def _layers_of(self, model: nn.Module, adapter_name: str) -> list[tuple[str, WeightAdapterLayer]]:
        from adapterkit.core.runtime.weight_layer import weight_layers

        layers = [(p, layer) for p, layer in weight_layers(model, self.layer_class) if adapter_name in layer.params]
        if not layers:
            raise UsageError(f"the model holds no {self.name} adapter named {adapter_name!r}", code="unknown_adapter")
        return layers

    def _named_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter under its canonical key: each module's parameters, then the shared ones."""
        tensors: dict[str, Any] = {}
        layers = self._layers_of(model, adapter_name)
        for path, layer in layers:
            for param, value in layer.params[adapter_name].items():
                tensors[canonical_key(path, self.name, param)] = value
        for param, value in layers[0][1].shared.get(adapter_name, {}).items():
            tensors[shared_key(self.name, param)] = value
        return tensors

    def _adapter_parameter_ids(self, model: nn.Module) -> set[int]:
        """Parameters of adapters already in the model (any method): injecting another one keeps them trainable."""
        from adapterkit.core.runtime.inject import attached

        keep: set[int] = set()
        for injected in attached(model).values():
            keep.update(id(p) for p in injected.parameters())
        return keep


__all__ = ["WeightAdapterMethod"]
