"""The torch side of LoHa: :class:`LohaLayer`, an :class:`adapterkit.WeightAdapterLayer` with the LoHa update.

Wrapping, enabling, merging and exact unmerging come from the base class; this module gives the
update (PEFT's ``make_weight``: ``(w1_a @ w1_b) * (w2_a @ w2_b) * scale``), the training-time
``module_dropout`` and ``rank_dropout`` of PEFT's ``LoHaLayer.forward`` / ``get_delta_weight``,
and the initialisation of ``LoHaLayer.reset_adapter_parameters`` (``_random`` when
``init_weights`` is false).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from adapterkit import WeightAdapterLayer

from .math import PARAMS, loha_scale


def new_parameters(layer: WeightAdapterLayer, r: int, init_weights: bool = True) -> dict[str, nn.Parameter]:
    """One module's ``w1_a [out, r]``, ``w1_b [r, in]``, ``w2_a [out, r]``, ``w2_b [r, in]``.

    PEFT's ``reset_adapter_parameters``: every factor kaiming-uniform (``a = sqrt(5)``) except ``w2_b``,
    zeros, so that a new adapter changes nothing; with ``init_weights`` false all four are random
    (``reset_adapter_parameters_random``). float32 unless the base weight is float64, on its device.
    """
    weight = layer.base_layer.weight
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    out, inn = layer.out_features, layer.in_features
    shapes = {"w1_a": (out, r), "w1_b": (r, inn), "w2_a": (out, r), "w2_b": (r, inn)}
    params = {}
    for name, shape in shapes.items():
        value = torch.empty(shape, dtype=dtype, device=weight.device)
        if name == "w2_b" and init_weights:
            nn.init.zeros_(value)
        else:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        params[name] = nn.Parameter(value)
    return params


class LohaLayer(WeightAdapterLayer):
    """A linear / Conv1D module with LoHa adapters (``params[name]`` holds ``w1_a``, ``w1_b``, ``w2_a``, ``w2_b``)."""

    def scale(self, name: str) -> float:
        target = self.target[name]
        return loha_scale(target["alpha"], target["r"])

    def delta(self, name: str) -> torch.Tensor:
        """``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`` ``[out, in]``, in the parameters' dtype (PEFT's ``make_weight``)."""
        w1_a, w1_b, w2_a, w2_b = (self.params[name][p] for p in PARAMS)
        return ((w1_a @ w1_b) * (w2_a @ w2_b)) * self.scale(name)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds: ``x @ delta.T``; in training mode PEFT's two dropouts apply.

        ``module_dropout`` (``LoHaLayer.forward``): the update is skipped for this forward when a uniform draw
        is not above it (drawn even at 0, so the random stream, and a seeded training step, match PEFT's).
        ``rank_dropout`` (``get_delta_weight(apply_rank_dropout=True)``): each output row of the update is kept
        when a uniform draw is above it, and the kept rows are divided by the kept share (when no row is kept
        the update is zero; PEFT divides by zero there).
        """
        config = self.config[name]
        if self.training:
            module_dropout = float(config.get("module_dropout", 0.0))
            if not bool(torch.rand(1) > module_dropout):  # drawn in every training forward, as PEFT does
                return torch.zeros((*x.shape[:-1], self.out_features), dtype=x.dtype, device=x.device)
        delta = self.delta(name)
        rank_dropout = float(config.get("rank_dropout", 0.0))
        if self.training and rank_dropout:
            keep = (torch.rand(delta.shape[0]) > rank_dropout).to(delta.dtype)
            share = keep.mean()
            keep = keep / share if share > 0 else keep  # all rows dropped: a zero update (PEFT: NaN)
            delta = delta * keep.to(delta.device).view(-1, 1)
        return F.linear(x.to(delta.dtype), delta)


__all__ = ["LohaLayer", "new_parameters"]
