"""LoRA on a parameter itself (a ``parameter`` target, :mod:`.stacked`): a torch parametrization.

``LoraParameter`` is registered on the parameter's module with
``torch.nn.utils.parametrize`` (as PEFT's ``ParamWrapper`` does), so every read of
``module.<name>`` (transformers' experts read ``self.gate_up_proj`` in their forward,
whatever the experts implementation) gives ``W + sum of the active adapters' deltas``.
It has the wrapper interface the LoRA family's methods use (``lora_A`` / ``lora_B``
dicts by adapter name, ``merged``, ``merge`` / ``unmerge``, ``set_enabled``, ``release``).
Merging writes the update into the stored parameter (keeping a copy of the original,
so unmerging restores its bits).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import stacked


class LoraParameter(nn.Module):
    """Named LoRA adapters on one parameter, 2-D ``[out, in]`` or stacked ``[n, d1, d2]``."""

    weight_before_merge: torch.Tensor | None

    def __init__(self, shape: tuple[int, ...], layout: str = stacked.OUT_IN):
        super().__init__()
        self.shape, self.layout = tuple(shape), layout
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.method: dict[str, str] = {}
        self.merged: list[str] = []
        self.disabled_methods: set[str] = set()
        self.composition: dict[str, float] | None = None
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.__dict__["owner"] = None  # (module, parameter name) once registered

    # ---- registration ------------------------------------------------------
    @classmethod
    def on(cls, module: nn.Module, name: str, layout: str) -> LoraParameter:
        """The ``LoraParameter`` of ``module.<name>``, registered now if there is none."""
        if parametrize.is_parametrized(module, name):
            for existing in module.parametrizations[name]:
                if isinstance(existing, LoraParameter):
                    return existing
            raise TypeError(f"parameter {name!r} already has another parametrization")
        param = module.get_parameter(name)
        if getattr(module, "adapterkit_parameter_order", None) is None:  # parametrizing reorders _parameters
            module.adapterkit_parameter_order = [n for n, _ in module.named_parameters(recurse=False)]
        layer = cls(tuple(param.shape), layout)
        parametrize.register_parametrization(module, name, layer, unsafe=True)
        layer.__dict__["owner"] = (module, name)
        return layer

    @property
    def original(self) -> torch.Tensor:
        module, name = self.__dict__["owner"]
        return module.parametrizations[name].original

    # ---- adapters ------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scale: float, dropout: float = 0.0, init: str = "default",
                    method: str = "lora") -> None:
        """Adapter ``name`` with A random and B zero (no change until trained)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this parameter")
        weight = self.original
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        target = {"kind": "parameter", "shape": list(self.shape), "layout": self.layout}
        a_shape, b_shape = stacked.factor_shapes(target, r)
        a = torch.empty(a_shape, dtype=dtype, device=weight.device)
        for block in a.view(-1, *a_shape[-2:]):
            if init == "gaussian":
                nn.init.normal_(block, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=weight.device))
        self.r[name], self.alpha[name], self.scale[name], self.method[name] = r, alpha, scale, method

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {"A": self.lora_A[name], "B": self.lora_B[name]}

    def is_active(self, name: str) -> bool:
        return self.method.get(name, "lora") not in self.disabled_methods

    def delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``scale * B @ A`` (per expert), shaped like the parameter, differentiable."""
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        delta = torch.matmul(b, a) * self.scale[name]
        return delta.transpose(-1, -2) if self.layout == stacked.IN_OUT and len(self.shape) == 3 else delta

    # ---- the parametrization -------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        result = weight
        work = torch.promote_types(weight.dtype, torch.float32)
        for name in self.lora_A:
            if name in self.merged or not self.is_active(name):
                continue
            coefficient = 1.0
            if self.composition is not None:
                if name not in self.composition:
                    continue
                coefficient = self.composition[name]
            result = result + (self.delta(name, work) * coefficient).to(weight.dtype)
        return result

    # ---- merge / enable --------------------------------------------------------
    def merge(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(name)
        if name not in self.merged:
            self.merged.append(name)
            self.sync_weight()

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.merged.remove(name)
            self.sync_weight()

    def set_enabled(self, enabled: bool, method: str | None = None) -> None:
        if method is None:
            self.disabled_methods = set() if enabled else {"lora", *self.method.values()}
        elif enabled:
            self.disabled_methods.discard(method)
        else:
            self.disabled_methods.add(method)
        self.sync_weight()

    def sync_weight(self) -> None:
        """The stored parameter: the original plus the active merged adapters, in merge order."""
        weight = self.original
        with torch.no_grad():
            active = [n for n in self.merged if self.is_active(n)]
            if self.weight_before_merge is None:
                if not active:
                    return
                self.weight_before_merge = weight.detach().clone()
            total = self.weight_before_merge.to(torch.promote_types(weight.dtype, torch.float32))
            for name in active:
                total = total + self.delta(name, total.dtype)
            weight.copy_(total.to(weight.dtype))
            if not self.merged:
                self.weight_before_merge = None

    def release(self) -> None:
        """Remove the parametrization; merged adapters stay folded into the parameter."""
        self.disabled_methods = set()
        self.sync_weight()
        self.weight_before_merge = None
        module, name = self.__dict__["owner"]
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self.__dict__["owner"] = None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}({self.method[n]}, r={self.r[n]}, alpha={self.alpha[n]})" for n in self.lora_A)
        return f"shape={list(self.shape)}, layout={self.layout}, adapters=[{adapters}], merged={self.merged}"


def parameter_layers(model: nn.Module) -> list[tuple[str, LoraParameter]]:
    """(parameter path, ``LoraParameter``) of every LoRA-adapted parameter of ``model``."""
    out = []
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for item in plist:
                if isinstance(item, LoraParameter):
                    out.append((f"{path}.{name}" if path else name, item))
    return out


def parameters_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s own parameters in registration order, a parametrized one by its original."""
    out = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        out += [(name, plist.original) for name, plist in module.parametrizations.items()]
    order = getattr(module, "adapterkit_parameter_order", None)
    if order:
        out.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    return out
