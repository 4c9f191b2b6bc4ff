"""The torch wrapper that adds LoRA-family adapters (LoRA, DoRA, QLoRA) to a linear module.

:class:`LoraLayer` keeps the original module as ``base_layer`` and holds each
named adapter's A ``[r, in]`` and B ``[out, r]`` in name-keyed dicts, so several
adapters live in one model and merge / unmerge one at a time. Each adapter
belongs to one method (``self.method[name]``): ``lora`` and ``qlora`` add
``scale * B @ A``; ``dora`` also holds a magnitude vector ``m`` ``[out]``
(``lora_magnitude``) and rescales each output row (:mod:`.dora_math`). The
base may be a bitsandbytes 4-bit ``Linear4bit`` (QLoRA, :mod:`.quant`).

Merging folds the adapters into the base weight in place, in merge order:
``W += scale * B @ A`` for LoRA, ``W = (m / ||W0 + dW||_row) * (W + dW)`` for
DoRA (``W0`` the unmerged base, PEFT's rule). Exactness: before the first merge
the layer keeps a copy of the original weight (a non-persistent buffer); the
weight is then always recomputed from ``original`` and the merged adapters, so
unmerging the last adapter restores the original bits and merging twice
changes nothing. A 4-bit base cannot take a merge in place: the layer swaps in
a dense ``nn.Linear`` holding ``dequantised W`` + the merged updates and keeps
the ``Linear4bit`` aside (outside the module tree), so unmerging puts the very
same 4-bit module back (bit for bit). Disabling a method's adapters takes
their merged updates out of the weight until they are enabled again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapterkit.core.format.targeting import CONV1D, LINEAR  # noqa: F401  (re-exported for the quant helpers)
from adapterkit import module_kind, replace_module  # noqa: F401  (re-exported)

from . import dora_math, quant
from .targeting import in_out_features


def describe(module: nn.Module) -> tuple[str, list[int]] | None:
    """(kind, stored weight shape) of the *original* module, as an adapter's target records it.

    A module quantised by :func:`quant.quantize_module` reports what it replaced
    (a GPT-2 Conv1D stays ``conv1d`` ``[in, out]``); another 4-bit linear reports
    ``linear`` ``[out, in]``.
    """
    if quant.is_quantized(module):
        return quant.source_of(module)
    kind = module_kind(module)
    if kind is None:
        return None
    return kind, list(module.get_parameter("weight").shape)


class LoraLayer(nn.Module):
    """A linear or Conv1D module (optionally 4-bit) plus any number of named LoRA-family adapters."""

    weight_before_merge: torch.Tensor | None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = module_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        if quant.is_quantized(base_layer):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = in_out_features(kind, tuple(self.base_weight.shape))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only: m [out]
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.method: dict[str, str] = {}  # adapter name -> method id ("lora", "dora", "qlora")
        self.merged: list[str] = []  # adapter names folded into the weight, in merge order
        self.disabled_methods: set[str] = set()
        # runtime composition (adapterkit.activate): adapter name -> coefficient; None: every adapter, weight 1
        self.composition: dict[str, float] | None = None
        self.register_buffer("weight_before_merge", None, persistent=False)
        # the 4-bit base while a dense merged copy stands in for it (kept out of the module tree)
        self.__dict__["quantized_base"] = None

    def __getattr__(self, name: str) -> Any:
        # Callers of the wrapped module (weight, bias, nf, in_features...) still find its attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight (``[out, in]``, or ``[in, out]`` for Conv1D; packed for 4-bit)."""
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def enabled(self) -> bool:
        """True when no method's adapters are disabled in this layer."""
        return not self.disabled_methods

    def dense_weight(self) -> torch.Tensor:
        """The current base weight as a dense ``[out, in]`` tensor (dequantised for a 4-bit base)."""
        if quant.is_quantized(self.base_layer):
            return quant.dequantize(self.base_layer)
        weight = self.base_weight
        return weight.T if self.kind == CONV1D else weight

    # ---- adapters ---------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scale: float, dropout: float = 0.0, init: str = "default",
                    method: str = "lora") -> None:
        """Create adapter ``name`` with fresh A (random) and B (zeros): the output is unchanged.

        A ``dora`` adapter also gets its magnitude ``m = ||W||_row`` (the norm of ``W + scale * B @ A`` with B = 0).
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = self.base_weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        a = torch.empty(r, self.in_features, dtype=dtype, device=weight.device)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=weight.device))
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.r[name], self.alpha[name], self.scale[name], self.method[name] = r, alpha, scale, method
        if method == "dora":
            with torch.no_grad():
                lora_weight = self.lora_B[name] @ self.lora_A[name]
                norm = dora_math.weight_norm(self.dense_weight().to(dtype), lora_weight, scale)
            self.lora_magnitude[name] = nn.Parameter(norm.detach().clone())

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of adapter ``name`` by canonical param name (``A``, ``B``, and DoRA's ``magnitude``)."""
        params = {"A": self.lora_A[name], "B": self.lora_B[name]}
        if name in self.lora_magnitude:
            params["magnitude"] = self.lora_magnitude[name]
        return params

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in float32 (or float64), in the stored weight's orientation."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = (b.detach().to(dtype) @ a.detach().to(dtype)) * self.scale[name]
        return delta.T if self.kind == CONV1D else delta

    def is_active(self, name: str) -> bool:
        return self.method.get(name, "lora") not in self.disabled_methods

    # ---- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        result = base_out
        # attributes read once: module attribute lookups are a measurable share of a small-rank overhead
        lora_a, lora_b, dropouts, magnitudes = self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude
        merged, composition, scales = self.merged, self.composition, self.scale
        for name in lora_a:
            if name in merged or not self.is_active(name):
                continue
            if composition is not None:
                if name not in composition:
                    continue
                result = result + self._composed_delta(x, name, composition[name]).to(result.dtype)
                continue
            a, b = lora_a[name], lora_b[name]
            if a.dtype != x.dtype:
                a, b = a.to(x.dtype), b.to(x.dtype)
            dropout = dropouts[name]
            if name in magnitudes:
                extra = dora_math.forward_extra(
                    x, a, b, magnitudes[name], scales[name], self.dense_weight(),
                    getattr(self.base_layer, "bias", None), base_out, dropout,
                )
                result = result + extra.to(result.dtype)
                continue
            hidden = nn.functional.linear(x if isinstance(dropout, nn.Identity) else dropout(x), a)
            if result.dtype == hidden.dtype:
                # result + scale * hidden @ B^T in one BLAS call: no separate multiply and add passes
                # over the [tokens, out] output (most of a small rank's unmerged overhead)
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), b.t(),
                                   alpha=scales[name])
                result = flat.view(result.shape)
            else:
                delta = nn.functional.linear(hidden, b) * scales[name]
                result = result + delta.to(result.dtype)
        return result

    def _composed_delta(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        """``weight * scale * B @ A @ x``: one term of a runtime weighted sum (LoRA / QLoRA adapters only)."""
        a, b = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        delta = nn.functional.linear(nn.functional.linear(self.lora_dropout[name](x), a), b)
        return delta * (self.scale[name] * weight)

    # ---- merge / enable ---------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (a no-op when already merged)."""
        if name not in self.lora_A:
            raise KeyError(name)
        if self.composition is not None and name not in self.merged:
            from adapterkit.core.errors import UsageError

            raise UsageError("cannot merge while a runtime composition is active",
                             hint="adapterkit.deactivate(model) first", code="composition_active")
        if name not in self.merged:
            self.merged.append(name)
            self.sync_weight()

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight (a no-op when not merged)."""
        if name in self.merged:
            self.merged.remove(name)
            self.sync_weight()

    def set_enabled(self, enabled: bool, method: str | None = None) -> None:
        """Turn the adapters of ``method`` (every method when None) on or off."""
        if method is None:
            self.disabled_methods = set() if enabled else {"lora", *self.method.values()}
        elif enabled:
            self.disabled_methods.discard(method)
        else:
            self.disabled_methods.add(method)
        self.sync_weight()

    def _merged_total(self, original: torch.Tensor) -> torch.Tensor:
        """``original`` (stored orientation) with every active merged adapter folded in, in merge order."""
        total = original.to(torch.promote_types(original.dtype, torch.float32))
        for name in self.merged:
            if not self.is_active(name):
                continue
            delta = self.delta_weight(name).to(device=total.device, dtype=total.dtype)
            if name in self.lora_magnitude:
                factor = dora_math.merge_factor(original.to(total.dtype), delta, self.lora_magnitude[name],
                                                self.kind == CONV1D)
                total = factor * (total + delta)
            else:
                total = total + delta
        return total

    def sync_weight(self) -> None:
        """Set the base weight to ``original`` + the active merged adapters (just ``original`` when none)."""
        if self.quantized_base is not None or quant.is_quantized(self.base_layer):
            self._sync_quantized()
            return
        weight = self.base_weight
        with torch.no_grad():
            if not self.merged:
                if self.weight_before_merge is not None:
                    weight.copy_(self.weight_before_merge)
                    self.weight_before_merge = None
                return
            if self.weight_before_merge is None:
                self.weight_before_merge = weight.detach().clone()
            original = self.weight_before_merge
            if not any(self.is_active(n) for n in self.merged):
                weight.copy_(original)
                return
            weight.copy_(self._merged_total(original).to(weight.dtype))

    def _sync_quantized(self) -> None:
        """4-bit base: a dense ``nn.Linear`` (dequantised W + merges) while merged, the 4-bit module otherwise."""
        quantized = self.quantized_base if self.quantized_base is not None else self.base_layer
        if not any(self.is_active(n) for n in self.merged):
            if self.quantized_base is not None:
                self.base_layer = quantized
                self.__dict__["quantized_base"] = None
            return
        with torch.no_grad():
            total = self._merged_total(quant.dequantize(quantized).float())
            self.base_layer = quant.dense_linear(quantized, total)
        self.__dict__["quantized_base"] = quantized

    def release(self) -> nn.Module:
        """The base module with merged adapters kept folded in; the wrapper is not usable after."""
        self.disabled_methods = set()
        self.sync_weight()
        self.weight_before_merge = None
        self.__dict__["quantized_base"] = None
        return self.base_layer

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}({self.method[n]}, r={self.r[n]}, alpha={self.alpha[n]})" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{adapters}], merged={self.merged}, disabled={sorted(self.disabled_methods)}"


# ---- model-level helpers ----------------------------------------------------

def lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, Any]]:
    """(path, layer) of every LoRA wrapper in ``model`` (holding ``adapter_name`` when given): the
    ``LoraLayer`` of each adapted module and the ``LoraParameter`` of each adapted parameter (its path)."""
    from .param_layer import parameter_layers

    layers: list[tuple[str, Any]] = [(path, module) for path, module in model.named_modules()
                                     if isinstance(module, LoraLayer)]
    layers += parameter_layers(model)
    return [(path, layer) for path, layer in layers if adapter_name is None or adapter_name in layer.lora_A]


def wrap(model: nn.Module, path: str, module: nn.Module) -> LoraLayer:
    """The LoRA wrapper at ``path``, created around ``module`` if it is not one already."""
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module).train(module.training)  # an eval model stays in eval mode
    replace_module(model, path, layer)
    return layer
