"""Shared bits of the adapterkit-boft tests (a unique module name: other packages' tests have helpers too)."""

from __future__ import annotations

import types
from typing import Any

#: adapterkit configs of the conformance kit: every tiny model, both block modes, 1 and 2 butterfly factors
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2},
    "gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "boft_block_size": 8, "boft_n_butterfly_factor": 2,
             "boft_dropout": 0.25},
    "bert": {"target_modules": ["query", "value", "output.dense"], "boft_block_num": 8},
}


def fake_fbd() -> Any:
    """A torch stand-in for PEFT's CUDA ``fbd`` extension (``FastBlockDiag``: ``[N, D, H, H]`` blocks ->
    ``[N, D*H, D*H]`` block-diagonal matrices), so that PEFT builds and runs several butterfly factors on a CPU."""
    import torch

    def forward(blocks: Any) -> list[Any]:
        return [torch.stack([torch.block_diag(*torch.unbind(blocks[i])) for i in range(blocks.shape[0])])]

    def backward(grad: Any, blocks: Any) -> list[Any]:
        n, d, h, _ = blocks.shape
        return [torch.stack([torch.stack([grad[i, j * h:(j + 1) * h, j * h:(j + 1) * h] for j in range(d)])
                             for i in range(n)])]

    return types.SimpleNamespace(forward=forward, backward=backward)


def set_fbd(value: Any) -> Any:
    """Set what PEFT's ``get_fbd_cuda`` returns (``False``: no extension, without PEFT trying to compile it on a
    machine with no CUDA; ``fake_fbd()``: the torch stand-in); returns the previous value."""
    import peft.tuners.boft.layer as boft_layer

    previous = boft_layer._FBD_CUDA
    boft_layer._FBD_CUDA = value
    return previous
