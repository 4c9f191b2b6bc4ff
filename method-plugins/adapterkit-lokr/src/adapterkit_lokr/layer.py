"""The torch side of LoKr: a :class:`adapterkit.WeightAdapterLayer` whose update is ``kron(W1, W2) * alpha / r``
(imported only when a model is touched)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapterkit import WeightAdapterLayer

from .math import scale_of, tensor_shapes


def new_parameters(layer: WeightAdapterLayer, config: Mapping[str, Any],
                   target: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """One module's parameters, float32 on the base weight's device, initialised as PEFT's ``LoKrLayer`` does:
    ``init_weights`` true (``reset_adapter_parameters``): W1 zero (w1 zero, or w1_a zero and w1_b kaiming), W2
    kaiming-uniform; ``"lycoris"`` (``reset_adapter_parameters_lycoris_way``): W1 kaiming, W2 zero (w2 zero, or
    w2_b zero and w2_a kaiming); false (``reset_adapter_parameters_random``): all kaiming-uniform(a=sqrt(5))."""
    device = layer.base_layer.weight.device
    init = config.get("init_weights", True)
    zero = set()
    if init is True:
        zero = {"w1", "w1_a"}
    elif init == "lycoris":
        zero = {"w2", "w2_b"}
    params = {}
    for name, shape in tensor_shapes(target).items():
        value = torch.empty(shape, device=device, dtype=torch.float32)
        if name in zero:
            nn.init.zeros_(value)
        else:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        params[name] = nn.Parameter(value)
    return params


class LokrLayer(WeightAdapterLayer):
    """``base_layer`` plus LoKr adapters: ``base(x) + x @ (kron(W1, W2) * alpha / r).T``.

    Training only (``self.training``), as PEFT's ``LoKrLayer.forward`` / ``get_delta_weight``: with
    ``module_dropout`` p the whole update is skipped when ``torch.rand(1) <= p``; with ``rank_dropout``
    p each output row of the update is kept when ``torch.rand(out) > p``, the mask divided by its mean
    when ``rank_dropout_scale`` (a mask with no row kept is left as is: PEFT would divide by zero).
    """

    def _half(self, name: str, side: str) -> torch.Tensor:
        params = self.params[name]
        if side in params:
            return params[side]
        return params[f"{side}_a"] @ params[f"{side}_b"]

    def delta(self, name: str) -> torch.Tensor:
        """``kron(W1, W2) * alpha / r`` ``[out, in]`` (PEFT's ``get_delta_weight`` / ``make_kron``)."""
        w1, w2 = self._half(name, "w1"), self._half(name, "w2")
        return torch.kron(w1, w2.contiguous()) * scale_of(self.target[name])

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.config[name]
        if self.training:
            module_dropout = config.get("module_dropout", 0.0)
            if module_dropout and not bool(torch.rand(1) > module_dropout):
                return torch.zeros((), dtype=x.dtype, device=x.device)
        delta = self.delta(name)
        rank_dropout = config.get("rank_dropout", 0.0)
        if self.training and rank_dropout:
            keep = (torch.rand(delta.shape[0]) > rank_dropout).to(delta.dtype)
            if config.get("rank_dropout_scale") and bool(keep.any()):
                keep = keep / keep.mean()
            delta = delta * keep.to(delta.device)[:, None]
        return F.linear(self.dropouts[name](x).to(delta.dtype), delta)


__all__ = ["LokrLayer", "new_parameters"]
