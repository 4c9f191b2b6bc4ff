"""LoKr as an adapterkit :class:`~adapterkit.Method` (low-rank Kronecker product; PEFT's ``LoKrModel``,
after LyCORIS and Edalati et al. 2022, "KronA").

Each adapted linear / Conv1D module of ``[out, in]`` (``out = a * b``, ``in = c * d``) gets::

    delta W = kron(W1, W2) * alpha / r        W1 [a, c] = w1  or  w1_a [a, r] @ w1_b [r, c]
                                              W2 [b, d] = w2  or  w2_a [b, r] @ w2_b [r, d]

Canonical tensors per target ``m``: ``m.lokr.<p>`` with ``p`` PEFT's parameter name minus its
``lokr_`` prefix: ``w1`` or ``w1_a`` + ``w1_b``; ``w2`` or ``w2_a`` + ``w2_b``. Each target
records ``r``, ``alpha``, ``out_factors [a, b]``, ``in_factors [c, d]``, ``w1_full`` and
``w2_full``, so the tensors it holds are known without re-running PEFT's rules (a new adapter
follows them: :func:`adapterkit_lokr.math.peft_layout`). The update is additive and merges into
the stored weight (transposed for GPT-2's Conv1D). This module imports no torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    DeltaWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, canonical_key, check_layers,
    check_pattern_map, check_selection, config_error, in_out_features, is_int, is_number, pattern_value,
)

from .math import PARAMS, lokr_delta, peft_layout, scale_of, tensor_shapes

KINDS = ("linear", "conv1d")
ALL_LINEAR = "all-linear"

DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 8,
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "rank_dropout_scale": False,
    "decompose_both": False,
    "decompose_factor": -1,
    "use_effective_conv2d": False,
    "init_weights": True,
    "target_modules": ALL_LINEAR,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
ALIASES = {"lora_alpha": "alpha", "rank": "r", "dropout": "rank_dropout", "init": "init_weights"}

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_SELECT = {"oneOf": [_NAMES, {"type": "string", "minLength": 1}]}
CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "LoKr config (method.config of a lokr adapter; PEFT's LoKrConfig field names)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 8,
              "description": "Rank of the low-rank halves (w1_a/w1_b, w2_a/w2_b) and the scale's denominator."},
        "alpha": {"type": "number", "default": 8, "description": "scale = alpha / r (PEFT 0.21.2, every layout)."},
        "rank_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                         "description": "Training only: each output row of delta W dropped with this probability "
                                        "(PEFT's rank dropout)."},
        "module_dropout": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                           "description": "Training only: the whole module's update skipped with this probability."},
        "rank_dropout_scale": {"type": "boolean", "default": False,
                               "description": "Training only: divide the rank-dropout mask by its mean."},
        "decompose_both": {"type": "boolean", "default": False,
                           "description": "W1 low-rank too (w1_a @ w1_b) when r < max(a, c) / 2."},
        "decompose_factor": {"type": "integer", "default": -1,
                             "description": "PEFT's factorization factor: -1 splits each dimension near its square "
                                            "root; f > 0 dividing it gives (f, dim / f)."},
        "use_effective_conv2d": {"type": "boolean", "default": False,
                                 "description": "PEFT's flag for Conv layers with kernel > 1; no effect on the linear "
                                                "and Conv1D modules LoKr adapts here (kept for PEFT round trips)."},
        "init_weights": {"oneOf": [{"type": "boolean"}, {"const": "lycoris"}], "default": True,
                         "description": "true: W1 zero (w1_a zero), the rest kaiming-uniform (a new adapter changes "
                                        "nothing); \"lycoris\": W2 zero (w2_b zero); false: all kaiming-uniform."},
        "target_modules": {**_SELECT, "default": ALL_LINEAR,
                           "description": "Modules to adapt: names matched on whole dotted path suffixes, a regex "
                                          "full-matched against the path, or \"all-linear\"."},
        "exclude_modules": {"oneOf": [_NAMES, {"type": "string", "minLength": 1}, {"type": "null"}], "default": None,
                            "description": "Modules never adapted (same matching as target_modules)."},
        "layers_to_transform": {"oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                                          {"type": "null"}], "default": None,
                                "description": "Adapt only these layer indices (PEFT's rule: the number after the "
                                               "layers_pattern component, or after the first named one)."},
        "layers_pattern": {"oneOf": [_NAMES, {"type": "string", "minLength": 1}, {"type": "null"}], "default": None,
                           "description": "The name of the layer list (\"layers\", \"h\") for layers_to_transform."},
        "rank_pattern": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}, "default": {},
                         "description": "Per-module r: key k matches path m when re.match(rf\"(.*\\.)?({k})$\", m)."},
        "alpha_pattern": {"type": "object", "additionalProperties": {"type": "number"}, "default": {},
                          "description": "Per-module alpha, matched like rank_pattern."},
    },
}
_PAIR = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape", "r", "alpha", "out_factors", "in_factors", "w1_full", "w2_full"],
    "properties": {
        "kind": {"enum": list(KINDS),
                 "description": "linear: nn.Linear [out, in]; conv1d: transformers Conv1D [in, out]"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "r": {"type": "integer", "minimum": 1, "description": "rank of the low-rank halves; scale = alpha / r"},
        "alpha": {"type": "number"},
        "out_factors": {**_PAIR, "description": "[a, b]: out = a * b (W1 has a rows, W2 b rows)"},
        "in_factors": {**_PAIR, "description": "[c, d]: in = c * d (W1 has c columns, W2 d columns)"},
        "w1_full": {"type": "boolean", "description": "true: w1 [a, c]; false: w1_a [a, r] and w1_b [r, c]"},
        "w2_full": {"type": "boolean", "description": "true: w2 [b, d]; false: w2_a [b, r] and w2_b [r, d]"},
    },
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full LoKr config (defaults filled, values normalised); UsageError names the field and the fix."""
    if not isinstance(config, Mapping):
        raise UsageError("LoKr config must be a mapping of options", found=type(config).__name__, code="bad_config")
    for key in config:
        if key not in DEFAULTS:
            suggestion = ALIASES.get(key) or next(iter(difflib.get_close_matches(str(key), DEFAULTS, n=1)), None)
            raise UsageError(f"unknown lokr option {key!r}", location=f"$.method.config.{key}",
                             expected=sorted(DEFAULTS), code="bad_config",
                             hint=f"did you mean {suggestion!r}?" if suggestion else "remove it")
    out = {**DEFAULTS, **config}
    if not is_int(out["r"]) or out["r"] < 1:
        raise config_error("r", "r must be an integer >= 1", out["r"], "pass a positive rank such as r=8")
    out["r"] = int(out["r"])
    if not is_number(out["alpha"]):
        raise config_error("alpha", "alpha must be a finite number", out["alpha"], "e.g. alpha=16 (scale = alpha / r)")
    if not is_number(out["rank_dropout"]) or not 0 <= out["rank_dropout"] < 1:
        raise config_error("rank_dropout", "rank_dropout must be a number in [0, 1)", out["rank_dropout"],
                           "e.g. rank_dropout=0.1 (training only)")
    if not is_number(out["module_dropout"]) or not 0 <= out["module_dropout"] <= 1:  # 1: the update never applies
        raise config_error("module_dropout", "module_dropout must be a number in [0, 1]", out["module_dropout"],
                           "e.g. module_dropout=0.1 (training only)")
    out["rank_dropout"], out["module_dropout"] = float(out["rank_dropout"]), float(out["module_dropout"])
    for key in ("rank_dropout_scale", "decompose_both", "use_effective_conv2d"):
        if not isinstance(out[key], bool):
            raise config_error(key, f"{key} must be true or false", out[key], f"pass {key}=true or false")
    if not is_int(out["decompose_factor"]):
        raise config_error("decompose_factor", "decompose_factor must be an integer", out["decompose_factor"],
                           "-1 (split each dimension near its square root) or a divisor such as 4")
    out["decompose_factor"] = int(out["decompose_factor"])
    if not (isinstance(out["init_weights"], bool) or out["init_weights"] == "lycoris"):
        raise config_error("init_weights", 'init_weights must be true, false or "lycoris"', out["init_weights"],
                           "true: a new adapter changes nothing (W1 zero)")
    out["target_modules"] = check_selection("target_modules", out["target_modules"])
    out["exclude_modules"] = check_selection("exclude_modules", out["exclude_modules"], nullable=True)
    out["layers_to_transform"], out["layers_pattern"] = check_layers(out["layers_to_transform"], out["layers_pattern"])
    out["rank_pattern"] = check_pattern_map("rank_pattern", out["rank_pattern"], integer=True)
    out["alpha_pattern"] = check_pattern_map("alpha_pattern", out["alpha_pattern"], integer=False, positive=False)
    return out


