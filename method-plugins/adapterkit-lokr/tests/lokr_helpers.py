"""Shared bits of the adapterkit-lokr tests (a unique module name: pytest runs every package's tests together)."""

from __future__ import annotations

from typing import Any

#: adapterkit configs per tiny model: every layout (full w1/w2, low-rank w2, decompose_both, a factor, patterns)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2, "alpha": 3, "decompose_both": True,
              "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 5}},
    "gpt2": {"target_modules": ["c_attn", "c_fc"], "r": 2, "alpha": 4},
    "bert": {"target_modules": ["query", "value", "output.dense"], "r": 8, "decompose_factor": 4},
}
