"""AdaLoRA as an adapterkit :class:`~adapterkit.Method` (Zhang et al. 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning"), following PEFT 0.21.2's ``peft/tuners/adalora``.

Each adapted linear / Conv1D module holds an update in SVD form::

    A = P  [r, in]     (right singular vectors)       canonical key <module>.adalora.A
    E      [r, 1]      (singular values)               canonical key <module>.adalora.E
    B = Q  [out, r]    (left singular vectors)         canonical key <module>.adalora.B

    delta W = B @ (A * E) * scaling / (ranknum + 1e-5)      ([out, in]; transposed for Conv1D)

with ``scaling = lora_alpha if lora_alpha > 0 else r`` (PEFT's ``AdaLoraLayer.update_layer``) and ``ranknum``
the non-trainable rank PEFT divides by: the module's rank when created, ``init_r``, which PEFT keeps when it
resizes a module to a pruned rank (``AdaLoraModel.resize_modules_by_rank_pattern``). ``r`` is recorded per target:
after budget pruning it differs per module; a module pruned to rank 0 adds nothing and is no target (its
``rank_pattern`` mask, all false, stays in the config, so that PEFT loads a written folder alike).

Training (:class:`adapterkit.TrainingHooks`): the loss gets ``orth_reg_weight`` times PEFT's orthogonality
penalty (``AdaLoraModel.forward``), and after each optimizer step the rank budget schedule of PEFT's
``RankAllocator.update_and_allocate`` runs (sensitivity EMAs, cubic budget, masking singular values to zero).
A trained adapter keeps ``init_r``-sized tensors with the pruned singular values at zero (exactly PEFT's live
model); the ``rank_pattern`` of boolean lists (PEFT's form) is what a saved PEFT folder resized its tensors by.

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    DeltaWeight, Factors, LowRank, Method, TensorFileError, TrainingHooks, UsageError, WeightAdapterMethod,
    check_layers, check_selection, in_out_features, is_int, is_number,
)

KINDS = ("linear", "conv1d")
PARAMS = ("A", "E", "B")

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_INT0 = {"type": "integer", "minimum": 0}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "target_modules": {"description": "Modules to adapt: names (a module matches its full path or a path "
                                          "ending in '.<name>') or a regular expression matched against the whole path.",
                           "oneOf": [_NAMES, {"type": "string", "minLength": 1}]},
        "exclude_modules": {"description": "Modules not to adapt (same matching rules).",
                            "oneOf": [{"type": "null"}, {**_NAMES, "minItems": 0}, {"type": "string", "minLength": 1}]},
        "layers_to_transform": {"description": "Only these layer indices (PEFT's rule).",
                                "oneOf": [{"type": "null"}, _INT0, {"type": "array", "items": _INT0, "minItems": 1}]},
        "layers_pattern": {"description": "The name of the layer list for layers_to_transform.",
                           "oneOf": [{"type": "null"}, {"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "init_r": {"type": "integer", "minimum": 1, "description": "Initial rank of every module (PEFT init_r)."},
        "target_r": {**_INT0, "description": "Average rank per module after the budget schedule (PEFT target_r)."},
        "lora_alpha": {"type": "number", "description": "scaling = lora_alpha (or r when lora_alpha <= 0)."},
        "lora_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "tinit": {**_INT0, "description": "Warm-up steps before the budget starts to fall."},
        "tfinal": {**_INT0, "description": "Final steps at the target budget (the pattern stays fixed)."},
        "deltaT": {"type": "integer", "minimum": 1, "description": "Steps between two budget allocations."},
        "beta1": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "description": "EMA of sensitivity."},
        "beta2": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "description": "EMA of uncertainty."},
        "orth_reg_weight": {"type": "number", "minimum": 0, "description": "Weight of the orthogonality penalty."},
        "total_step": {"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 1}],
                       "description": "Steps of the budget schedule (PEFT requires it; null: the trainer's steps)."},
        "rank_pattern": {"description": "PEFT's pruned ranks: '<module>.lora_E' -> one boolean per initial rank.",
                         "oneOf": [{"type": "null"}, {"type": "object", "additionalProperties":
                                                      {"type": "array", "items": {"type": "boolean"}}}]},
        "init_lora_weights": {"type": "boolean", "description": "true: E = 0, A and B ~ N(0, 0.02); false: all N(0, 1)."},
    },
    "required": ["target_modules"],
}
DEFAULTS: dict[str, Any] = {
    "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "init_r": 12, "target_r": 8,
    "lora_alpha": 8, "lora_dropout": 0.0, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
    "orth_reg_weight": 0.5, "total_step": None, "rank_pattern": None, "init_lora_weights": True,
}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": list(KINDS)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "r": {"type": "integer", "minimum": 1, "description": "the module's rank (after pruning; a module pruned "
                                                       "to 0 is no target)"},
    },
    "required": ["r"],
}


def _bad(field: str, message: str, found: Any, hint: str | None = None) -> UsageError:
    return UsageError(f"{field} {message}", location=f"$.method.config.{field}", found=found, hint=hint,
                      code="bad_option")


def pattern_key(module: str) -> str:
    """The key of ``module`` in PEFT's AdaLoRA ``rank_pattern`` (adapter name stripped): ``<module>.lora_E``."""
    return f"{module}.lora_E"


