"""LoRA on a model parameter itself (a ``parameter`` target): torch-free shapes and math.

A ``parameter`` target names a tensor of the base (``model.layers.0.mlp.experts.gate_up_proj``),
not a module. Two shapes:

- 2-D ``[out, in]`` (a router's ``gate.weight``): like a linear module, ``A [r, in]``,
  ``B [out, r]``, ``delta = scale * B @ A``.
- 3-D ``[n, d1, d2]``, a stacked parameter whose first axis is the expert axis (transformers 5 fuses
  a mixture of experts' matrices this way: Qwen3-MoE ``gate_up_proj`` ``[E, 2I, H]``): one rank-r
  pair per expert, ``A [n, r, in]`` and ``B [n, out, r]``, ``delta[e] = scale * B[e] @ A[e]``.
  ``layout`` says how an expert's matrix acts: ``"out_in"`` (``F.linear(x, W[e])``, ``[out, in] =
  [d1, d2]``) or ``"in_out"`` (``x @ W[e]``, GPT-OSS; ``[in, out] = [d1, d2]``, the delta is transposed).

PEFT (``target_parameters``) stores one pair per parameter, ``lora_A [n*r, in]`` expert-major and
``lora_B [out, r*n]`` expert-minor (expert ``e`` has columns ``e, e+n, ...``): :func:`from_peft`
and :func:`to_peft` convert exactly (a permutation of the values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapterkit.core.format.targeting import PARAMETER

OUT_IN, IN_OUT = "out_in", "in_out"
LAYOUTS = (OUT_IN, IN_OUT)


def is_stacked(target: Mapping[str, Any]) -> bool:
    """Whether ``target`` is a 3-D ``parameter`` target (one low-rank pair per index of its first axis)."""
    return target.get("kind") == PARAMETER and len(target.get("shape") or ()) == 3


def in_out(target: Mapping[str, Any]) -> tuple[int, int]:
    """``(in, out)`` of one expert's matrix (of the whole matrix for a 2-D parameter)."""
    shape = [int(d) for d in target["shape"]]
    if len(shape) == 2:
        return shape[1], shape[0]
    return (shape[2], shape[1]) if target.get("layout", OUT_IN) == OUT_IN else (shape[1], shape[2])


def factor_shapes(target: Mapping[str, Any], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``A`` and ``B`` for a ``parameter`` target of rank ``r`` (per expert)."""
    fan_in, fan_out = in_out(target)
    if not is_stacked(target):
        return (r, fan_in), (fan_out, r)
    n = int(target["shape"][0])
    return (n, r, fan_in), (n, fan_out, r)


def stacked_delta(a: np.ndarray, b: np.ndarray, scale: float, layout: str) -> np.ndarray:
    """float32 ``scale * B[e] @ A[e]`` for every expert, ``[n, d1, d2]`` (transposed per expert for ``in_out``)."""
    work = np.float64 if np.asarray(a).dtype == np.float64 else np.float32
    delta = np.matmul(np.asarray(b, dtype=work), np.asarray(a, dtype=work)) * work(scale)
    if layout == IN_OUT:
        delta = delta.transpose(0, 2, 1)
    return np.ascontiguousarray(delta, dtype=np.float32)


def check_target(target: Mapping[str, Any]) -> list[str]:
    """Problems of a ``parameter`` target's own fields."""
    shape = target.get("shape")
    if not (isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(d, int) and d > 0 for d in shape)):
        return [f"shape {shape!r} is not a 2-d or 3-d parameter shape"]
    problems = []
    layout = target.get("layout", OUT_IN)
    if layout not in LAYOUTS:
        problems.append(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    elif len(shape) == 2 and layout != OUT_IN:
        problems.append("a 2-d parameter target is [out, in]: layout must be out_in (or left out)")
    index = target.get("param_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        problems.append(f"param_index is {index!r}; expected the parameter's position in its module, an integer >= 0")
    return problems


def from_peft(a: np.ndarray, b: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``lora_A [n*r, in]``, ``lora_B [out, r*n]`` as ``A [n, r, in]``, ``B [n, out, r]`` (exact)."""
    r = a.shape[0] // experts
    a3 = np.ascontiguousarray(a.reshape(experts, r, a.shape[1]))
    b3 = np.ascontiguousarray(b.reshape(b.shape[0], r, experts).transpose(2, 0, 1))
    return a3, b3


def to_peft(a3: np.ndarray, b3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`from_peft`."""
    n, r, fan_in = a3.shape
    a = np.ascontiguousarray(a3.reshape(n * r, fan_in))
    b = np.ascontiguousarray(b3.transpose(1, 2, 0).reshape(b3.shape[1], r * n))
    return a, b


def detect_layout(a_shape: Sequence[int], b_shape: Sequence[int], shape: Sequence[int],
                  transposed: bool) -> str | None:
    """How PEFT's factors act on a 3-D parameter, from the shapes (``in_out`` when ``A`` is ``[n*r, d1]``);
    ``transposed`` (the module's ``is_transposed``) decides when ``d1 == d2``; None when they do not fit."""
    _, d1, d2 = (int(d) for d in shape)
    fan_in, fan_out = int(a_shape[1]), int(b_shape[0])
    if d1 == d2 and (fan_in, fan_out) == (d1, d2):
        return IN_OUT if transposed else OUT_IN
    if (fan_in, fan_out) == (d2, d1):
        return OUT_IN
    if (fan_in, fan_out) == (d1, d2):
        return IN_OUT
    return None


def not_low_rank(module: str, target: Mapping[str, Any]) -> str:
    """Why a stacked target has no single ``A`` / ``B`` pair (for the commands that need one)."""
    return (f"{module} is a stacked parameter {list(target['shape'])} (an expert axis first): its LoRA is one "
            "rank-r pair per expert, not one A/B pair of a module")
