"""The torch side of VeRA (imported only when a model is touched): the layer, the projections and the vectors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapterkit import WeightAdapterLayer

from .method import LAMBDA_B, LAMBDA_D, SHARED_A, SHARED_B


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 ``[rows, cols]`` tensor drawn uniform in ``+-sqrt(3) * sqrt(2) / sqrt(cols)`` from ``generator``
    (fan_in = cols): the bound is computed in the order PEFT's ``vera.model._kaiming_init`` computes it, so the
    draws are the same bits."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(cols))
    with torch.no_grad():
        return torch.empty((rows, cols), dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared projections ``A [r, max_in]`` and ``B [max_out, r]`` (CPU, float32) drawn from a CPU
    ``torch.Generator`` seeded with ``key``, ``A`` first: PEFT's ``VeraModel._init_vera_A_vera_B``."""
    generator = torch.Generator(device="cpu").manual_seed(int(key))
    shared_a = _kaiming_uniform(r, max_in, generator)
    shared_b = _kaiming_uniform(max_out, r, generator)
    return shared_a, shared_b


def new_vectors(layer: WeightAdapterLayer, config: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """``lambda_d [r]`` and ``lambda_b [out]`` of a new adapter (float32, on the base weight's device), as PEFT's
    ``VeraLayer.update_layer`` leaves them: ``init_weights`` true: ``d_initial`` and zeros (the adapter changes
    nothing); false: ``N(0, 1)`` (torch's global generator) and ones."""
    r = int(config["r"])
    device = layer.base_layer.weight.device
    if config.get("init_weights", True):
        lambda_d = torch.full((r,), float(config["d_initial"]), dtype=torch.float32)
        lambda_b = torch.zeros(layer.out_features, dtype=torch.float32)
    else:
        lambda_d = torch.randn(r, dtype=torch.float32)
        lambda_b = torch.ones(layer.out_features, dtype=torch.float32)
    return {LAMBDA_D: nn.Parameter(lambda_d.to(device)), LAMBDA_B: nn.Parameter(lambda_b.to(device))}


class VeraLayer(WeightAdapterLayer):
    """A linear / Conv1D ``base_layer`` plus VeRA adapters: ``params[name]`` holds ``lambda_d`` and ``lambda_b``,
    ``shared[name]`` the adapter's projections ``A`` and ``B`` (the same tensors on every layer, frozen)."""

    def _parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        params, shared = self.params[name], self.shared[name]
        lambda_d, lambda_b = params[LAMBDA_D], params[LAMBDA_B]
        shared_a = shared[SHARED_A][:, : self.in_features].to(device=lambda_d.device, dtype=lambda_d.dtype)
        shared_b = shared[SHARED_B][: self.out_features, :].to(device=lambda_d.device, dtype=lambda_d.dtype)
        return lambda_d, lambda_b, shared_a, shared_b

    def delta(self, name: str) -> torch.Tensor:
        """``(lambda_b * B[:out]) @ (lambda_d * A[:, :in])`` ``[out, in]``: PEFT's ``Linear.get_delta_weight``."""
        lambda_d, lambda_b, shared_a, shared_b = self._parts(name)
        return (lambda_b[:, None] * shared_b) @ (lambda_d[:, None] * shared_a)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``, in the order PEFT's ``Linear.forward``
        computes it (the input cast to the vectors' dtype)."""
        lambda_d, lambda_b, shared_a, shared_b = self._parts(name)
        x = self.dropouts[name](x.to(lambda_d.dtype))
        return lambda_b * F.linear(lambda_d * F.linear(x, shared_a), shared_b)
