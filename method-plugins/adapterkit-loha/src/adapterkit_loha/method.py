"""LoHa as an adapterkit :class:`~adapterkit.Method` (low-rank Hadamard product; Hyeon-Woo et al. 2022,
"FedPara", as in LyCORIS and PEFT 0.21's ``peft.tuners.loha``).

Per adapted ``nn.Linear`` / transformers ``Conv1D`` module ``m`` with rank ``r`` and ``alpha``::

    delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r          ([out, in]; transposed for Conv1D)

Canonical tensors ``m.loha.w1_a [out, r]``, ``m.loha.w1_b [r, in]``, ``m.loha.w2_a [out, r]``,
``m.loha.w2_b [r, in]`` (PEFT's ``hada_w1_a`` ... without the ``hada_`` prefix). Each target
records its own ``r`` and ``alpha`` (from ``rank_pattern`` / ``alpha_pattern``), so applying a
saved adapter never re-matches patterns. Capability: :class:`adapterkit.DeltaWeight` (merge, ``to-lora``);
not ``LowRank``: the update has rank up to ``r**2``.

Training-time only, as in PEFT's ``LoHaLayer.forward`` / ``get_delta_weight``: ``module_dropout``
(the whole update skipped for a forward with that probability) and ``rank_dropout`` (rows of the
update dropped, the rest rescaled by the kept share). ``use_effective_conv2d`` only matters for
``nn.Conv2d`` / ``nn.Conv1d``, which this method does not adapt: it is kept in the config, with no
effect. This module imports no torch (``adapterkit_loha.layer`` does).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (DeltaWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, check_layers,
                        check_pattern_map, check_selection, config_error, is_int, is_number, pattern_value)

from .math import PARAMS, loha_delta, loha_scale

NAME = "loha"
KINDS = ("linear", "conv1d")
ALL_LINEAR = "all-linear"

DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 8,
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "use_effective_conv2d": False,
    "target_modules": ALL_LINEAR,
    "exclude_modules": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
#: spellings people bring from LoRA or PEFT's other configs -> the field to use
ALIASES = {"lora_alpha": "alpha", "rank": "r", "init_lora_weights": "init_weights", "dropout": "rank_dropout"}

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_SELECTION = {"oneOf": [_NAMES, {"type": "string", "minLength": 1}]}
CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "LoHa config (method.config of a loha adapter; PEFT's LoHaConfig fields)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 8,
              "description": "Rank of each of the two products: w1_a, w2_a [out, r]; w1_b, w2_b [r, in]."},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "default": 8, "description": "scale = alpha / r."},
        "rank_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                         "description": "Training only: each output row of the update is dropped with this "
                                        "probability, the kept rows rescaled by 1 / (kept share) (PEFT's rank_dropout)."},
        "module_dropout": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                           "description": "Training only: the whole update of a module is skipped in a forward "
                                          "with this probability (PEFT's module_dropout)."},
        "use_effective_conv2d": {"type": "boolean", "default": False,
                                 "description": "PEFT's flag for Conv2d / Conv1d kernels > 1; kept for PEFT, no "
                                                "effect here (only linear and GPT-2 Conv1D modules are adapted)."},
        "target_modules": {**_SELECTION, "default": ALL_LINEAR,
                           "description": 'Modules to adapt: a list of names (a path equal to one, or ending in '
                                          '".<name>"), a regex full-matched against the path, or "all-linear" '
                                          "(every nn.Linear / Conv1D but the output head)."},
        "exclude_modules": {"oneOf": [_NAMES, {"type": "string", "minLength": 1}, {"type": "null"}], "default": None,
                            "description": "Modules never adapted, matched like target_modules."},
        "init_weights": {"type": "boolean", "default": True,
                         "description": "true: w1_a, w1_b, w2_a kaiming-uniform and w2_b zeros (a new adapter "
                                        "changes nothing); false: all four kaiming-uniform (PEFT's init_weights)."},
        "layers_to_transform": {"oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                                          {"type": "null"}], "default": None,
                                "description": "Adapt only these layer indices (with a list target_modules or "
                                               "all-linear, as PEFT)."},
        "layers_pattern": {"oneOf": [{"type": "string", "minLength": 1}, _NAMES, {"type": "null"}], "default": None,
                           "description": "Name(s) of the layer list whose index layers_to_transform reads "
                                          "(PEFT's layers_pattern, e.g. \"layers\")."},
        "rank_pattern": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}, "default": {},
                         "description": 'Per-module r: key k matches path m when re.match(rf"(.*\\.)?({k})$", m); '
                                        "the first matching key wins. Each target records its r."},
        "alpha_pattern": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                          "default": {}, "description": "Per-module alpha, matched like rank_pattern."},
    },
}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape", "r", "alpha"],
    "properties": {
        "kind": {"enum": list(KINDS), "description": "linear: nn.Linear [out, in]; conv1d: transformers Conv1D [in, out]"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "r": {"type": "integer", "minimum": 1, "description": "this module's rank"},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "description": "this module's alpha (scale = alpha / r)"},
    },
}


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full LoHa config (defaults filled, values normalised); UsageError names the field and the fix."""
    if not isinstance(config, Mapping):
        raise UsageError("LoHa config must be a mapping of options", found=type(config).__name__, code="bad_config")
    for key in config:
        if key not in DEFAULTS:
            if key == "modules_to_save":
                raise UsageError("modules_to_save is not supported by the loha method (the fully trained modules "
                                 "would not be saved)", location="$.method.config.modules_to_save",
                                 found=config[key], hint="remove it", code="bad_config")
            guess = ALIASES.get(str(key)) or next(iter(difflib.get_close_matches(str(key), DEFAULTS, n=1)), None)
            raise UsageError(f"unknown LoHa option {key!r}", location=f"$.method.config.{key}", expected=sorted(DEFAULTS),
                             hint=f"did you mean {guess!r}?" if guess else "remove it", code="bad_config")
    out = {**DEFAULTS, **config}
    if not is_int(out["r"]) or out["r"] < 1:
        raise config_error("r", "r must be an integer >= 1", out["r"], "pass a positive rank such as r=8")
    out["r"] = int(out["r"])
    if not is_number(out["alpha"]) or out["alpha"] <= 0:
        raise config_error("alpha", "alpha must be a number > 0", out["alpha"], "e.g. alpha=16 (scale = alpha / r)")
    if not is_number(out["rank_dropout"]) or not 0 <= out["rank_dropout"] < 1:
        raise config_error("rank_dropout", "rank_dropout must be a number in [0, 1)", out["rank_dropout"], "e.g. 0.1")
    if not is_number(out["module_dropout"]) or not 0 <= out["module_dropout"] <= 1:
        raise config_error("module_dropout", "module_dropout must be a number in [0, 1]", out["module_dropout"],
                           "e.g. 0.1")
    out["rank_dropout"], out["module_dropout"] = float(out["rank_dropout"]), float(out["module_dropout"])
    for key in ("use_effective_conv2d", "init_weights"):
        if not isinstance(out[key], bool):
            raise config_error(key, f"{key} must be true or false", out[key], f"pass {key}=true or false")
    out["target_modules"] = check_selection("target_modules", out["target_modules"])
    out["exclude_modules"] = check_selection("exclude_modules", out["exclude_modules"], nullable=True)
    out["layers_to_transform"], out["layers_pattern"] = check_layers(out["layers_to_transform"], out["layers_pattern"])
    out["rank_pattern"] = check_pattern_map("rank_pattern", out["rank_pattern"], integer=True)
    out["alpha_pattern"] = check_pattern_map("alpha_pattern", out["alpha_pattern"], integer=False)
    return out