class LokrMethod(WeightAdapterMethod, Method, DeltaWeight):
    """LoKr: delta W = kron(W1, W2) * alpha / r, each half a full matrix or a rank-r product (mergeable)."""

    name = "lokr"
    version = "1"
    description = ("LoKr: Kronecker-product update kron(W1, W2) * alpha / r of linear / Conv1D modules "
                   "(PEFT LoKr; mergeable)")

    # ---- torch-free ------------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_config(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any],
                         config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {canonical_key(module, self.name, p): shape for p, shape in tensor_shapes(target).items()}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one LoKr adapts; expected one of {list(KINDS)}")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            return [*problems, f"shape {shape!r} is not a 2-d weight shape"]
        r = target.get("r")
        if not (is_int(r) and r >= 1):
            problems.append(f"r {r!r} is not an integer >= 1")
        if not is_number(target.get("alpha")):
            problems.append(f"alpha {target.get('alpha')!r} is not a finite number")
        for flag in ("w1_full", "w2_full"):
            if not isinstance(target.get(flag), bool):
                problems.append(f"{flag} must be true or false")
        fan_in, fan_out = in_out_features(target.get("kind", "linear"), shape)
        for name, total in (("out_factors", fan_out), ("in_factors", fan_in)):
            pair = target.get(name)
            if not (isinstance(pair, list) and len(pair) == 2 and all(is_int(d) and d > 0 for d in pair)):
                problems.append(f"{name} {pair!r} is not a pair of positive integers")
            elif pair[0] * pair[1] != total:
                problems.append(f"{name} {pair} multiply to {pair[0] * pair[1]}, the module has {total} "
                                f"{'outputs' if name == 'out_factors' else 'inputs'}")
        return problems

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``kron(W1, W2) * alpha / r`` in float32 in the stored orientation (transposed for Conv1D)."""
        own = {p: tensors[p] for p in PARAMS if p in tensors}
        missing = sorted(set(tensor_shapes(target)) - set(own))
        if missing:
            raise TensorFileError(f"LoKr tensor {missing[0]} of {module} is missing", location=module,
                                  expected=sorted(tensor_shapes(target)), found=sorted(own), code="missing_tensor")
        delta = lokr_delta(own, scale_of(target))
        return np.ascontiguousarray(delta.T if target.get("kind") == "conv1d" else delta, dtype=np.float32)

    # ---- torch (adapterkit_lokr.layer imports torch) ---------------------------
    @property
    def layer_class(self) -> Any:
        from .layer import LokrLayer

        return LokrLayer

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        """r and alpha from rank_pattern / alpha_pattern, and PEFT's layout for them (``update_layer``)."""
        r = int(pattern_value(module, config.get("rank_pattern") or {}, config["r"]))
        alpha = pattern_value(module, config.get("alpha_pattern") or {}, config["alpha"])
        fan_in, fan_out = in_out_features(kind, shape)
        return {"r": r, "alpha": alpha,
                **peft_layout(fan_out, fan_in, r, config["decompose_both"], config["decompose_factor"])}

    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_parameters

        return new_parameters(layer, config, target)


__all__ = ["CONFIG_SCHEMA", "DEFAULTS", "KINDS", "LokrMethod", "TARGET_SCHEMA", "validate_config"]
