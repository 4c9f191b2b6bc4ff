"""The numpy math of ``compose``: combining task tensors, and the low-rank SVD.

The combination rules follow the definitions PEFT uses for
``add_weighted_adapter`` (task arithmetic, TIES, DARE, magnitude pruning),
so that the same inputs give the same result; docs/compose.md writes them out.
Every function takes a list of same-shape float32 arrays (one per adapter)
and a float32 weight per array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIGN_METHODS = ("total", "frequency")


def weighted_sum(tensors: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Task arithmetic: ``sum_i w_i * T_i``."""
    stacked = np.stack(tensors)
    return (stacked * _expand(weights, stacked)).sum(axis=0)


def _expand(weights: np.ndarray, stacked: np.ndarray) -> np.ndarray:
    return np.asarray(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))


def magnitude_prune_one(tensor: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``int(density * size)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    out = np.zeros_like(flat)
    if k > 0:
        keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        out[keep] = flat[keep]
    return out.reshape(tensor.shape)


def random_prune_one(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1 / density``."""
    if density >= 1:
        return tensor
    keep = rng.random(tensor.shape, dtype=np.float32) < np.float32(density)
    return np.where(keep, tensor, np.zeros((), dtype=tensor.dtype)) / np.asarray(density, dtype=tensor.dtype)


def majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    """Per entry, which tensors agree with the elected sign.

    ``total``: the sign of the sum; ``frequency``: the sign of the sum of signs (ties go to +).
    """
    sign = np.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    elected = np.where(magnitude >= 0, 1, -1).astype(stacked.dtype)
    return sign == elected


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the tensors that agree with the elected sign (0 where none does)."""
    total = np.where(mask, weighted, np.zeros((), dtype=weighted.dtype)).sum(axis=0)
    count = mask.sum(axis=0).astype(weighted.dtype)
    return total / np.maximum(count, np.ones((), dtype=weighted.dtype))


def ties(tensors: Sequence[np.ndarray], weights: np.ndarray, density: float, sign_method: str = "total") -> np.ndarray:
    """TIES: magnitude-prune each tensor, elect a sign per entry (unweighted), mean of the agreeing weighted entries."""
    stacked = np.stack([magnitude_prune_one(t, density) for t in tensors])
    mask = majority_sign_mask(stacked, sign_method)
    return disjoint_merge(stacked * _expand(weights, stacked), mask)


def magnitude_prune(tensors: Sequence[np.ndarray], weights: np.ndarray, density: float) -> np.ndarray:
    """Magnitude-prune each tensor, then task arithmetic."""
    return weighted_sum([magnitude_prune_one(t, density) for t in tensors], weights)


def dare_linear(tensors: Sequence[np.ndarray], weights: np.ndarray, density: float,
                rng: np.random.Generator) -> np.ndarray:
    """DARE: random-prune and rescale each tensor, then task arithmetic."""
    return weighted_sum([random_prune_one(t, density, rng) for t in tensors], weights)


def dare_ties(tensors: Sequence[np.ndarray], weights: np.ndarray, density: float, rng: np.random.Generator,
              sign_method: str = "total") -> np.ndarray:
    """DARE pruning, then TIES sign election and disjoint mean."""
    stacked = np.stack([random_prune_one(t, density, rng) for t in tensors])
    mask = majority_sign_mask(stacked, sign_method)
    return disjoint_merge(stacked * _expand(weights, stacked), mask)


def low_rank_svd(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], coefficients: Sequence[float],
                 rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-``rank`` factors of ``sum_i c_i B_i A_i`` without forming the [out, in] matrix.

    ``sum_i c_i B_i A_i = B_all A_all`` with ``B_all = [B_1 .. B_n]`` ([out, R]) and
    ``A_all = [c_1 A_1; ..; c_n A_n]`` ([R, in]). An orthonormal basis of each side comes
    from the small Gram matrix: ``B_all = Qb Sb Vbᵀ`` and ``A_allᵀ = Qa Sa Vaᵀ`` (the thin
    SVDs, from ``eigh`` of ``B_allᵀ B_all`` and ``A_all A_allᵀ``, both R x R); then the SVD of
    the core ``Sb Vbᵀ Va Sa = U S Wᵀ`` gives ``B = Qb U S`` and ``A = Wᵀ Qaᵀ``, truncated to
    ``rank`` (zero-padded when the sum has a lower rank). This is the QR route with the
    factorisations of the tall matrices replaced by R x R ones: a few matrix products
    and tiny decompositions per module. Math in float64; directions whose singular value
    is below 1e-6 of the largest (beyond float32 inputs' precision) are dropped.
    Returns ``(A [rank, in], B [out, rank])`` in float32.
    """
    b_all = np.concatenate([np.asarray(b, dtype=np.float64) for b in bs], axis=1)
    scaled = [np.asarray(a, dtype=np.float64) * c for a, c in zip(as_, coefficients, strict=True)]
    a_all = np.concatenate(scaled, axis=0)
    vb, sb = _thin_svd_right(b_all)
    va, sa = _thin_svd_right(a_all.T)
    b_new = np.zeros((b_all.shape[0], rank))
    a_new = np.zeros((rank, a_all.shape[1]))
    if sb.size and sa.size:
        u, s, wt = np.linalg.svd((sb[:, None] * (vb.T @ va)) * sa[None, :])
        k = min(rank, s.size)
        b_new[:, :k] = b_all @ ((vb / sb) @ (u[:, :k] * s[:k]))  # Qb U S, Qb = B_all Vb / Sb
        a_new[:k] = (wt[:k] @ (va / sa).T) @ a_all  # Wᵀ Qaᵀ, Qaᵀ = (Va / Sa)ᵀ A_all
    return a_new.astype(np.float32), b_new.astype(np.float32)


def _thin_svd_right(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V, S)`` of ``x = Q S Vᵀ`` ([n, R], n >= R or not), from ``eigh(xᵀ x)``; null directions dropped."""
    eigenvalues, vectors = np.linalg.eigh(x.T @ x)
    if eigenvalues.size == 0 or eigenvalues[-1] <= 0:
        return vectors[:, :0], eigenvalues[:0]
    keep = eigenvalues > eigenvalues[-1] * 1e-12
    return vectors[:, keep], np.sqrt(eigenvalues[keep])
