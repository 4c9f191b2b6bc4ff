"""Bottleneck-adapter config: presets, JSON Schema, defaults, and validation that says how to fix the input.

Torch-free. The options and their meaning are AdapterHub's ``BnConfig``
(adapters 1.3, ``configuration/adapter_config.py``), under clearer names where
AdapterHub's are obscure (``mh_adapter`` -> ``attention_adapter``,
``output_adapter`` -> ``ffn_adapter``, ``is_parallel`` -> ``parallel``); the
AdapterHub spellings are accepted as aliases.

Presets (AdapterHub's names; each fills the defaults of the fields not given):

- ``seq_bn`` (Pfeiffer et al. 2020, the default): one sequential adapter after the
  feed-forward block, ``original_ln_before=True``, relu, reduction factor 16.
- ``double_seq_bn`` (Houlsby et al. 2019): sequential adapters after attention and
  after the feed-forward block, ``original_ln_before=False``, swish, reduction 16.
- ``par_bn`` (He et al. 2021): a parallel adapter beside the feed-forward block,
  relu, reduction factor 2, scaling 4.0, ``mam_adapter`` init.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from adapterkit import config_error, is_int, is_number
from adapterkit.core.errors import UsageError

#: activation names accepted in ``non_linearity`` (transformers' ACT2FN names AdapterHub uses, plus "leakyrelu")
ACTIVATIONS = (
    "relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "swish", "silu", "tanh",
    "sigmoid", "leakyrelu", "leaky_relu", "relu6", "relu2", "mish", "linear",
)
INITS = ("bert", "houlsby", "mam_adapter")
SITES = ("attention", "ffn")

DEFAULTS: dict[str, Any] = {
    "preset": "seq_bn",
    "attention_adapter": False,
    "ffn_adapter": True,
    "parallel": False,
    "reduction_factor": 16,
    "bottleneck_size": None,
    "non_linearity": "relu",
    "original_ln_before": True,
    "original_ln_after": True,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "ln_before": False,
    "ln_after": False,
    "scaling": 1.0,
    "init_weights": "bert",
    "dropout": 0.0,
    "leave_out": [],
}

PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {},
    "double_seq_bn": {
        "attention_adapter": True, "ffn_adapter": True, "original_ln_before": False, "non_linearity": "swish",
    },
    "par_bn": {
        "parallel": True, "original_ln_before": False, "reduction_factor": 2, "init_weights": "mam_adapter",
        "scaling": 4.0,
    },
}

# AdapterHub spellings people will type, with the name to use instead.
ALIASES = {
    "mh_adapter": "attention_adapter", "output_adapter": "ffn_adapter", "is_parallel": "parallel",
    "adapter_size": "bottleneck_size",
}

_BOOL = {"type": "boolean"}
CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Bottleneck adapter config (method.config of a bottleneck adapter)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "preset": {"enum": list(PRESETS), "default": "seq_bn",
                   "description": "Which preset fills the fields left out: seq_bn (Pfeiffer), double_seq_bn (Houlsby), "
                                  "par_bn (He et al. parallel)."},
        "attention_adapter": {**_BOOL, "description": "An adapter after the attention sub-layer (AdapterHub mh_adapter)."},
        "ffn_adapter": {**_BOOL, "description": "An adapter after the feed-forward sub-layer (AdapterHub output_adapter)."},
        "parallel": {**_BOOL, "description": "Parallel adapter (He et al.): it reads the sub-layer's input and its "
                                             "scaled output is added to the sub-layer's output."},
        "reduction_factor": {
            "description": "hidden / bottleneck: the bottleneck size is int(hidden // reduction_factor), at least 1. "
                           'A mapping gives per-layer values: {"0": 8, "default": 16}.',
            "oneOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                 "propertyNames": {"pattern": "^(default|0|[1-9][0-9]*)$"}, "minProperties": 1},
            ],
        },
        "bottleneck_size": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "null"}],
                            "description": "Bottleneck width; when set it overrides reduction_factor."},
        "non_linearity": {"enum": list(ACTIVATIONS), "description": "Activation between the down and up projections."},
        "original_ln_before": {**_BOOL, "description": "Sequential only: add the sub-layer's residual (and apply the "
                                                       "model's own layer norm, in post-LN models) before the adapter."},
        "original_ln_after": {**_BOOL, "description": "Add the sub-layer's residual (and apply the model's own layer "
                                                      "norm, in post-LN models) after the adapter."},
        "residual_before_ln": {"oneOf": [_BOOL, {"const": "post_add"}],
                               "description": "Sequential only: the adapter's residual is taken before the model's layer "
                                              'norm (true), after it (false), or after the residual add ("post_add", '
                                              "post-LN models with original_ln_before only)."},
        "adapter_residual_before_ln": {**_BOOL, "description": "Sequential only: add the adapter's residual before "
                                                               "its own ln_after (true) or after it (false)."},
        "ln_before": {**_BOOL, "description": "A new layer norm on the adapter's input."},
        "ln_after": {**_BOOL, "description": "A new layer norm on the adapter's output."},
        "scaling": {"oneOf": [{"type": "number"}, {"enum": ["learned", "channel"]}],
                    "description": 'Factor on the up projection: a number, "learned" (one trained scalar) or '
                                   '"channel" (a trained vector of the hidden size).'},
        "init_weights": {"enum": list(INITS),
                         "description": 'Initialisation of new adapters: "bert" normal(0, 0.02) weights and zero '
                                        'biases (a new adapter already changes the output slightly); "houlsby" '
                                        'truncated normal(0, 0.01); "mam_adapter" kaiming-uniform down, zero up '
                                        "(a new adapter changes nothing)."},
        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1,
                    "description": "Dropout on the adapter's scaled output, active in training mode only."},
        "leave_out": {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True,
                      "description": "Layer indices that get no adapter."},
    },
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape", "site", "size"],
    "properties": {
        "kind": {"const": "block",
                 "description": "A bottleneck block on the residual branch of one sub-layer. The target module is that "
                                "branch's layer norm: the block's LayerNorm in post-LN models (BERT "
                                "attention.output.LayerNorm, output.LayerNorm), the sub-layer's pre-norm in pre-LN "
                                "models (Llama input_layernorm / post_attention_layernorm, GPT-2 ln_1 / ln_2)."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 1,
                  "description": "[hidden]: the layer norm's weight shape (checked by --base), the adapter's input and "
                                 "output size."},
        "site": {"enum": list(SITES), "description": "Which sub-layer the adapter follows: attention or ffn."},
        "size": {"type": "integer", "minimum": 1, "description": "Bottleneck width of this adapter."},
    },
}





def preset_defaults(preset: Any) -> dict[str, Any]:
    """DEFAULTS overlaid with one preset's values."""
    if preset not in PRESETS:
        raise config_error("preset", f"unknown preset {preset!r}", preset, f"use one of {list(PRESETS)}")
    return {**DEFAULTS, **PRESETS[preset], "preset": preset,
            "leave_out": list(PRESETS[preset].get("leave_out", DEFAULTS["leave_out"]))}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full config (preset defaults filled, values normalised); UsageError says how to fix bad input."""
    if not isinstance(config, Mapping):
        raise UsageError("bottleneck config must be a mapping of options", found=type(config).__name__, code="bad_config")
    given: dict[str, Any] = {}
    for key, value in config.items():
        name = ALIASES.get(key, key)
        if name not in DEFAULTS:
            suggestion = next(iter(difflib.get_close_matches(str(key), DEFAULTS, n=1)), None)
            raise UsageError(f"unknown bottleneck option {key!r}", location=f"$.method.config.{key}",
                             expected=sorted(DEFAULTS), hint=f"did you mean {suggestion!r}?" if suggestion else "remove it",
                             code="bad_config")
        if name in given and name != key:
            raise config_error(key, f"{key!r} and {name!r} are the same option; give it once", value, f"keep only {name!r}")
        given[name] = value
    out = {**preset_defaults(given.get("preset", DEFAULTS["preset"])), **given}

    for key in ("attention_adapter", "ffn_adapter", "parallel", "original_ln_before", "original_ln_after",
                "adapter_residual_before_ln", "ln_before", "ln_after"):
        if not isinstance(out[key], bool):
            raise config_error(key, f"{key} must be true or false", out[key], f"pass {key}=True or False")
    if not (out["attention_adapter"] or out["ffn_adapter"]):
        raise config_error("ffn_adapter", "no placement: attention_adapter and ffn_adapter are both false", False,
                    "set ffn_adapter=True (after the feed-forward block) and/or attention_adapter=True")

    out["reduction_factor"] = _check_reduction(out["reduction_factor"])
    size = out["bottleneck_size"]
    if size is not None:
        if not is_int(size) or size < 1:
            raise config_error("bottleneck_size", "bottleneck_size must be an integer >= 1, or null", size,
                        "e.g. bottleneck_size=64, or leave it out to use reduction_factor")
        out["bottleneck_size"] = int(size)

    if out["non_linearity"] not in ACTIVATIONS:
        lowered = out["non_linearity"].lower() if isinstance(out["non_linearity"], str) else None
        if lowered in ACTIVATIONS:
            out["non_linearity"] = lowered
        else:
            raise config_error("non_linearity", f"unknown non_linearity {out['non_linearity']!r}", out["non_linearity"],
                        f"use one of {list(ACTIVATIONS)}")

    residual = out["residual_before_ln"]
    if not (isinstance(residual, bool) or residual == "post_add"):
        raise config_error("residual_before_ln", 'residual_before_ln must be true, false or "post_add"', residual,
                    "true takes the adapter's residual before the model's layer norm")
    if residual == "post_add" and not out["parallel"] and not out["original_ln_before"]:
        raise config_error("residual_before_ln", '"post_add" needs original_ln_before=True (AdapterHub fails without it)',
                    residual, "set original_ln_before=True or residual_before_ln=True")

    scaling = out["scaling"]
    if isinstance(scaling, str):
        if scaling not in ("learned", "channel"):
            raise config_error("scaling", f"unknown scaling {scaling!r}", scaling, 'use a number, "learned" or "channel"')
    elif is_number(scaling):
        out["scaling"] = float(scaling)
    else:
        raise config_error("scaling", "scaling must be a number, \"learned\" or \"channel\"", scaling, "e.g. scaling=4.0")

    if out["init_weights"] not in INITS:
        raise config_error("init_weights", f"unknown init_weights {out['init_weights']!r}", out["init_weights"],
                    f"use one of {list(INITS)}")
    if not is_number(out["dropout"]) or not 0 <= out["dropout"] < 1:
        raise config_error("dropout", "dropout must be a number in [0, 1)", out["dropout"], "e.g. dropout=0.1")
    out["dropout"] = float(out["dropout"])

    leave_out = out["leave_out"]
    if leave_out is None:
        leave_out = []
    if not isinstance(leave_out, (list, tuple)) or not all(is_int(i) and i >= 0 for i in leave_out):
        raise config_error("leave_out", "leave_out must be a list of layer indices >= 0", leave_out, "e.g. leave_out=[0, 11]")
    out["leave_out"] = sorted({int(i) for i in leave_out})
    return out


def _check_reduction(value: Any) -> float | int | dict[str, float | int]:
    hint = 'e.g. reduction_factor=16, or {"0": 8, "default": 16} per layer'
    if is_number(value):
        if value <= 0:
            raise config_error("reduction_factor", "reduction_factor must be > 0", value, hint)
        return int(value) if isinstance(value, int) else value
    if isinstance(value, Mapping) and value:
        out: dict[str, float | int] = {}
        for key, number in value.items():
            if not (key == "default" or (isinstance(key, str) and key.isdigit() and str(int(key)) == key)):
                raise config_error("reduction_factor", f"key {key!r} must be a layer index or \"default\"", key, hint)
            if not is_number(number) or number <= 0:
                raise config_error("reduction_factor", f"value of {key!r} must be a number > 0", number, hint)
            out[key] = number
        return out
    raise config_error("reduction_factor", "reduction_factor must be a number > 0 or a per-layer mapping", value, hint)


def bottleneck_size(config: Mapping[str, Any], hidden: int, layer: int | None) -> int:
    """The bottleneck width of one layer: bottleneck_size, else int(hidden // reduction_factor), at least 1."""
    if config.get("bottleneck_size") is not None:
        return int(config["bottleneck_size"])
    factor = config.get("reduction_factor", DEFAULTS["reduction_factor"])
    if isinstance(factor, Mapping):
        key = str(layer)
        if key in factor:
            factor = factor[key]
        elif "default" in factor:
            factor = factor["default"]
        else:
            raise config_error("reduction_factor", f"no value for layer {layer} and no \"default\"", dict(factor),
                        'add a "default" entry')
    return max(1, int(hidden // factor))


def minimal(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as written to a manifest: fields equal to their preset's default left out."""
    defaults = preset_defaults(config.get("preset", DEFAULTS["preset"]))
    out = {k: v for k, v in sorted(config.items()) if k not in defaults or defaults[k] != v
           or isinstance(defaults[k], bool) != isinstance(v, bool)}
    if config.get("preset", DEFAULTS["preset"]) != DEFAULTS["preset"]:
        out["preset"] = config["preset"]
    return out
