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
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import DeltaWeight, Method, TensorFileError, UsageError, WeightAdapterMethod, pattern_value

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


# ---- PEFT's selection rules, restated (peft.tuners.tuners_utils.check_target_module_exists) ----------

def peft_layer_index(path: str, layers_pattern: Any = None) -> int | None:
    """The layer number PEFT reads from ``path`` for ``layers_to_transform``: without ``layers_pattern``
    the first numbered segment after a named one, else the number after one of the pattern(s)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match["idx"]) if match else None


def excluded(path: str, exclude: Any) -> bool:
    """PEFT's ``exclude_modules`` rule: a regex full-matches, or a name equals the path or ends it after a dot."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return path in exclude or any(path.endswith(f".{name}") for name in exclude)


def in_layers(path: str, config: Mapping[str, Any]) -> bool:
    """PEFT's ``layers_to_transform`` rule (it applies to a list ``target_modules``, "all-linear" included)."""
    layers = config.get("layers_to_transform")
    if not layers or isinstance(config.get("target_modules"), str) and config["target_modules"] != ALL_LINEAR:
        return True
    index = peft_layer_index(path, config.get("layers_pattern"))
    return index is not None and index in layers


# ---- config checks -------------------------------------------------------------------------------

def _fail(key: str, message: str, found: Any, hint: str) -> UsageError:
    return UsageError(message, location=f"$.method.config.{key}", found=found, hint=hint, code="bad_config")


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _fail(key, f"{pattern!r} is not a valid regular expression ({exc})", pattern,
                    "escape special characters or use a list of module names") from None


def _selection(key: str, value: Any, nullable: bool) -> Any:
    if value is None and nullable:
        return None
    if isinstance(value, str) and value:
        if value != ALL_LINEAR:
            _regex(key, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise _fail(key, f"{key} must be a non-empty list of module names or a regex" + (", or null" if nullable else ""),
                value, 'e.g. ["q_proj", "v_proj"]')


def _pattern_map(key: str, value: Any, integer: bool) -> dict[str, Any]:
    what = "an integer >= 1" if integer else "a number > 0"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, f"{key} must map module names or regexes to {what}", value, f'e.g. {{"v_proj": 4}}')
    out = {}
    for pattern, number in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise _fail(key, "keys must be non-empty module names or regexes", pattern, 'use strings such as "q_proj"')
        _regex(key, pattern)
        ok = (_is_int(number) and number >= 1) if integer else (_is_number(number) and number > 0)
        if not ok:
            raise _fail(key, f"value of {pattern!r} must be {what}", number, f"fix the {key} entry for {pattern!r}")
        out[pattern] = int(number) if integer else number
    return out


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
    if not _is_int(out["r"]) or out["r"] < 1:
        raise _fail("r", "r must be an integer >= 1", out["r"], "pass a positive rank such as r=8")
    out["r"] = int(out["r"])
    if not _is_number(out["alpha"]) or out["alpha"] <= 0:
        raise _fail("alpha", "alpha must be a number > 0", out["alpha"], "e.g. alpha=16 (scale = alpha / r)")
    if not _is_number(out["rank_dropout"]) or not 0 <= out["rank_dropout"] < 1:
        raise _fail("rank_dropout", "rank_dropout must be a number in [0, 1)", out["rank_dropout"], "e.g. 0.1")
    if not _is_number(out["module_dropout"]) or not 0 <= out["module_dropout"] <= 1:
        raise _fail("module_dropout", "module_dropout must be a number in [0, 1]", out["module_dropout"], "e.g. 0.1")
    out["rank_dropout"], out["module_dropout"] = float(out["rank_dropout"]), float(out["module_dropout"])
    for key in ("use_effective_conv2d", "init_weights"):
        if not isinstance(out[key], bool):
            raise _fail(key, f"{key} must be true or false", out[key], f"pass {key}=true or false")
    out["target_modules"] = _selection("target_modules", out["target_modules"], nullable=False)
    out["exclude_modules"] = _selection("exclude_modules", out["exclude_modules"], nullable=True)
    layers = out["layers_to_transform"]
    if _is_int(layers):
        layers = [layers]
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
            raise _fail("layers_to_transform", "layers_to_transform must be a non-empty list of layer indices >= 0, "
                        "or null", layers, "e.g. layers_to_transform=[0, 1]")
        layers = [int(i) for i in layers]
    out["layers_to_transform"] = layers
    pattern = out["layers_pattern"]
    if pattern is not None:
        names = [pattern] if isinstance(pattern, str) else pattern
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(p, str) and p for p in names):
            raise _fail("layers_pattern", "layers_pattern must be a name, a list of names, or null", pattern,
                        'e.g. layers_pattern="layers"')
        for item in names:
            _regex("layers_pattern", item)
        out["layers_pattern"] = pattern if isinstance(pattern, str) else list(pattern)
        if layers is None:
            raise _fail("layers_pattern", "layers_pattern needs layers_to_transform (PEFT refuses it alone too)",
                        pattern, "set layers_to_transform, or remove layers_pattern")
    out["rank_pattern"] = _pattern_map("rank_pattern", out["rank_pattern"], integer=True)
    out["alpha_pattern"] = _pattern_map("alpha_pattern", out["alpha_pattern"], integer=False)
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
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape")
        r = target.get("r")
        if not (_is_int(r) and r >= 1):
            problems.append(f"r {r!r} must be an integer >= 1")
        if not (_is_number(target.get("alpha")) and target["alpha"] > 0):
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
    def select(self, model: Any, config: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's selection: ``target_modules`` (names, regex or all-linear), minus ``exclude_modules``, within
        ``layers_to_transform`` read with ``layers_pattern`` (``check_target_module_exists``)."""
        import adapterkit

        selected = adapterkit.select_modules(model, config["target_modules"], method="LoHa")
        kept = {p: m for p, m in selected.items() if not excluded(p, config.get("exclude_modules")) and in_layers(p, config)}
        if not kept:
            raise UsageError("exclude_modules / layers_to_transform leave no module to adapt",
                             location="$.method.config.layers_to_transform" if config.get("layers_to_transform")
                             else "$.method.config.exclude_modules",
                             found={k: config.get(k) for k in ("exclude_modules", "layers_to_transform", "layers_pattern")},
                             hint="check the layer indices and names against the model", code="no_targets")
        return kept

    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_parameters

        return new_parameters(layer, int(target["r"]), bool(config.get("init_weights", True)))


__all__ = ["CONFIG_SCHEMA", "DEFAULTS", "LohaMethod", "TARGET_SCHEMA", "excluded", "factor_shapes", "in_layers",
           "out_in", "peft_layer_index", "resolve"]
