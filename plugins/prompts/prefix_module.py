"""The torch side of prefix tuning: learned key/value prefixes in every layer's attention.

:class:`PrefixTuning` is registered as the child ``adapterkit_prefix`` of the
top model and holds one :class:`PrefixEncoder` per named adapter. A forward
pre-hook on the top model does the work, with the transformers cache API:

- first call (no cache, or an empty one, e.g. the one ``generate`` creates):
  the prefixes of every enabled adapter (concatenated in injection order) are
  written into the cache, layer by layer, as ``[batch, kv_heads, n, head_dim]``
  keys and values; a new ``DynamicCache`` is made when the call has none. The
  attention mask gets ``n`` ones on the left; given ``position_ids`` are
  shifted by ``n`` (without them the model counts from the cache length:
  the same positions, PEFT's convention).
- a call continuing from a cache this adapter filled (decode steps, or
  ``outputs.cache`` passed back) only extends the mask and shifts positions.

Outputs need no change: the prefixes occupy no output position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import UsageError
from . import virtual

from .prefix_layout import METHOD, LayerPlan

CHILD = "adapterkit_prefix"


class PrefixEncoder(nn.Module):
    """One adapter's prefixes ``[n, layers * 2 * kv_dim]`` (PEFT's layout), direct or through the MLP.

    Column block ``2 * l`` holds layer ``l``'s keys and block ``2 * l + 1`` its values.
    """

    def __init__(self, count: int, num_layers: int, kv_dim: int, *, projection: bool = False,
                 hidden: int | None = None, init: str = "random", device: Any = None):
        super().__init__()
        width = num_layers * 2 * kv_dim
        self.count, self.width = count, width
        self.weight: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.transform: nn.Sequential | None = None
        if projection:
            hidden = hidden or kv_dim
            self.embedding = nn.Parameter(torch.randn(count, kv_dim, device=device))
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)).to(device)
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            make = torch.zeros if init == "zero" else torch.randn
            self.weight = nn.Parameter(make(count, width, device=device))

    @property
    def projected(self) -> bool:
        return self.transform is not None

    def forward(self) -> torch.Tensor:
        if self.transform is not None:
            return self.transform(self.embedding)
        assert self.weight is not None
        return self.weight

    def set_folded(self, value: torch.Tensor) -> None:
        """Hold ``value`` directly (the MLP, if any, is dropped: it cannot be recovered from its output)."""
        device = (self.weight if self.weight is not None else self.embedding).device
        with torch.no_grad():
            weight = value.detach().to(device=device, dtype=torch.float32).clone()
        self.transform = None
        self.embedding = None
        self.weight = nn.Parameter(weight)


class PrefixTuning(nn.Module):
    """The prefixes of every prefix-tuning adapter of one model, and the hook that puts them in the cache."""

    def __init__(self, plans: list[LayerPlan]):
        super().__init__()
        self.plans = plans
        self.encoders = nn.ModuleDict()
        self.enabled = True
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def kv_dim(self) -> int:
        return self.plans[0].kv_dim

    @property
    def num_virtual_tokens(self) -> int:
        return sum(encoder.count for encoder in self.encoders.values())

    def values(self) -> torch.Tensor:
        """Every adapter's prefixes, concatenated along the virtual tokens: ``[n, layers * 2 * kv_dim]``."""
        parts = [encoder() for encoder in self.encoders.values()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def layer_slice(self, values: torch.Tensor, plan: LayerPlan, which: int) -> torch.Tensor:
        """Keys (``which`` 0) or values (1) of one layer: ``[n, kv_dim]``."""
        start = (2 * plan.layer + which) * self.kv_dim
        return values[:, start:start + self.kv_dim]

    def _before(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.enabled or not len(self.encoders):
            return None
        kwargs = virtual.bind_call(model, args, kwargs)
        name, cache = virtual.take_cache(model, kwargs)
        batch, length = virtual.inputs_shape(kwargs)
        past, held = virtual.cache_length(cache), virtual.marks(cache)
        if METHOD in held:  # continuing: the cache already holds the prefixes
            count = held[METHOD]
            kwargs["attention_mask"] = virtual.extend_continuing_mask(
                kwargs.get("attention_mask"), count, past, length, "prefix tuning")
            kwargs["position_ids"] = virtual.shift_positions(kwargs.get("position_ids"), count)
            return (), kwargs
        if past:
            raise UsageError(
                "the cache holds tokens that were not run through this prefix-tuning adapter",
                hint="start from an empty cache (or the cache a call of this model returned)", code="bad_cache",
            )
        virtual.check_no_checkpointing(model, "prefix tuning")
        values = self.values()
        values = values.to(dtype=virtual.model_dtype(model, values), device=_device(model, values))
        count = values.shape[0]
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            kwargs[name] = cache
        for plan in self.plans:
            keys, vals = (
                self.layer_slice(values, plan, which).view(count, plan.heads, plan.head_dim)
                .permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
                for which in (0, 1)
            )
            cache.update(keys, vals, plan.layer)
        virtual.mark(cache, METHOD, count)
        kwargs["attention_mask"] = virtual.prepend_ones(kwargs.get("attention_mask"), count, "prefix tuning")
        kwargs["position_ids"] = virtual.shift_positions(kwargs.get("position_ids"), count)
        return (), kwargs


def _device(model: nn.Module, fallback: torch.Tensor) -> torch.device:
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        module = embeddings() if callable(embeddings) else None
    except (AttributeError, NotImplementedError):
        module = None
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else fallback.device


def prefix_tuning(model: nn.Module) -> PrefixTuning | None:
    child = getattr(model, CHILD, None)
    return child if isinstance(child, PrefixTuning) else None


def weight_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Module path -> weight shape of every module with a 2-D weight (a wrapper stands for what it wraps)."""
    shapes: dict[str, list[int]] = {}
    for path, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        weight = getattr(base, "weight", None)
        if path and isinstance(weight, torch.Tensor) and weight.dim() == 2 and not path.endswith(".base_layer"):
            shapes[path] = [int(d) for d in weight.shape]
    return shapes
