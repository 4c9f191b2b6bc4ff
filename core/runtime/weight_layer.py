"""The torch wrapper of methods whose adapter is a change of a module's weight (public: ``adapterkit.WeightAdapterLayer``).

LoHa, LoKr, VeRA, AdaLoRA, OFT and BOFT differ only in how their tensors make the
update; the wrapping, the dropout on the adapter's input, enabling, merging and
exact unmerging are the same. A method plugin subclasses :class:`WeightAdapterLayer`
and implements one of:

- :meth:`~WeightAdapterLayer.delta` (additive methods): the update ``dW`` ``[out, in]``
  of one adapter, so the module computes ``base(x) + dropout(x) @ dW.T``; or
- :meth:`~WeightAdapterLayer.adapted_weight` with ``transforms_weight = True``
  (multiplicative methods, e.g. OFT's rotation): the adapted weight ``[out, in]`` from the
  weight before it, so the module computes ``F.linear(x, adapted(W), bias)``.

Orientation: every call works on ``[out, in]`` (``nn.Linear``'s); a GPT-2 ``Conv1D``'s
stored ``[in, out]`` weight is transposed on the way in and out. A method may override
:meth:`~WeightAdapterLayer.adapter_output` with a cheaper forward (a low-rank path) that
computes the same function.

Merging folds an adapter into the stored weight (``W + dW``, or ``adapted(W)``); the
layer keeps the exact weight from before each merge, so unmerging restores the original
bits, and adapters merged after the one unmerged stay merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapterkit.core.errors import UsageError
from adapterkit.core.runtime.modules import describe, module_kind


class SharedTensors(nn.Module):
    """An adapter's tensors shared by every module (VeRA's projections): ONE such module is held by every layer
    of the adapter, so ``model.to(device)`` moves each tensor once and the layers keep sharing it.

    An ``nn.Parameter`` is registered as a parameter (it trains when it requires grad); any other tensor is a
    non-persistent buffer (the adapter's file holds it, not the model's ``state_dict``).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        for key, value in tensors.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(key, value)
            else:
                self.register_buffer(key, value, persistent=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """param name -> tensor, parameters first."""
        return {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}


class WeightAdapterLayer(nn.Module):
    """A linear or Conv1D ``base_layer`` plus named adapters that change its weight.

    Per adapter name: ``params[name]`` (an ``nn.ParameterDict`` of the method's parameters,
    under their canonical parameter names), ``dropouts[name]`` (applied to the adapter's
    input; ``nn.Identity`` by default), ``target[name]`` (the module's manifest target:
    ``kind``, ``shape`` and the method's own fields), ``config[name]`` (the resolved
    method config) and ``shared[name]`` (the adapter's tensors shared by every module,
    e.g. VeRA's projections, by parameter name: one :class:`SharedTensors` module held by
    every layer, so moving the model moves them once and they stay shared).
    """

    #: True for methods that implement :meth:`adapted_weight` instead of :meth:`delta`
    transforms_weight: bool = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        found = describe(base_layer) if module_kind(base_layer) is not None else None
        if found is None:
            raise UsageError(f"{type(self).__name__} wraps nn.Linear and transformers Conv1D modules, "
                             f"not {type(base_layer).__name__}", hint="an adapter of another method already wraps "
                             "it when it is such a module: use one method per module", code="unsupported_module")
        self.base_layer = base_layer
        self.kind, self.shape = found
        self.out_features, self.in_features = (self.shape if self.kind == "linear" else self.shape[::-1])
        self.params = nn.ModuleDict()
        self.dropouts = nn.ModuleDict()
        self.target: dict[str, dict[str, Any]] = {}
        self.config: dict[str, dict[str, Any]] = {}
        self.shared_tensors = nn.ModuleDict()
        self.merged: list[str] = []
        self._saved: dict[str, torch.Tensor] = {}
        self.enabled = True
        self.train(base_layer.training)  # a wrapper made in an eval-mode model stays in eval mode

    # ---- what a method implements ------------------------------------------------
    def delta(self, name: str) -> torch.Tensor:
        """The additive update ``[out, in]`` of adapter ``name`` (any float dtype; the layer casts)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither delta nor adapted_weight")

    def adapted_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight ``[out, in]`` with adapter ``name`` applied to ``weight`` (``[out, in]``).

        Default: ``weight + delta(name)``. A method with ``transforms_weight = True`` overrides it.
        """
        return weight + self.delta(name).to(weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output for input ``x`` (additive methods)."""
        delta = self.delta(name)
        return F.linear(self.dropouts[name](x).to(delta.dtype), delta)

    # ---- adapters -------------------------------------------------------------------
    @property
    def shared(self) -> dict[str, dict[str, torch.Tensor]]:
        """adapter name -> its shared tensors by param name (the same tensor objects on every layer)."""
        return {name: holder.tensors() for name, holder in self.shared_tensors.items()}

    def add_adapter(self, name: str, parameters: dict[str, nn.Parameter], *, target: dict[str, Any],
                    config: dict[str, Any], dropout: nn.Module | None = None,
                    shared: SharedTensors | Mapping[str, torch.Tensor] | None = None) -> None:
        """Hold a new adapter: its parameters (trainable), input dropout, target, config and shared tensors
        (pass one :class:`SharedTensors` to every layer of the adapter; a mapping is wrapped for this layer alone)."""
        if name in self.params:
            raise UsageError(f"the module already holds an adapter named {name!r}", hint="inject under another name",
                             code="duplicate_adapter")
        self.params[name] = nn.ParameterDict(parameters)
        self.dropouts[name] = (dropout if dropout is not None else nn.Identity()).train(self.training)
        self.target[name] = dict(target)
        self.config[name] = dict(config)
        if shared:
            self.shared_tensors[name] = shared if isinstance(shared, SharedTensors) else SharedTensors(shared)

    def active(self) -> list[str]:
        """The adapters the forward applies: enabled and not merged, in the order they were added."""
        return [n for n in self.params if n not in self.merged] if self.enabled else []

    def linear_weight(self) -> torch.Tensor:
        """The stored weight as ``[out, in]`` (a view: transposed for Conv1D)."""
        weight = self.base_layer.weight
        return weight if self.kind == "linear" else weight.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.transforms_weight:
            weight = self.linear_weight()
            for name in active:
                weight = self.adapted_weight(name, weight)
            bias = getattr(self.base_layer, "bias", None)
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    # ---- merge: exact unmerge by restoring saved copies ---------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the stored weight (a no-op when it is merged already)."""
        if name in self.merged:
            return
        weight = self.base_layer.weight
        self._saved[name] = weight.detach().clone()
        with torch.no_grad():
            linear = self.linear_weight().detach()
            adapted = self.adapted_weight(name, linear.float())
            weight.copy_((adapted if self.kind == "linear" else adapted.T).to(weight.dtype))
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the stored weight exactly; later merges stay merged."""
        if name not in self.merged:
            return
        redo = []
        while self.merged:
            last = self.merged.pop()
            saved = self._saved.pop(last)
            with torch.no_grad():
                self.base_layer.weight.copy_(saved)
            if last == name:
                break
            redo.append(last)
        for other in reversed(redo):
            self.merge(other)

    def remove_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (unmerged first)."""
        self.unmerge(name)
        for store in (self.params, self.dropouts, self.shared_tensors):
            if name in store:
                del store[name]
        for store in (self.target, self.config):
            store.pop(name, None)


def weight_layers(model: nn.Module, layer_class: type[WeightAdapterLayer] = WeightAdapterLayer) -> list[tuple[str, WeightAdapterLayer]]:
    """(path, layer) of every ``layer_class`` wrapper in ``model``, in model order."""
    return [(path, module) for path, module in model.named_modules() if isinstance(module, layer_class)]


__all__ = ["SharedTensors", "WeightAdapterLayer", "weight_layers"]
