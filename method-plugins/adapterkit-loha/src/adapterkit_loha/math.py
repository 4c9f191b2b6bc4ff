"""LoHa's update in numpy, torch-free: one function every reader, writer and merge of this package shares.

LoHa (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS) updates a weight ``W [out, in]`` by the
Hadamard (element-wise) product of two low-rank products::

    delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * scale,   scale = alpha / r

with ``w1_a, w2_a [out, r]`` and ``w1_b, w2_b [r, in]``. The product of two rank-``r``
matrices has rank up to ``r**2``, so LoHa is not a LoRA of rank ``r``. This is PEFT's
``peft.tuners.loha.layer.make_weight`` (``HadaWeight.forward``), evaluated in float32 in the
same order (both products, their element-wise product, then the scale).
"""

from __future__ import annotations

import numpy as np

#: the canonical parameter names of one module (PEFT's ``hada_<name>`` without the prefix)
PARAMS = ("w1_a", "w1_b", "w2_a", "w2_b")


def loha_scale(alpha: float, r: int) -> float:
    """``alpha / r``: PEFT's ``LoHaLayer.update_layer`` (``self.scaling[adapter] = alpha / r``)."""
    return float(alpha) / int(r)


def loha_delta(w1_a: np.ndarray, w1_b: np.ndarray, w2_a: np.ndarray, w2_b: np.ndarray, scale: float) -> np.ndarray:
    """``(w1_a @ w1_b) * (w2_a @ w2_b) * scale`` as float32 ``[out, in]`` (nn.Linear's orientation).

    ``w1_a``, ``w2_a``: ``[out, r]``; ``w1_b``, ``w2_b``: ``[r, in]``; any float dtype (cast to float32).
    A GPT-2 ``Conv1D`` stores its weight ``[in, out]``: transpose the result for it.
    """
    f = [np.asarray(t, dtype=np.float32) for t in (w1_a, w1_b, w2_a, w2_b)]
    if any(t.ndim != 2 for t in f):
        raise ValueError(f"LoHa factors must be 2-d, got shapes {[list(t.shape) for t in f]}")
    (a1, b1, a2, b2) = f
    out, r = a1.shape
    if a2.shape != (out, r) or b1.shape[0] != r or b2.shape != b1.shape:
        raise ValueError("LoHa factors disagree: expected w1_a, w2_a [out, r] and w1_b, w2_b [r, in], got "
                         f"{[list(t.shape) for t in f]}")
    delta = (a1 @ b1) * (a2 @ b2)
    return np.ascontiguousarray(delta * np.float32(scale), dtype=np.float32)


__all__ = ["PARAMS", "loha_delta", "loha_scale"]
