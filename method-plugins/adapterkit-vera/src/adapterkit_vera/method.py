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

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    DeltaWeight, Factors, LowRank, Method, UsageError, WeightAdapterMethod, check_layers, check_selection,
    config_error, in_out_features, is_int, is_number,
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
    if not (is_int(out["r"]) and out["r"] >= 1):
        raise config_error("r", "r must be an integer >= 1", out["r"], "e.g. r=256 (VeRA takes larger ranks than LoRA)")
    out["r"] = int(out["r"])
    out["target_modules"] = check_selection("target_modules", out["target_modules"])
    key = out["projection_prng_key"]
    if not (is_int(key) and SEED_MIN <= key <= SEED_MAX):
        raise config_error("projection_prng_key", "projection_prng_key must be an integer torch.manual_seed takes", key,
                           "e.g. 0")
    out["projection_prng_key"] = int(key)
    for name in ("save_projection", "init_weights"):
        if not isinstance(out[name], bool):
            raise config_error(name, f"{name} must be true or false", out[name], f"{name}=true")
    dropout = out["vera_dropout"]
    if not (is_number(dropout) and 0 <= dropout < 1):
        raise config_error("vera_dropout", "vera_dropout must be a number in [0, 1)", dropout, "e.g. 0.05")
    if not is_number(out["d_initial"]):
        raise config_error("d_initial", "d_initial must be a finite number", out["d_initial"], "e.g. 0.1 (PEFT's default)")
    out["layers_to_transform"], out["layers_pattern"] = check_layers(out["layers_to_transform"], out["layers_pattern"])
    return out


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
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
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