def pattern_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank PEFT gives ``module``: the kept entries of its ``rank_pattern`` mask, else ``init_r``."""
    mask = (config.get("rank_pattern") or {}).get(pattern_key(module))
    return int(sum(bool(v) for v in mask)) if mask is not None else int(config["init_r"])


def ranknum(config: Mapping[str, Any]) -> float:
    """PEFT's divisor ``ranknum + 1e-5`` in float32, ``ranknum`` being ``init_r`` (kept when a module is resized)."""
    return float(np.float32(config["init_r"]) + np.float32(1e-5))


def scale(config: Mapping[str, Any], r: int) -> float:
    """``scaling / (ranknum + 1e-5)``: PEFT's ``SVDLinear.forward`` and ``get_delta_weight``."""
    alpha = config["lora_alpha"]
    scaling = float(alpha) if alpha > 0 else float(r)
    return scaling / ranknum(config)


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config, normalised, if it keeps every rule (PEFT's ``AdaLoraConfig.__post_init__`` and
    ``RankAllocator``); else a UsageError naming the field."""
    unknown = sorted(set(config) - set(CONFIG_SCHEMA["properties"]))
    if unknown:
        raise UsageError(f"unknown adalora option {unknown[0]!r}", location=f"$.method.config.{unknown[0]}",
                         expected=sorted(CONFIG_SCHEMA["properties"]), hint="check the spelling (PEFT's field names)",
                         code="bad_option")
    config = dict(config)
    rule = config["target_modules"] = check_selection("target_modules", config.get("target_modules"))
    config["exclude_modules"] = check_selection("exclude_modules", config.get("exclude_modules") or None, nullable=True)
    layers, config["layers_pattern"] = check_layers(config.get("layers_to_transform"), config.get("layers_pattern"))
    config["layers_to_transform"] = layers
    if layers is not None and isinstance(rule, str):
        raise _bad("layers_to_transform", "cannot be used when target_modules is a regular expression", layers,
                   "PEFT refuses it too: name the modules, or put the layers into the expression")
    for field, minimum in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
        value = config.get(field)
        if not (is_int(value) and value >= minimum):
            raise _bad(field, f"must be an integer >= {minimum}", value)
        config[field] = int(value)
    for field in ("lora_alpha", "lora_dropout", "beta1", "beta2", "orth_reg_weight"):
        if not is_number(config.get(field)):
            raise _bad(field, "must be a finite number", config.get(field))
    if not 0 <= config["lora_dropout"] < 1:
        raise _bad("lora_dropout", "must be in [0, 1)", config["lora_dropout"])
    for field in ("beta1", "beta2"):
        if not 0 < config[field] < 1:
            raise _bad(field, "must be in (0, 1) (PEFT's RankAllocator asserts it)", config[field])
    if config["orth_reg_weight"] < 0:
        raise _bad("orth_reg_weight", "must be >= 0", config["orth_reg_weight"])
    total = config.get("total_step")
    if total is not None:
        if not (is_int(total) and total >= 1):
            raise _bad("total_step", "must be null or an integer >= 1", total)
        config["total_step"] = total = int(total)
        if config["tinit"] >= total - config["tfinal"]:
            raise _bad("total_step", f"leaves no budgeting phase: tinit ({config['tinit']}) must be below total_step - "
                       f"tfinal ({total - config['tfinal']})", total, "decrease tfinal / tinit or increase total_step")
    if not isinstance(config.get("init_lora_weights"), bool):
        raise _bad("init_lora_weights", "must be true or false", config.get("init_lora_weights"))
    ranks = config.get("rank_pattern")
    if ranks is not None:
        if not isinstance(ranks, Mapping):
            raise _bad("rank_pattern", "must be null or a map '<module>.lora_E' -> list of booleans", ranks)
        for key, mask in ranks.items():
            if not (isinstance(mask, list) and all(isinstance(v, bool) for v in mask) and len(mask) == config["init_r"]):
                raise UsageError(f"rank_pattern[{key!r}] must be a list of {config['init_r']} booleans (one per "
                                 "initial rank, PEFT's form)", location=f"$.method.config.rank_pattern.{key}",
                                 found=mask, code="bad_option")
    return config


class AdaLoraMethod(WeightAdapterMethod, Method, LowRank, DeltaWeight, TrainingHooks):
    """AdaLoRA: ``delta W = B (A * E) * scaling / (ranknum + 1e-5)`` per module, trained with PEFT's orthogonality
    penalty and rank budget schedule."""

    name = "adalora"
    version = "1"
    description = "AdaLoRA: SVD-form low-rank updates (P, Lambda, Q) with an adaptive rank budget (mergeable)"

    @property
    def layer_class(self) -> Any:
        from .layer import AdaLoraLayer

        return AdaLoraLayer

    # ---- torch-free -------------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return check_config({**self.default_config(), **config})

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def _rank(self, target: Mapping[str, Any], config: Mapping[str, Any]) -> int:
        r = target.get("r", config.get("init_r", DEFAULTS["init_r"]))
        return int(r) if is_int(r) else 0

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        r = self._rank(target, config)
        fan_in, fan_out = in_out_features(target.get("kind", "linear"), target["shape"])
        return {f"{module}.{self.name}.A": (r, fan_in), f"{module}.{self.name}.E": (r, 1),
                f"{module}.{self.name}.B": (fan_out, r)}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one AdaLoRA adapts here; expected one of {list(KINDS)}")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape")
        r = target.get("r")
        init_r = config.get("init_r", DEFAULTS["init_r"])
        if not (is_int(r) and r >= 1):
            problems.append(f"r must be an integer >= 1, not {r!r} (a module pruned to rank 0 adds nothing: leave "
                            "it out of targets)")
        elif is_int(init_r) and r > init_r:
            problems.append(f"r ({r}) is above init_r ({init_r}): AdaLoRA only prunes ranks")
        return problems

    def select(self, model: Any, config: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's selection minus the modules ``rank_pattern`` prunes to rank 0 (they would add nothing)."""
        return {path: module for path, module in super().select(model, config).items()
                if pattern_rank(config, path) > 0}

    def target_fields(self, module: str, kind: str, shape: list[int], config: Mapping[str, Any]) -> dict[str, Any]:
        return {"r": pattern_rank(config, module)}

    def _module_tensors(self, module: str, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        found = []
        for param in PARAMS:
            value = tensors.get(param, tensors.get(f"{module}.{self.name}.{param}"))
            if value is None:
                raise TensorFileError(f"AdaLoRA tensor {param} of {module} is missing", location=module,
                                      expected=[f"{module}.{self.name}.{p}" for p in PARAMS], found=sorted(tensors),
                                      code="missing_tensor")
            found.append(np.asarray(value, dtype=np.float32))
        return tuple(found)

    def lora_factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> Factors:
        """``a = E * A`` ``[r, in]``, ``b = B`` ``[out, r]``, ``scale = scaling / (ranknum + 1e-5)``; exact."""
        config = {**DEFAULTS, **config}
        a, e, b = self._module_tensors(module, tensors)
        return Factors(np.ascontiguousarray(a * e.reshape(-1, 1)), np.ascontiguousarray(b),
                       scale(config, self._rank(target, config)))

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """PEFT's ``SVDLinear.get_delta_weight`` in float32, in the stored orientation (transposed for Conv1D)."""
        return self.lora_factors(module, target, config, tensors).delta(target.get("kind", "linear"))

    # ---- torch: parameters ------------------------------------
    def new_parameters(self, layer: Any, config: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
        from .layer import new_parameters

        return new_parameters(layer, config, int(target["r"]))

    def new_dropout(self, config: Mapping[str, Any], target: Mapping[str, Any]) -> Any:
        import torch

        return torch.nn.Dropout(config["lora_dropout"]) if config["lora_dropout"] > 0 else None

    # ---- TrainingHooks (adapterkit_adalora.layer imports torch) ----------------------
    def training_loss(self, model: Any, adapter_name: str) -> Any:
        from .layer import orthogonal_penalty

        layers = self._layers_of(model, adapter_name)
        weight = layers[0][1].config[adapter_name]["orth_reg_weight"]
        return orthogonal_penalty([layer for _, layer in layers], adapter_name) * weight

    def after_step(self, model: Any, adapter_name: str, step: int, total_steps: int) -> None:
        from .layer import update_and_allocate

        layers = self._layers_of(model, adapter_name)
        config = layers[0][1].config[adapter_name]
        if config.get("total_step") is None:  # the schedule runs over the trainer's steps: record them
            for _, layer in layers:
                layer.config[adapter_name]["total_step"] = int(total_steps)
            handle = _handle(model, adapter_name)
            if handle is not None and isinstance(getattr(handle, "config", None), dict):
                handle.config["total_step"] = int(total_steps)
            config = layers[0][1].config[adapter_name]
        update_and_allocate(layers, adapter_name, config, step)

    def training_state(self, model: Any, adapter_name: str) -> dict[str, Any]:
        from .layer import allocator_state

        return allocator_state(self._layers_of(model, adapter_name), adapter_name)

    def load_training_state(self, model: Any, adapter_name: str, state: dict[str, Any]) -> None:
        from .layer import load_allocator_state

        layers = self._layers_of(model, adapter_name)
        if state.get("total_step") is not None:
            for _, layer in layers:
                layer.config[adapter_name]["total_step"] = int(state["total_step"])
            handle = _handle(model, adapter_name)
            if handle is not None and isinstance(getattr(handle, "config", None), dict):
                handle.config["total_step"] = int(state["total_step"])
        load_allocator_state(layers, adapter_name, state)


def _handle(model: Any, adapter_name: str) -> Any:
    import adapterkit

    return adapterkit.attached(model).get(adapter_name)
