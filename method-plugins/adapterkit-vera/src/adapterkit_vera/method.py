"""VeRA as an adapterkit :class:`~adapterkit.Method` (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix
Adaptation"; PEFT 0.21 ``peft/tuners/vera``).

One pair of frozen random projections per adapter, shared by every adapted module:
``A [r, max_in]`` and ``B [max_out, r]`` (``max_in`` / ``max_out``: the largest input / output size
over the adapted modules). Each module trains two vectors, ``lambda_d [r]`` and ``lambda_b [out]``,
and uses the leading slices ``A[:, :in]`` and ``B[:out, :]``::

    y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))

i.e. ``delta W = (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])`` ``[out, in]``
(transposed for GPT-2's ``Conv1D``, stored ``[in, out]``): exactly low rank, so the method gives
:class:`~adapterkit.LowRank` factors (the adapter pool, svd compose, ``to-lora``, ``validate
--target``) and an additive :class:`~adapterkit.DeltaWeight` (merge).

Canonical tensors: ``<module>.vera.lambda_d [r]``, ``<module>.vera.lambda_b [out]`` per module and the
shared ``vera.A [r, max_in]``, ``vera.B [max_out, r]`` (``Method.shared_tensors``). A new adapter's
projections are drawn as PEFT's ``VeraModel._init_vera_A_vera_B`` draws them (a CPU ``torch.Generator``
seeded with ``projection_prng_key``; kaiming-uniform, ``A`` first, then ``B``); its vectors start as
PEFT's ``VeraLayer.update_layer`` / ``reset_vera_parameters`` set them: ``lambda_d = d_initial``,
``lambda_b = 0`` (``init_weights`` true, a no-op adapter) or ``lambda_d ~ N(0, 1)``,
``lambda_b = 1`` (false). This module imports no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    DeltaWeight, Factors, LowRank, Method, UsageError, WeightAdapterMethod, in_out_features,
)

KINDS = ("linear", "conv1d")
#: per-module parameters (canonical ``<module>.vera.<param>``) and the shared ones (``vera.<param>``)
LAMBDA_D, LAMBDA_B = "lambda_d", "lambda_b"
SHARED_A, SHARED_B = "A", "B"
ALL_LINEAR = "all-linear"
#: torch.manual_seed's range
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1

DEFAULTS: dict[str, Any] = {
    "r": 256,
    "target_modules": ALL_LINEAR,
    "projection_prng_key": 0,
    "save_projection": True,
    "vera_dropout": 0.0,
    "d_initial": 0.1,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
}

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "VeRA config (method.config of a vera adapter)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 256,
              "description": "Rank of the shared random projections: A is [r, max_in], B is [max_out, r]."},
        "target_modules": {
            "default": ALL_LINEAR,
            "description": 'Modules to adapt: a list of names (a module matches its full path or a path ending in '
                           '".<name>"), a regex full-matched against the path, or "all-linear" (every nn.Linear / '
                           "transformers Conv1D but the output head).",
            "oneOf": [_NAMES, {"type": "string", "minLength": 1}],
        },
        "projection_prng_key": {
            "type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX, "default": 0,
            "description": "Seed of the torch.Generator that draws the projections of a new adapter (PEFT's).",
        },
        "save_projection": {
            "type": "boolean", "default": True,
            "description": "PEFT only: whether a PEFT folder written from this adapter stores vera_A / vera_B "
                           "(false: PEFT redraws them from projection_prng_key). adapterkit always stores them.",
        },
        "vera_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                         "description": "Dropout on the adapter's input, active in training mode only."},
        "d_initial": {"type": "number", "default": 0.1,
                      "description": "Initial value of every lambda_d entry of a new adapter (init_weights true)."},
        "init_weights": {"type": "boolean", "default": True,
                         "description": "true: lambda_d = d_initial, lambda_b = 0 (a new adapter changes nothing); "
                                        "false: lambda_d ~ N(0, 1), lambda_b = 1 (PEFT's)."},
        "layers_to_transform": {
            "oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                      {"type": "integer", "minimum": 0}, {"type": "null"}],
            "default": None,
            "description": "Adapt only modules of these layer indices; null adapts every layer.",
        },
        "layers_pattern": {
            "oneOf": [{"type": "string", "minLength": 1}, _NAMES, {"type": "null"}],
            "default": None,
            "description": "The name (or regex) of the layer list whose index layers_to_transform reads "
                           '(e.g. "layers", "h"); needs layers_to_transform.',
        },
    },
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape"],
    "properties": {
        "kind": {"enum": list(KINDS),
                 "description": "linear: nn.Linear, weight [out, in]; conv1d: transformers Conv1D, weight [in, out]."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                  "description": "The base weight's shape as stored."},
    },
}


def _fail(key: str, message: str, found: Any, hint: str) -> UsageError:
    return UsageError(message, location=f"$.method.config.{key}", found=found, hint=hint, code="bad_config")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _fail(key, f"{pattern!r} is not a valid regular expression ({exc})", pattern,
                    "escape special characters or use a list of module names") from None


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full config (defaults filled, ``layers_to_transform`` as a list), or a UsageError at
    ``$.method.config.<field>`` naming the fix. The code twin of :data:`CONFIG_SCHEMA`."""
    if not isinstance(config, Mapping):
        raise UsageError("the vera config must be an object", location="$.method.config", found=type(config).__name__,
                         code="bad_config")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        hint = "use vera_dropout" if unknown[0] == "dropout" else "check the spelling"
        raise UsageError(f"unknown vera option {unknown[0]!r}", location=f"$.method.config.{unknown[0]}",
                         expected=sorted(DEFAULTS), hint=hint, code="bad_option")
    out = {**DEFAULTS, **config}
    if not (_is_int(out["r"]) and out["r"] >= 1):
        raise _fail("r", "r must be an integer >= 1", out["r"], "e.g. r=256 (VeRA takes larger ranks than LoRA)")
    targets = out["target_modules"]
    if isinstance(targets, str):
        if not targets:
            raise _fail("target_modules", "target_modules is empty", targets, 'e.g. ["q_proj", "v_proj"]')
        if targets != ALL_LINEAR:
            _check_regex("target_modules", targets)
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        out["target_modules"] = list(targets)
    else:
        raise _fail("target_modules", "target_modules must be a non-empty list of module names or a regex", targets,
                    'e.g. ["q_proj", "v_proj"], ".*attn.*" or "all-linear"')
    key = out["projection_prng_key"]
    if not (_is_int(key) and SEED_MIN <= key <= SEED_MAX):
        raise _fail("projection_prng_key", "projection_prng_key must be an integer torch.manual_seed takes", key,
                    "e.g. 0")
    for name in ("save_projection", "init_weights"):
        if not isinstance(out[name], bool):
            raise _fail(name, f"{name} must be true or false", out[name], f"{name}=true")
    dropout = out["vera_dropout"]
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise _fail("vera_dropout", "vera_dropout must be a number in [0, 1)", dropout, "e.g. 0.05")
    if not _is_number(out["d_initial"]):
        raise _fail("d_initial", "d_initial must be a finite number", out["d_initial"], "e.g. 0.1 (PEFT's default)")
    layers = out["layers_to_transform"]
    if _is_int(layers):
        layers = [layers]
    if layers is not None:
        if not (isinstance(layers, (list, tuple)) and layers and all(_is_int(i) and i >= 0 for i in layers)):
            raise _fail("layers_to_transform", "layers_to_transform must be a non-empty list of layer indices >= 0",
                        layers, "e.g. [0, 1], or null for every layer")
        out["layers_to_transform"] = list(layers)
    pattern = out["layers_pattern"]
    if pattern is not None:
        items = [pattern] if isinstance(pattern, str) else pattern
        if not (isinstance(items, (list, tuple)) and items and all(isinstance(p, str) and p for p in items)):
            raise _fail("layers_pattern", "layers_pattern must be a name, a regex or a list of them", pattern,
                        'e.g. "layers"')
        for item in items:
            _check_regex("layers_pattern", item)
        if layers is None:
            raise _fail("layers_pattern", "layers_pattern needs layers_to_transform", pattern,
                        "give layers_to_transform too, or leave layers_pattern out")
    return out


