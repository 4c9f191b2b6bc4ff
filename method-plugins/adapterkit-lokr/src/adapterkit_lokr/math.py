"""LoKr's numbers, numpy only (no torch, no adapterkit): the factorisation, the layout rule and the delta.

Shared by the method (``delta_weight``), the PEFT codec and any other codec of LoKr files
(kohya / LyCORIS). Restated from PEFT 0.21.2 (``peft/tuners/lokr/layer.py``), never copied:

- :func:`factorization` is PEFT's ``factorization(dimension, factor)`` (itself LyCORIS's);
- :func:`peft_layout` is the shape rule of ``LoKrLayer.update_layer`` for ``nn.Linear``:
  ``out = a * b`` and ``in = c * d`` with ``(a, b) = factorization(out, f)`` and
  ``(c, d) = factorization(in, f)``; ``w1`` is ``[a, c]`` unless ``decompose_both and
  r < max(a, c) / 2`` (then ``w1_a [a, r] @ w1_b [r, c]``); ``w2`` is ``[b, d]`` unless
  ``r < max(b, d) / 2`` (then ``w2_a [b, r] @ w2_b [r, d]``);
- :func:`lokr_delta` is ``get_delta_weight`` / ``make_kron``: ``kron(W1, W2) * scale``
  (``[a * b, c * d] = [out, in]``), with PEFT's ``scale = alpha / r`` for every layout
  (PEFT 0.21.2 has no "scale 1 for full matrices" rule; LyCORIS's own files do, see
  :func:`lycoris_full_scale`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: the canonical parameter names (PEFT's ``lokr_`` prefix dropped)
PARAMS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``, PEFT's / LyCORIS's ``factorization``.

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)`` (``m`` may exceed ``n``).
    Otherwise the divisor pair closest to the square root with ``m <= factor`` (``-1``: no bound),
    found by walking ``m`` up from 1 while ``m + n`` does not grow; ``m <= n``.
    """
    dimension, factor = int(dimension), int(factor)
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > factor:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


def peft_layout(out_features: int, in_features: int, r: int, decompose_both: bool = False,
                decompose_factor: int = -1) -> dict[str, Any]:
    """The target fields PEFT's ``LoKrLayer.update_layer`` gives an ``nn.Linear`` ``[out, in]`` at rank ``r``:
    ``out_factors [a, b]``, ``in_factors [c, d]``, ``w1_full``, ``w2_full``."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    return {"out_factors": [a, b], "in_factors": [c, d],
            "w1_full": not (decompose_both and r < max(a, c) / 2),
            "w2_full": not (r < max(b, d) / 2)}


def tensor_shapes(target: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Parameter name -> shape of the tensors a target holds (from its factors, flags and ``r``)."""
    (a, b), (c, d), r = target["out_factors"], target["in_factors"], int(target["r"])
    shapes: dict[str, tuple[int, int]] = {}
    if target["w1_full"]:
        shapes["w1"] = (int(a), int(c))
    else:
        shapes["w1_a"], shapes["w1_b"] = (int(a), r), (r, int(c))
    if target["w2_full"]:
        shapes["w2"] = (int(b), int(d))
    else:
        shapes["w2_a"], shapes["w2_b"] = (int(b), r), (r, int(d))
    return shapes


def layout_of(tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """``out_factors``, ``in_factors``, ``w1_full``, ``w2_full`` and the ranks the tensors show
    (``ranks``: the inner dimensions of the low-rank pairs), or None when a factor is missing."""
    shape = {k: tuple(int(s) for s in np.shape(v)) for k, v in tensors.items() if k in PARAMS}
    ranks: list[int] = []
    halves = []
    for side in ("w1", "w2"):
        if side in shape:
            halves.append((True, shape[side][0], shape[side][1]))
        elif f"{side}_a" in shape and f"{side}_b" in shape:
            left, right = shape[f"{side}_a"], shape[f"{side}_b"]
            ranks += [left[1], right[0]]
            halves.append((False, left[0], right[1]))
        else:
            return None
    (w1_full, a, c), (w2_full, b, d) = halves
    return {"out_factors": [a, b], "in_factors": [c, d], "w1_full": w1_full, "w2_full": w2_full, "ranks": ranks}


def scale_of(target: Mapping[str, Any]) -> float:
    """``alpha / r`` (PEFT's ``LycorisLayer.scaling``), a Python float."""
    return float(target["alpha"]) / int(target["r"])


def lycoris_full_scale(w1_full: bool, w2_full: bool) -> bool:
    """Whether LyCORIS's own LoKr module uses scale 1 (both halves full matrices) where PEFT uses
    ``alpha / r``: a codec for LyCORIS files records ``alpha = r`` for such a module."""
    return bool(w1_full and w2_full)


def lokr_delta(tensors: Mapping[str, Any], scale: float, dtype: Any = np.float32) -> np.ndarray:
    """``kron(W1, W2) * scale`` ``[out, in]`` from a module's tensors keyed by canonical name
    (``w1`` or ``w1_a``/``w1_b``; ``w2`` or ``w2_a``/``w2_b``), computed in ``dtype`` (float32: PEFT's
    float32 arithmetic, ``make_kron``)."""
    def half(side: str) -> np.ndarray:
        if side in tensors:
            return np.asarray(tensors[side], dtype=dtype)
        return np.asarray(tensors[f"{side}_a"], dtype=dtype) @ np.asarray(tensors[f"{side}_b"], dtype=dtype)

    return np.kron(half("w1"), half("w2")) * np.asarray(scale, dtype=dtype)


__all__ = ["PARAMS", "factorization", "layout_of", "lokr_delta", "lycoris_full_scale", "peft_layout", "scale_of",
           "tensor_shapes"]
