"""DoRA's math in torch, written to match PEFT's ``DoraLinearLayer`` (peft/tuners/lora/dora.py).

Weight-decomposed low-rank adaptation (Liu et al., 2024): the adapted weight is
``W' = m * (W + s B A) / ||W + s B A||_row``, one magnitude ``m[o]`` per output
row (``[out]``). In the forward pass the row norm is detached from the graph
(section 4.3 of the paper, as PEFT does), and the layer adds to the base output

    (m / ||W + s B A|| - 1) * (W x) + (m / ||W + s B A||) * s * B A x

which equals ``W' x`` (bias unchanged). Weights here are ``[out, in]``; a
Conv1D (``[in, out]``) is transposed by the caller.
"""

from __future__ import annotations

import torch
from torch import nn


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-wise L2 norm of ``weight + scale * lora_weight`` (``[out]``), both ``[out, in]``."""
    total = weight + scale * lora_weight
    return torch.linalg.norm(total, dim=1).to(total.dtype)


def forward_extra(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_out: torch.Tensor,
    dropout: nn.Module,
) -> torch.Tensor:
    """What a DoRA adapter adds to the base layer's output ``base_out`` (PEFT's ``DoraLinearLayer.forward``).

    :param weight: the base weight ``[out, in]`` (dequantised for a 4-bit base).
    """
    weight = weight.to(x.dtype)
    lora_weight = (b @ a).detach()
    norm = weight_norm(weight, lora_weight, scale).detach()
    mag_norm_scale = (magnitude.to(x.dtype) / norm).view(1, -1)
    if isinstance(dropout, nn.Identity) or not dropout.training:
        base_result = base_out - bias.to(base_out.dtype) if bias is not None else base_out
    else:  # the base term must see the same dropped-out input as the LoRA term
        x = dropout(x)
        base_result = nn.functional.linear(x, weight)
    lora_result = nn.functional.linear(nn.functional.linear(x, a), b)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scale


def merge_factor(original: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """``m / ||W0 + dW||_row``, shaped to multiply a weight in its stored orientation.

    ``original`` (``W0``, the unmerged base) and ``delta`` (``scale * B @ A``) are in the
    stored orientation (``[in, out]`` for Conv1D); the norm is over each output row.
    """
    w0 = original.T if conv1d else original
    dw = delta.T if conv1d else delta
    norm = weight_norm(w0, dw, 1.0).detach()
    factor = magnitude.detach().to(norm.dtype) / norm
    return factor.view(1, -1) if conv1d else factor.view(-1, 1)
