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
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    DeltaWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, canonical_key, in_out_features,
    matches_target, pattern_value,
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
        "module_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
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


def _fail(key: str, message: str, found: Any, hint: str) -> UsageError:
    return UsageError(message, location=f"$.method.config.{key}", found=found, hint=hint, code="bad_config")


def _is_int(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _fail(key, f"{pattern!r} is not a valid regular expression ({exc})", pattern,
                    "escape special characters or use a list of module names") from None


def _names(key: str, value: Any, allow_none: bool) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value:
        if value != ALL_LINEAR or key != "target_modules":
            _regex(key, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise _fail(key, f"{key} must be a non-empty list of module names or a regular expression"
                + (" (or null)" if allow_none else ""), value, 'e.g. ["q_proj", "v_proj"]')


def _pattern_map(key: str, value: Any, positive_int: bool) -> dict[str, Any]:
    what = "an integer >= 1" if positive_int else "a number"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, f"{key} must map module names or regexes to {what}", value, f'e.g. {{"q_proj": 4}}')
    out = {}
    for pattern, number in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise _fail(key, "keys must be non-empty module names or regexes", pattern, 'use strings such as "q_proj"')
        _regex(key, pattern)
        ok = (_is_int(number) and number >= 1) if positive_int else _is_number(number)
        if not ok:
            raise _fail(key, f"value of {pattern!r} must be {what}", number, f"fix the {key} entry for {pattern!r}")
        out[pattern] = int(number) if positive_int else number
    return out


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
    if not _is_int(out["r"]) or out["r"] < 1:
        raise _fail("r", "r must be an integer >= 1", out["r"], "pass a positive rank such as r=8")
    out["r"] = int(out["r"])
    if not _is_number(out["alpha"]):
        raise _fail("alpha", "alpha must be a finite number", out["alpha"], "e.g. alpha=16 (scale = alpha / r)")
    for key in ("rank_dropout", "module_dropout"):
        if not _is_number(out[key]) or not 0 <= out[key] < 1:
            raise _fail(key, f"{key} must be a number in [0, 1)", out[key], f"e.g. {key}=0.1 (training only)")
        out[key] = float(out[key])
    for key in ("rank_dropout_scale", "decompose_both", "use_effective_conv2d"):
        if not isinstance(out[key], bool):
            raise _fail(key, f"{key} must be true or false", out[key], f"pass {key}=true or false")
    if not _is_int(out["decompose_factor"]):
        raise _fail("decompose_factor", "decompose_factor must be an integer", out["decompose_factor"],
                    "-1 (split each dimension near its square root) or a divisor such as 4")
    out["decompose_factor"] = int(out["decompose_factor"])
    if not (isinstance(out["init_weights"], bool) or out["init_weights"] == "lycoris"):
        raise _fail("init_weights", 'init_weights must be true, false or "lycoris"', out["init_weights"],
                    "true: a new adapter changes nothing (W1 zero)")
    out["target_modules"] = _names("target_modules", out["target_modules"], allow_none=False)
    out["exclude_modules"] = _names("exclude_modules", out["exclude_modules"], allow_none=True)
    layers = out["layers_to_transform"]
    if _is_int(layers):
        layers = [layers]
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
            raise _fail("layers_to_transform", "layers_to_transform must be a non-empty list of layer indices >= 0, or "
                        "null", layers, "e.g. layers_to_transform=[0, 1]")
        layers = [int(i) for i in layers]
    out["layers_to_transform"] = layers
    pattern = out["layers_pattern"]
    if pattern is not None:
        out["layers_pattern"] = _names("layers_pattern", pattern, allow_none=True)
        if layers is None:
            raise _fail("layers_pattern", "layers_pattern needs layers_to_transform", pattern,
                        "give layers_to_transform too, or leave layers_pattern out (PEFT refuses it too)")
    out["rank_pattern"] = _pattern_map("rank_pattern", out["rank_pattern"], positive_int=True)
    out["alpha_pattern"] = _pattern_map("alpha_pattern", out["alpha_pattern"], positive_int=False)
    return out


def peft_layer_index(path: str, layers_pattern: Any = None) -> int | None:
    """The layer number PEFT 0.21 reads for ``layers_to_transform`` (``check_target_module_exists``): the number
    after a ``layers_pattern`` component, or, without one, the first number after a named component."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match["idx"]) if match else None


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
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            return [*problems, f"shape {shape!r} is not a 2-d weight shape"]
        r = target.get("r")
        if not (_is_int(r) and r >= 1):
            problems.append(f"r {r!r} is not an integer >= 1")
        if not _is_number(target.get("alpha")):
            problems.append(f"alpha {target.get('alpha')!r} is not a finite number")
        for flag in ("w1_full", "w2_full"):
            if not isinstance(target.get(flag), bool):
                problems.append(f"{flag} must be true or false")
        fan_in, fan_out = in_out_features(target.get("kind", "linear"), shape)
        for name, total in (("out_factors", fan_out), ("in_factors", fan_in)):
            pair = target.get(name)
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(d) and d > 0 for d in pair)):
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

    def select(self, model: Any, config: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's selection: target_modules (or all-linear), minus exclude_modules, then layers_to_transform
        by PEFT's layer index (``layers_pattern``) for a list of names."""
        from adapterkit import select_modules

        selected = select_modules(model, config["target_modules"], method=self.name)
        exclude = config.get("exclude_modules")
        if exclude:
            selected = {p: m for p, m in selected.items() if not matches_target(p, exclude)}
        layers = config.get("layers_to_transform")
        targets = config["target_modules"]
        if layers is not None and (not isinstance(targets, str) or targets == ALL_LINEAR):
            selected = {p: m for p, m in selected.items()
                        if peft_layer_index(p, config.get("layers_pattern")) in layers}
        if not selected:
            raise UsageError("exclude_modules / layers_to_transform leave no module to adapt",
                             location="$.method.config.target_modules", found=config["target_modules"],
                             hint="check exclude_modules, layers_to_transform and layers_pattern", code="no_targets")
        return selected

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


__all__ = ["CONFIG_SCHEMA", "DEFAULTS", "KINDS", "LokrMethod", "TARGET_SCHEMA", "peft_layer_index", "validate_config"]