def out_in(target: Mapping[str, Any]) -> tuple[int, int]:
    """(out, in) of a target: linear stores ``[out, in]``, Conv1D ``[in, out]``."""
    d0, d1 = (int(d) for d in target["shape"])
    return (d1, d0) if target.get("kind") == "conv1d" else (d0, d1)


def factor_shapes(target: Mapping[str, Any], r: int) -> dict[str, tuple[int, int]]:
    out, inn = out_in(target)
    return {"w1_a": (out, r), "w1_b": (r, inn), "w2_a": (out, r), "w2_b": (r, inn)}


class LohaMethod(WeightAdapterMethod, Method, DeltaWeight):
    """LoHa: a weight update that is the Hadamard product of two rank-r products (mergeable)."""

    name = NAME
    version = "1"
    description = "LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r on linear / Conv1D modules (mergeable)"

    # ---- torch-free -----------------------------------------------------------------
    @property
    def layer_class(self) -> type:
        from .layer import LohaLayer

        return LohaLayer

    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return resolve(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        """r and alpha of ``module``: PEFT's ``LoHaModel._create_and_replace`` (rank_pattern / alpha_pattern)."""
        return {"r": int(pattern_value(module, config.get("rank_pattern") or {}, config["r"])),
                "alpha": pattern_value(module, config.get("alpha_pattern") or {}, config["alpha"])}

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        r = int(target.get("r", config.get("r", DEFAULTS["r"])))
        return {f"{module}.{NAME}.{p}": shape for p, shape in factor_shapes(target, r).items()}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one LoHa adapts here; expected one of {list(KINDS)} "
                            "(convolutions are not supported)")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape")
        r = target.get("r")
        if not (is_int(r) and r >= 1):
            problems.append(f"r {r!r} must be an integer >= 1")
        if not (is_number(target.get("alpha")) and target["alpha"] > 0):
            problems.append(f"alpha {target.get('alpha')!r} must be a number > 0")
        return problems

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 update in the stored orientation (transposed for Conv1D): :func:`loha_delta`."""
        missing = [p for p in PARAMS if p not in tensors]
        if missing:
            raise TensorFileError(f"LoHa tensor {missing[0]} of {module} is missing", location=module,
                                  expected=[f"{module}.{NAME}.{p}" for p in PARAMS], found=sorted(tensors),
                                  code="missing_tensor")
        r = int(target.get("r", config.get("r", DEFAULTS["r"])))
        alpha = target.get("alpha", config.get("alpha", DEFAULTS["alpha"]))
        delta = loha_delta(*(tensors[p] for p in PARAMS), loha_scale(alpha, r))
        return np.ascontiguousarray(delta.T) if target.get("kind") == "conv1d" else delta

    # ---- torch (adapterkit_loha.layer imports torch) ------------------------------------
    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_parameters

        return new_parameters(layer, int(target["r"]), bool(config.get("init_weights", True)))


__all__ = ["CONFIG_SCHEMA", "DEFAULTS", "LohaMethod", "TARGET_SCHEMA", "factor_shapes", "out_in", "resolve"]
