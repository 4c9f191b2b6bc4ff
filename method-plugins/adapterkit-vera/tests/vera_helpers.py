"""Shared bits of the adapterkit-vera tests (a unique module name: other packages' tests run in the same session)."""

from __future__ import annotations

from typing import Any

#: adapterkit configs per tiny model: modules of different sizes, so the projections are sliced
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "gpt2": {"r": 6, "target_modules": ["c_attn", "c_fc"], "projection_prng_key": 3},
    "bert": {"r": 4, "target_modules": ["query", "intermediate.dense"], "init_weights": False},
}
