"""The torch side of BOFT: a :class:`adapterkit.WeightAdapterLayer` that rotates the weight's inputs
(imported only when a model is touched).

The forward computes ``F.linear(x, diag(s) W M^T, b)``, the function of PEFT's ``boft.Linear.forward``
(``s * (base(x M) - b) + b``); the rotation is applied block by block, never as a dense ``[in, in]``
matrix, so it is the same on CPU and GPU (PEFT's CUDA ``fbd`` extension only builds the block-diagonal
matrix faster; without it PEFT 0.21 silently uses one butterfly factor, see the package README).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adapterkit import WeightAdapterLayer

from .method import butterfly_perms


def cayley(r: torch.Tensor) -> torch.Tensor:
    """Orthogonal blocks ``Q = (I - S)(I + S)^-1``, ``S = (R - R^T) / 2``, of ``R [..., H, H]`` in float32
    (PEFT's ``BOFTLayer.cayley_batch``: ``solve(I + S, I - S, left=False)``)."""
    r = r.float()
    skew = 0.5 * (r - r.transpose(-1, -2))
    eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype).expand_as(r)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class MultiplicativeDropout(nn.Module):
    """BOFT's dropout (PEFT's ``MultiplicativeDropoutLayer``): in training, in one randomly chosen factor,
    ``int(p * block_num)`` randomly chosen blocks are replaced by the identity."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return q
        n_factors, block_num, size, _ = q.shape
        count = int(self.p * block_num)
        if count == 0:
            return q
        factor = int(torch.randint(0, n_factors, (1,)).item())
        chosen = torch.randperm(block_num, device=q.device)[:count]
        mask = torch.zeros(n_factors, block_num, 1, 1, device=q.device, dtype=q.dtype)
        mask[factor, chosen] = 1
        eye = torch.eye(size, device=q.device, dtype=q.dtype)
        return (1 - mask) * q + mask * eye


class BoftLayer(WeightAdapterLayer):
    """A linear / Conv1D module whose weight BOFT rotates: ``adapted(W) = diag(s) W M^T``."""

    transforms_weight = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._merging = False
        self._perms: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _permutations(self, target: Mapping[str, Any], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (target["block_size"], target["block_num"], target["n_butterfly_factor"], str(device))
        if key not in self._perms:
            perms = butterfly_perms(self.in_features, int(target["block_size"]), int(target["block_num"]),
                                    int(target["n_butterfly_factor"]))
            pairs = []
            for perm in perms:
                forward = torch.tensor(perm, dtype=torch.long, device=device)
                pairs.append((forward, torch.argsort(forward)))
            self._perms[key] = pairs
        return self._perms[key]

    def rotation_blocks(self, name: str) -> torch.Tensor:
        """The orthogonal blocks ``[N, block_num, block_size, block_size]`` of adapter ``name`` (float32)."""
        return cayley(self.params[name]["R"])

    def adapted_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``diag(s) W M^T`` for ``W [out, in]`` (float32), ``M = M_{N-1} ... M_0``, ``M_i = P_i B_i P_i^T``:
        ``W P_i B_i^T P_i^T`` applied for ``i = 0 .. N-1`` (PEFT's ``Linear.get_delta_weight`` and ``merge``)."""
        params, target = self.params[name], self.target[name]
        q = self.rotation_blocks(name)
        if not self._merging:
            q = self.dropouts[name](q)
        out, fan_in = weight.shape
        n_factors, block_num, size, _ = q.shape
        rotated = weight.float()
        for i, (perm, inverse) in enumerate(self._permutations(target, weight.device)):
            blocks = rotated[:, inverse].reshape(out, block_num, size)
            rotated = torch.einsum("odb,dab->oda", blocks, q[i]).reshape(out, fan_in)[:, perm]
        return rotated * params["s"].float()

    def merge(self, name: str) -> None:
        self._merging = True  # merging folds the rotation without dropout, as PEFT's merge does
        try:
            super().merge(name)
        finally:
            self._merging = False


def new_parameters(layer: BoftLayer, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """``R`` and ``s`` of a new adapter: the identity (``R = 0``, ``s = 1``), or PEFT's ``init_weights=False``
    noise (``R ~ N(0, 0.1)``, ``s ~ N(1, 0.1)``) (``BOFTLayer.reset_boft_parameters``)."""
    device = layer.base_layer.weight.device
    n, num, size = (int(target[k]) for k in ("n_butterfly_factor", "block_num", "block_size"))
    r = torch.zeros(n, num, size, size, device=device)
    s = torch.ones(layer.out_features, 1, device=device)
    if not config.get("init_weights", True):
        nn.init.normal_(r, mean=0.0, std=0.1)
        nn.init.normal_(s, mean=1.0, std=0.1)
    return {"R": nn.Parameter(r), "s": nn.Parameter(s)}
