"""Shared bits of the adapterkit-oft tests (a unique module name: adapterkit's own tests/ has helpers.py)."""

from __future__ import annotations

from typing import Any

#: adapterkit OFT configs for the tiny models (hidden 32, intermediate 64)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "oft_block_size": 8},
    "gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "oft_block_size": 8},  # Conv1D
    "bert": {"target_modules": ["query", "value"], "r": 4, "use_cayley_neumann": False},
}
#: the scale of the noise that gives OFT parameters non-trivial but well-conditioned rotations
NOISE = 0.1
