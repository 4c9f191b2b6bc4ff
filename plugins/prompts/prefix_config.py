"""Prefix-tuning config: JSON Schema, defaults, validation. Torch-free.

``prefix_projection`` and ``encoder_hidden_size`` describe how a prefix is
trained (the reparameterisation MLP of Li & Liang); the saved tensors are
always the final, folded per-layer keys and values, so applying an adapter
never needs the MLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterkit import config_error, is_int

from .prompt_config import check_unknown, check_virtual_tokens

DEFAULTS: dict[str, Any] = {
    "num_virtual_tokens": 20,
    "prefix_projection": False,
    "encoder_hidden_size": None,
    "init": "random",
}
INITS = ("random", "zero")
ALIASES = {"init_weights": "init", "n_virtual_tokens": "num_virtual_tokens", "projection": "prefix_projection"}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Prefix-tuning config (method.config of a prefix adapter)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "num_virtual_tokens": {
            "type": "integer", "minimum": 1, "default": 20,
            "description": "Number of virtual tokens: key/value pairs put in front of every layer's attention.",
        },
        "prefix_projection": {
            "type": "boolean", "default": False,
            "description": "Train through the reparameterisation MLP: an embedding [n, kv_dim] -> Linear(kv_dim, "
                           "encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size, layers * 2 * kv_dim). "
                           "Training only: the saved tensors are the MLP's output.",
        },
        "encoder_hidden_size": {
            "oneOf": [{"type": "integer", "minimum": 1}, {"type": "null"}], "default": None,
            "description": "Hidden width of the reparameterisation MLP; null = kv_dim (PEFT's default).",
        },
        "init": {
            "enum": list(INITS), "default": "random",
            "description": 'Initialisation of a new adapter: "random" = normal(0, 1) prefixes (PEFT\'s default); '
                           '"zero" = zero prefixes (zero output layer of the MLP with prefix_projection).',
        },
    },
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape", "layer", "heads", "head_dim"],
    "properties": {
        "kind": {"enum": ["key_proj", "value_proj", "qkv_proj"],
                 "description": "The attention projection the module is: key (its prefix is <module>.prefix.key), "
                                "value (<module>.prefix.value), or a fused q/k/v projection (both)."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                  "description": "The projection weight's shape as stored in the base checkpoint."},
        "layer": {"type": "integer", "minimum": 0, "description": "Index of the layer in the KV cache."},
        "heads": {"type": "integer", "minimum": 1, "description": "Key/value heads of the layer (n_kv_heads)."},
        "head_dim": {"type": "integer", "minimum": 1, "description": "Size of one key/value head."},
    },
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full prefix-tuning config (defaults filled); UsageError says how to fix bad input."""
    check_unknown(config, DEFAULTS, ALIASES, "prefix-tuning")
    out = {**DEFAULTS, **config}
    out["num_virtual_tokens"] = check_virtual_tokens(out["num_virtual_tokens"])
    if not isinstance(out["prefix_projection"], bool):
        raise config_error("prefix_projection", "prefix_projection must be true or false", out["prefix_projection"],
                    "pass prefix_projection=True to train through the MLP")
    size = out["encoder_hidden_size"]
    if size is not None:
        if not is_int(size) or size < 1:
            raise config_error("encoder_hidden_size", "encoder_hidden_size must be an integer >= 1, or null", size,
                        "e.g. encoder_hidden_size=512, or leave it out (kv_dim)")
        out["encoder_hidden_size"] = int(size)
    if out["init"] is None:  # PEFT's init_weights=None
        out["init"] = "random"
    if out["init"] not in INITS:
        raise config_error("init", f"init must be one of {list(INITS)}", out["init"], 'e.g. init="random"')
    return out
