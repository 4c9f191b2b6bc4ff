"""LoRA config: JSON Schema, defaults, and validation with messages that say how to fix the input.

Torch-free. :func:`validate_config` is the code twin of :data:`CONFIG_SCHEMA`
(tests check that both accept and reject the same values).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from adapterkit.core.errors import UsageError
from adapterkit.core.format.config_fields import (check_layers, check_pattern_map, check_selection, config_error,
                                                 is_int, is_number)

from .targeting import ALL_LINEAR

DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 8,
    "use_rslora": False,
    "dropout": 0.0,
    "target_modules": ALL_LINEAR,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "init": "default",
    "target_parameters": [],
}

# PEFT spellings people will type, with the name to use instead.
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init", "rank": "r"}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "LoRA config (method.config of a lora adapter)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 8,
              "description": "Rank of the update: A is [r, in], B is [out, r]."},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "default": 8,
                  "description": "Scale numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora). "
                                 "Default 8, PEFT's default, i.e. scale 1 at the default rank."},
        "use_rslora": {"type": "boolean", "default": False,
                       "description": "Rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r."},
        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                    "description": "Dropout on the adapter's input, active in training mode only."},
        "target_modules": {
            "default": ALL_LINEAR,
            "description": 'Modules to adapt. A list: module-name suffixes matched on whole dotted components '
                           '(["q_proj", "v_proj"] or ["self_attn.q_proj"]). A string: a regex full-matched against '
                           'the module path, or "all-linear" for every nn.Linear / transformers Conv1D except the '
                           "output head (lm_head, classifier, score, the output embedding).",
            "oneOf": [
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                {"type": "string", "minLength": 1},
            ],
        },
        "rank_pattern": {
            "type": "object", "additionalProperties": {"type": "integer", "minimum": 1}, "default": {},
            "description": 'Per-module r. Key k (a name or regex) matches module path m when '
                           're.match(rf"(.*\\.)?({k})$", m); the first matching key wins. '
                           "The adapter records each module's r in targets, so applying it never re-matches.",
        },
        "alpha_pattern": {
            "type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}, "default": {},
            "description": "Per-module alpha, matched like rank_pattern.",
        },
        "layers_to_transform": {
            "oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}, {"type": "null"}],
            "default": None,
            "description": "Adapt only modules whose layer index (the first all-digit component of the path, "
                           "e.g. 3 in model.layers.3.mlp.up_proj) is listed; null adapts every layer.",
        },
        "target_parameters": {
            "type": "array", "items": {"type": "string", "minLength": 1}, "default": [],
            "description": "Parameters to adapt themselves (PEFT's target_parameters), e.g. a mixture of experts' "
                           'fused ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]: a parameter matches when '
                           'its path "<module>.<name>" equals an entry or ends with "." + entry. A 3-d parameter '
                           "[experts, d1, d2] gets one rank-r pair per expert.",
        },
        "init": {
            "enum": ["default", "gaussian"], "default": "default",
            "description": 'Initialisation of new adapters: "default" = A kaiming-uniform(a=sqrt(5)), B zeros; '
                           '"gaussian" = A normal(0, 1/r), B zeros. Either way a new adapter changes nothing.',
        },
    },
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape", "r", "alpha"],
    "properties": {
        "kind": {"enum": ["linear", "conv1d", "parameter"],
                 "description": "linear: nn.Linear, weight [out, in]; conv1d: transformers Conv1D, weight [in, out]; "
                                "parameter: the target's path names a parameter itself, [out, in] or "
                                "[experts, d1, d2] (the expert axis first)."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 3,
                  "description": "The base weight's shape as stored (3 dimensions for a stacked parameter only)."},
        "layout": {"enum": ["out_in", "in_out"], "default": "out_in",
                   "description": "parameter targets: out_in, each expert's matrix is [out, in] (F.linear(x, W[e])); "
                                  "in_out, it is [in, out] (x @ W[e], GPT-OSS) and the update is transposed."},
        "param_index": {"type": "integer", "minimum": 0, "default": 0,
                        "description": "parameter targets: the parameter's position among its module's parameters "
                                       "(registration order; PEFT nests its wrappers in this order)."},
        "r": {"type": "integer", "minimum": 1, "description": "Rank of this module's update."},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "description": "alpha of this module (scale = alpha / r)."},
    },
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full LoRA config (defaults filled, values normalised); UsageError says how to fix bad input."""
    if not isinstance(config, Mapping):
        raise UsageError("LoRA config must be a mapping of options", found=type(config).__name__, code="bad_config")
    for key in config:
        if key not in DEFAULTS:
            suggestion = ALIASES.get(key) or next(iter(difflib.get_close_matches(str(key), DEFAULTS, n=1)), None)
            hint = f"did you mean {suggestion!r}?" if suggestion else "remove it"
            raise UsageError(f"unknown LoRA option {key!r}", location=f"$.method.config.{key}",
                             expected=sorted(DEFAULTS), hint=hint, code="bad_config")
    out = {**DEFAULTS, **config}

    if not is_int(out["r"]) or out["r"] < 1:
        raise config_error("r", "r must be an integer >= 1", out["r"], "pass a positive rank such as r=8")
    out["r"] = int(out["r"])
    if not is_number(out["alpha"]) or out["alpha"] <= 0:
        raise config_error("alpha", "alpha must be a number > 0", out["alpha"],
                           "pass e.g. alpha=16 (scale = alpha / r)")
    if not isinstance(out["use_rslora"], bool):
        raise config_error("use_rslora", "use_rslora must be true or false", out["use_rslora"],
                           "pass use_rslora=True or False")
    if not is_number(out["dropout"]) or not 0 <= out["dropout"] < 1:
        raise config_error("dropout", "dropout must be a number in [0, 1)", out["dropout"], "pass e.g. dropout=0.05")
    out["dropout"] = float(out["dropout"])

    out["target_modules"] = check_selection("target_modules", out["target_modules"])
    out["rank_pattern"] = check_pattern_map("rank_pattern", out["rank_pattern"], integer=True)
    out["alpha_pattern"] = check_pattern_map("alpha_pattern", out["alpha_pattern"], integer=False)

    out["layers_to_transform"], _ = check_layers(out["layers_to_transform"], None)

    params = out["target_parameters"]
    if isinstance(params, (set, frozenset, tuple)):
        params = sorted(params)
    if not isinstance(params, list) or not all(isinstance(n, str) and n for n in params):
        raise config_error("target_parameters", "target_parameters must be a list of parameter names", params,
                           'e.g. target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]')
    out["target_parameters"] = list(params)
    if params and out["dropout"]:
        raise config_error("dropout", "dropout cannot apply to LoRA on parameters (the update is added to the weight)",
                           out["dropout"], "pass dropout=0 with target_parameters (PEFT refuses it too)")

    if out["init"] not in ("default", "gaussian"):
        raise config_error("init", 'init must be "default" or "gaussian"', out["init"],
                           '"default" = kaiming-uniform A, zero B (PEFT\'s default)')
    return out
