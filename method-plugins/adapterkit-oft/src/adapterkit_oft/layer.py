"""The torch side of OFT: a :class:`adapterkit.WeightAdapterLayer` whose adapters rotate the module's input
block by block (imported only when a model is touched).

The forward rotates the input, as PEFT's ``OFTRotationModule.forward`` does (``x`` cut into ``r``
blocks, each multiplied by its rotation: ``x_i @ R_i``), then runs the base module; merging
folds the same rotation into the weight (:meth:`OftLayer.adapted_weight`, ``W @ blockdiag(R)^T``).
"""

from __future__ import annotations

from typing import Any

import torch

from adapterkit import WeightAdapterLayer

from .method import DEFAULTS, PARAM


class OftLayer(WeightAdapterLayer):
    """A linear or Conv1D module with OFT rotations (one ``[rows, n]`` parameter ``R`` per adapter)."""

    transforms_weight = True

    # ---- the rotation -----------------------------------------------------------------
    def _vectors(self, name: str) -> torch.Tensor:
        """The stored skew parameters, COFT-projected when the config says so.

        In training (grad enabled, module in training mode) the projection is written back into
        the parameter, as PEFT does at every forward, so that optimizer steps follow PEFT's;
        otherwise it is computed without touching the parameter (same values).
        """
        param = self.params[name][PARAM]
        config = self.config[name]
        if not config.get("coft", DEFAULTS["coft"]):
            return param
        size = int(self.target[name]["block_size"])
        with torch.no_grad():
            projected = _project(param.detach(), size, float(config.get("eps", DEFAULTS["eps"])))
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                param.copy_(projected)
            return param
        return param + (projected - param).detach()

    def rotations(self, name: str) -> torch.Tensor:
        """The ``r`` rotation blocks ``[r, s, s]`` of adapter ``name`` (in the parameter's dtype).

        In training with ``module_dropout`` > 0, that fraction of the blocks (``int(p * r)``, chosen at
        random) is the identity for this step (PEFT's ``MultiplicativeDropoutLayer``; a shared block is
        never dropped).
        """
        config, target = self.config[name], self.target[name]
        size, blocks = int(target["block_size"]), int(target["r"])
        vectors = self._vectors(name)
        rotations = _cayley(vectors, size, bool(config.get("use_cayley_neumann", DEFAULTS["use_cayley_neumann"])),
                            int(config.get("num_cayley_neumann_terms", DEFAULTS["num_cayley_neumann_terms"])))
        p = float(config.get("module_dropout", 0.0))
        if self.training and p > 0 and rotations.shape[0] > 1:
            rows = rotations.shape[0]
            dropped = int(p * rows)
            mask = torch.cat([torch.ones(dropped), torch.zeros(rows - dropped)])[torch.randperm(rows)]
            mask = mask.to(device=rotations.device, dtype=rotations.dtype).view(rows, 1, 1)
            eye = torch.eye(size, device=rotations.device, dtype=rotations.dtype)
            rotations = (1 - mask) * rotations + mask * eye
        if rotations.shape[0] == 1 and blocks > 1:
            rotations = rotations.expand(blocks, size, size)
        return rotations

    def rotate_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ blockdiag(R)`` over the last axis, in the parameter's dtype, back to ``x``'s dtype."""
        rotations = self.rotations(name)
        dtype = x.dtype
        blocks, size, _ = rotations.shape
        cut = x.to(rotations.dtype).reshape(*x.shape[:-1], blocks, size)
        return torch.einsum("...rk,rkc->...rc", cut, rotations).reshape(x.shape).to(dtype)

    # ---- WeightAdapterLayer ----------------------------------------------------------------
    def adapted_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W @ blockdiag(R)^T`` for ``W [out, in]`` (PEFT's ``Linear.merge``: ``(R @ W^T)^T``)."""
        rotations = self.rotations(name)
        blocks, size, _ = rotations.shape
        cut = weight.to(rotations.dtype).reshape(weight.shape[0], blocks, size)
        return torch.einsum("orc,rkc->ork", cut, rotations).reshape(weight.shape).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module on the rotated input: the same function as ``F.linear(x, adapted(W), b)``.

        Several active adapters compose as their weights do (``adapted_2(adapted_1(W))``), so the
        input is rotated by the last one first.
        """
        active = self.active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        rotated = x
        for name in reversed(active):
            rotated = self.rotate_input(name, rotated)
        return self.base_layer(rotated, *args, **kwargs)


def _skew(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """``[b, n] -> [b, s, s]``: ``U - U^T``, ``U``'s strict upper triangle filled row-major (PEFT's
    ``_pytorch_skew_symmetric``)."""
    rows, cols = torch.triu_indices(size, size, 1, device=vectors.device)
    matrix = torch.zeros(vectors.shape[0], size, size, device=vectors.device, dtype=vectors.dtype)
    matrix[:, rows, cols] = vectors
    return matrix - matrix.transpose(-2, -1)


def _project(vectors: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT (PEFT's ``_project_batch``): a block's skew matrix with Frobenius norm over
    ``eps / sqrt(rows)`` is scaled down to it."""
    matrix = _skew(vectors, size)
    bound = eps / torch.sqrt(torch.tensor(float(vectors.shape[0])))
    norms = torch.norm(matrix, dim=(1, 2), keepdim=True)
    out = torch.where(norms <= bound, matrix, bound * (matrix / norms))
    rows, cols = torch.triu_indices(size, size, 1, device=vectors.device)
    return out[:, rows, cols]


def _cayley(vectors: torch.Tensor, size: int, neumann: bool, terms: int) -> torch.Tensor:
    """``[b, n] -> [b, s, s]`` rotations (PEFT's ``_cayley_batch``): the exact ``(I - Q)(I + Q)^-1``, or
    the Neumann truncation ``I + 2Q + 2Q^2 + ... + Q^(n-1)``."""
    q = _skew(vectors, size)
    eye = torch.eye(size, device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    out = eye.clone()
    if terms > 1:
        out = out + 2.0 * q
        if terms > 2:
            power = torch.bmm(q, q)
            out = out + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                out = out + 2.0 * power
            out = out + torch.bmm(power, q)
    return out
