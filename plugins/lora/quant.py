"""4-bit base layers for QLoRA, through bitsandbytes (``Linear4bit``, NF4 / FP4), on CPU or GPU.

:func:`quantize_module` turns an ``nn.Linear`` or a transformers ``Conv1D`` into
a ``bnb.nn.Linear4bit`` whose weight is the ``[out, in]`` float weight quantised
blockwise (``quantize_4bit``: ``quant_type``, ``blocksize``, double quantisation
of the absmax statistics = ``compress_statistics``). The new module records what
it replaced (kind and stored shape) so an adapter's targets keep describing the
full-precision base. Quantisation is deterministic: the same float weights and
settings give the same bits, so ``apply`` reproduces a trained model exactly.

bitsandbytes is imported only when something is quantised; :func:`is_quantized`
never imports it. On a CPU with AVX512-BF16, ``Linear4bit`` would repack its
weight in place on the first eval-mode call (and compute in bfloat16); the
modules made here switch that off, so the weight keeps its layout and the
float32 compute dtype really computes in float32.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SOURCE = "adapterkit_source"  # (kind, shape) of the module a Linear4bit replaced


@dataclass(frozen=True)
class QuantSpec:
    """How base weights are quantised (the ``qlora`` method config fields of the same names)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantSpec:
        return cls(**{k: config[k] for k in ("quant_type", "double_quant", "blocksize", "compute_dtype") if k in config})

    def describe(self) -> str:
        dq = "double-quantised" if self.double_quant else "single"
        return f"{self.quant_type}, blocksize {self.blocksize}, {dq} absmax, compute {self.compute_dtype}"


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is installed with the qlora extra
        from adapterkit.core.errors import UsageError

        raise UsageError("QLoRA needs bitsandbytes, which is not installed", found=str(exc),
                         hint="pip install bitsandbytes", code="missing_dependency") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear (never imports bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def spec_of(module: nn.Module) -> QuantSpec:
    """The settings a 4-bit module was quantised with."""
    weight = module.weight
    compute = next((k for k, v in COMPUTE_DTYPES.items() if v == module.compute_dtype), str(module.compute_dtype))
    return QuantSpec(weight.quant_type, bool(weight.compress_statistics), int(weight.blocksize), compute)


def source_of(module: nn.Module) -> tuple[str, list[int]]:
    """(kind, stored shape) of the module a 4-bit linear replaced (``linear [out, in]`` if unknown)."""
    recorded = getattr(module, _SOURCE, None)
    if recorded is not None:
        return recorded[0], list(recorded[1])
    return "linear", [int(module.out_features), int(module.in_features)]


def quantize_module(module: nn.Module, kind: str, spec: QuantSpec) -> nn.Module:
    """A ``Linear4bit`` holding ``module``'s weight quantised as ``spec`` says, sharing its bias."""
    bnb = _bnb()
    weight = module.weight.detach()
    stored_shape = list(weight.shape)
    dense = weight.T if kind == "conv1d" else weight  # [out, in]
    out_features, in_features = dense.shape
    bias = getattr(module, "bias", None)
    q = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=COMPUTE_DTYPES[spec.compute_dtype],
        compress_statistics=spec.double_quant, quant_type=spec.quant_type, quant_storage=torch.uint8, device="meta",
    )
    q.support_avx512bf16_for_cpu = False  # keep the standard layout and the chosen compute dtype
    data = dense.contiguous().clone()
    q.weight = bnb.nn.Params4bit(
        data, requires_grad=False, compress_statistics=spec.double_quant, quant_type=spec.quant_type,
        blocksize=spec.blocksize, quant_storage=torch.uint8, module=q,
    ).to(data.device)
    if bias is not None:
        q.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        q.bias.requires_grad_(False)
    setattr(q, _SOURCE, (kind, stored_shape))
    return q.train(module.training)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a 4-bit linear, dequantised (in the dtype it was quantised from)."""
    bnb = _bnb()
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``weight`` (``[out, in]``) and ``module``'s bias, in ``module``'s mode."""
    dtype = module.weight.quant_state.dtype
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device="meta", dtype=dtype)
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        dense.bias = module.bias
    return dense.train(module.training)


def roundtrip(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` (``[out, in]``) quantised as ``spec`` says and dequantised again."""
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant,
        quant_type=spec.quant_type, quant_storage=torch.uint8,
    )
    return bnb.functional.dequantize_4bit(packed, state)


def roundtrip_array(weight: np.ndarray, kind: str, spec: QuantSpec) -> np.ndarray:
    """Numpy twin of :func:`roundtrip` for a weight in its stored orientation (Conv1D ``[in, out]``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    dense = tensor.T if kind == "conv1d" else tensor
    out = roundtrip(dense, spec).float()
    out = out.T if kind == "conv1d" else out
    return np.ascontiguousarray(out.numpy())


def quantization_error(weight: np.ndarray | torch.Tensor, spec: QuantSpec, kind: str = "linear") -> dict[str, float]:
    """What 4-bit quantisation does to one weight: max / mean absolute change, relative to the weight.

    ``relative_max`` = max |Q(W) - W| / max |W|; ``relative_fro`` = ||Q(W) - W||_F / ||W||_F.
    """
    array = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, np.float32)
    diff = roundtrip_array(array, kind, spec).astype(np.float64) - array.astype(np.float64)
    peak = float(np.abs(array).max()) or 1.0
    norm = float(np.linalg.norm(array.astype(np.float64))) or 1.0
    return {
        "max_abs": float(np.abs(diff).max()),
        "mean_abs": float(np.abs(diff).mean()),
        "relative_max": float(np.abs(diff).max()) / peak,
        "relative_fro": float(np.linalg.norm(diff)) / norm,
    }


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a 4-bit linear's weight takes: the packed data plus every tensor of its quant state."""
    weight = module.weight
    total = weight.data.numel() * weight.data.element_size()
    for value in weight.quant_state.as_dict(packed=True).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total
