"""The torch wrapper that adds LoRA adapters to a linear module.

:class:`LoraLayer` keeps the original module as ``base_layer`` and holds each
named adapter's A ``[r, in]`` and B ``[out, r]`` in name-keyed dicts, so several
adapters live in one model and merge / unmerge one at a time.

Merging folds ``scale * B @ A`` (float32 math) into the base weight in place.
Exactness: before the first merge the layer keeps a copy of the original
weight (a non-persistent buffer); the weight is then always recomputed as
``original + sum of the merged deltas``, so unmerging the last adapter restores
the original bits and merging twice changes nothing. Disabling a merged layer
puts the original weight back until it is enabled again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .targeting import in_out_features

LINEAR = "linear"
CONV1D = "conv1d"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (transformers Conv1D, weight ``[in, out]``) or None if unsupported."""
    if isinstance(module, nn.Linear):
        return LINEAR
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return CONV1D
    return None


class LoraLayer(nn.Module):
    """A linear or Conv1D module plus any number of named LoRA adapters."""

    weight_before_merge: torch.Tensor | None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = module_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = in_out_features(kind, tuple(self.base_weight.shape))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.merged: list[str] = []  # adapter names folded into the weight, in merge order
        self.enabled = True
        self.register_buffer("weight_before_merge", None, persistent=False)

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
        """The wrapped module's weight (``[out, in]``, or ``[in, out]`` for Conv1D)."""
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    # ---- adapters ---------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scale: float, dropout: float = 0.0, init: str = "default") -> None:
        """Create adapter ``name`` with fresh A (random) and B (zeros): the output is unchanged."""
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
        self.r[name], self.alpha[name], self.scale[name] = r, alpha, scale

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in float32 (or float64), in the stored weight's orientation."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = (b.detach().to(dtype) @ a.detach().to(dtype)) * self.scale[name]
        return delta.T if self.kind == CONV1D else delta

    # ---- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return result
        for name in self.lora_A:
            if name in self.merged:
                continue
            a = self.lora_A[name].to(x.dtype)
            b = self.lora_B[name].to(x.dtype)
            delta = nn.functional.linear(nn.functional.linear(self.lora_dropout[name](x), a), b) * self.scale[name]
            result = result + delta.to(result.dtype)
        return result

    # ---- merge / enable ---------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (a no-op when already merged)."""
        if name not in self.lora_A:
            raise KeyError(name)
        if name not in self.merged:
            self.merged.append(name)
            self.sync_weight()

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight (a no-op when not merged)."""
        if name in self.merged:
            self.merged.remove(name)
            self.sync_weight()

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self.sync_weight()

    def sync_weight(self) -> None:
        """Set the base weight to ``original + merged deltas`` (just ``original`` when disabled)."""
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
            if not self.enabled:
                weight.copy_(original)
                return
            total = original.to(torch.promote_types(original.dtype, torch.float32))
            for name in self.merged:
                total = total + self.delta_weight(name).to(device=total.device, dtype=total.dtype)
            weight.copy_(total.to(weight.dtype))

    def release(self) -> nn.Module:
        """The base module with merged adapters kept folded in; the wrapper is not usable after."""
        self.enabled = True
        self.sync_weight()
        self.weight_before_merge = None
        return self.base_layer

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, alpha={self.alpha[n]})" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{adapters}], merged={self.merged}, enabled={self.enabled}"


# ---- model-level helpers ----------------------------------------------------

def lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """(path, layer) of every LoRA wrapper in ``model`` (holding ``adapter_name`` when given)."""
    return [
        (path, module) for path, module in model.named_modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.lora_A)
    ]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def wrap(model: nn.Module, path: str, module: nn.Module) -> LoraLayer:
    """The LoRA wrapper at ``path``, created around ``module`` if it is not one already."""
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module).train(module.training)  # an eval model stays in eval mode
    replace_module(model, path, layer)
    return layer