def layer_index(path: str, layers_pattern: Any = None) -> int | None:
    """The layer number of ``path``: PEFT's rule (``check_target_module_exists``), the first numbered component
    after a named one, or after a component matching ``layers_pattern``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return int(match[1]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if match:
            return int(match[1])
    return None


def projection_shapes(targets: Mapping[str, Mapping[str, Any]], r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(A shape, B shape)``: ``[r, max_in]`` and ``[max_out, r]`` over the targets (PEFT's ``VeraModel._find_dim``)."""
    if not targets:
        raise ValueError("no targets: the projections have no size")
    sizes = [in_out_features(t["kind"], t["shape"]) for t in targets.values()]
    return (r, max(i for i, _ in sizes)), (max(o for _, o in sizes), r)


def _f32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class VeraMethod(WeightAdapterMethod, Method, LowRank, DeltaWeight):
    """VeRA: frozen shared random projections, trained per-module scaling vectors (low rank, mergeable)."""

    name = "vera"
    version = "1"
    description = "VeRA: shared frozen random projections A, B and trained vectors lambda_d, lambda_b per module"

    @property
    def layer_class(self) -> type:
        from .layer import VeraLayer

        return VeraLayer

    # ---- torch-free ---------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_config(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        r = int({**DEFAULTS, **config}["r"])
        _, fan_out = in_out_features(target["kind"], target["shape"])
        return {f"{module}.{self.name}.{LAMBDA_D}": (r,), f"{module}.{self.name}.{LAMBDA_B}": (fan_out,)}

    def shared_tensors(self, targets: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        if not targets:
            return {}
        shape_a, shape_b = projection_shapes(targets, int({**DEFAULTS, **config}["r"]))
        return {f"{self.name}.{SHARED_A}": shape_a, f"{self.name}.{SHARED_B}": shape_b}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one VeRA adapts; expected one of {list(KINDS)}")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape [d0, d1]")
        return problems

    def lora_factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> Factors:
        """``a = lambda_d[:, None] * A[:, :in]`` ``[r, in]``, ``b = lambda_b[:, None] * B[:out]`` ``[out, r]``,
        scale 1 (float32): PEFT's ``vera.layer.Linear.get_delta_weight`` is ``b @ a``."""
        fan_in, fan_out = in_out_features(target["kind"], target["shape"])
        shared_a = _f32(tensors[f"{self.name}.{SHARED_A}"])
        shared_b = _f32(tensors[f"{self.name}.{SHARED_B}"])
        if shared_a.ndim != 2 or shared_b.ndim != 2 or shared_a.shape[1] < fan_in or shared_b.shape[0] < fan_out:
            raise ValueError(f"{module}: the shared projections {list(shared_a.shape)} / {list(shared_b.shape)} are "
                             f"too small for a module of {fan_in} inputs and {fan_out} outputs")
        lambda_d, lambda_b = _f32(tensors[LAMBDA_D]), _f32(tensors[LAMBDA_B])
        a = lambda_d[:, None] * shared_a[:, :fan_in]
        b = lambda_b[:, None] * shared_b[:fan_out, :]
        return Factors(np.ascontiguousarray(a), np.ascontiguousarray(b), 1.0)

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(lambda_b * B[:out]) @ (lambda_d * A[:, :in])`` in float32, in the stored orientation."""
        return self.lora_factors(module, target, config, tensors).delta(target.get("kind", "linear"))

    # ---- torch: what WeightAdapterMethod asks -------------------------------
    def select(self, model: Any, config: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's selection: ``target_modules``; for a list of names also ``layers_to_transform`` (under
        ``layers_pattern``). PEFT ignores the layer fields when ``target_modules`` is a regex; so does this."""
        from adapterkit import select_modules

        targets = config["target_modules"]
        layers = config.get("layers_to_transform")
        regex = isinstance(targets, str) and targets != ALL_LINEAR
        selected = select_modules(model, targets, method=self.name)
        if layers is None or regex:
            return selected
        pattern = config.get("layers_pattern")
        kept = {p: m for p, m in selected.items() if layer_index(p, pattern) in layers}
        if not kept:
            raise UsageError("layers_to_transform leaves no module to adapt", location="$.method.config.layers_to_transform",
                             found=layers, hint="check the layer indices (and layers_pattern)", code="no_targets")
        return kept

    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_vectors

        return new_vectors(layer, config)

    def new_dropout(self, config: Mapping[str, Any], target: Mapping[str, Any]) -> Any:
        if not config.get("vera_dropout"):
            return None
        from torch import nn

        return nn.Dropout(p=float(config["vera_dropout"]))

    def new_shared(self, model: Any, config: Mapping[str, Any], targets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        from .layer import projections

        (r, max_in), (max_out, _) = projection_shapes(targets, int(config["r"]))
        shared_a, shared_b = projections(r, max_in, max_out, int(config["projection_prng_key"]))
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            shared_a, shared_b = shared_a.to(device), shared_b.to(device)
        return {SHARED_A: shared_a, SHARED_B: shared_b}
