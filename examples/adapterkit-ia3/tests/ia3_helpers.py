"""Shared bits of the adapterkit-ia3 tests (a unique module name: adapterkit's own tests/ has helpers.py)."""

from __future__ import annotations

from typing import Any

#: PEFT's default (IA)^3 targets for each architecture (peft.utils.constants, PEFT 0.21)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "bert": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
}
