"""(IA)^3 as an adapterkit :class:`~adapterkit.Method` (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

One learned vector ``l`` per adapted linear / Conv1D module, initialised to ones:

- an ordinary target (keys, values) scales its **output**: ``y = l * (W x + b)``, ``l`` has ``out`` entries;
- a *feed-forward* target scales its **input**: ``y = W (l * x) + b``, ``l`` has ``in`` entries.

Canonical tensor per target ``m``: ``m.ia3.l``, 1-d. Merging is exact up to float
rounding: the rows (output) or columns (input) of the stored weight are multiplied
by ``l`` (transposed for GPT-2's Conv1D, stored ``[in, out]``), and an output-scaled
module's bias is multiplied too. This module imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Composable, MergedBias, MergedWeight, Method, TensorFileError, UsageError,
)

KINDS = ("linear", "conv1d")
PARAM = "l"

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "uniqueItems": True}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "target_modules": {
            "description": "Modules to adapt: a list of names (a module matches its full path or a path ending "
                           "in '.<name>') or a regular expression matched against the whole path.",
            "oneOf": [_NAMES, {"type": "string", "minLength": 1}],
        },
        "feedforward_modules": {
            "description": "Targets whose input (not output) is scaled, same matching rules; default none.",
            "oneOf": [{**_NAMES, "minItems": 0}, {"type": "string", "minLength": 1}],
        },
    },
    "required": ["target_modules"],
}
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": list(KINDS)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "feedforward": {"type": "boolean", "description": "true: the input is scaled; false: the output"},
        "bias": {"type": "boolean", "description": "whether the base module has a bias (an output scale scales it)"},
    },
    "required": ["feedforward"],
}


def matches(rule: Any, path: str) -> bool:
    """PEFT's selection rule: a list matches a path equal to a name or ending in ``.<name>``; a string is a
    regular expression that must match the whole path."""
    if not rule:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in rule)


def in_out(kind: str, shape: Any) -> tuple[int, int]:
    """(in, out) features of a stored weight: linear ``[out, in]``, Conv1D ``[in, out]``."""
    d0, d1 = (int(d) for d in shape)
    return (d1, d0) if kind == "linear" else (d0, d1)


def vector_size(target: Mapping[str, Any]) -> int:
    fan_in, fan_out = in_out(target.get("kind", "linear"), target["shape"])
    return fan_in if target.get("feedforward") else fan_out


def scaled_axis(target: Mapping[str, Any]) -> int:
    """The axis of the stored weight that ``l`` multiplies (0: rows, 1: columns)."""
    output_axis = 0 if target.get("kind", "linear") == "linear" else 1
    return 1 - output_axis if target.get("feedforward") else output_axis


def _union(rules: list[Any], paths: list[str]) -> Any:
    """The selection rule of a composed adapter, as PEFT builds it: lists joined, regular expressions
    or-ed; when the adapters mix the two, the explicit module ``paths``."""
    if all(isinstance(r, list) for r in rules):
        return sorted({name for r in rules for name in r})
    if all(isinstance(r, str) for r in rules):
        return rules[0] if len(set(rules)) == 1 else "|".join(f"({r})" for r in rules)
    return paths


class Ia3Method(Method, MergedWeight, MergedBias, Composable):
    """(IA)^3: learned rescaling of keys, values and feed-forward activations (mergeable)."""

    name = "ia3"
    version = "1"
    description = "(IA)^3: learned scaling vectors on outputs (k, v) or inputs (feed-forward) of linear / Conv1D modules (mergeable)"
    compose_strategies = ("linear",)

    # ---- torch-free ---------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {"feedforward_modules": []}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = {**self.default_config(), **config}
        unknown = sorted(set(config) - set(CONFIG_SCHEMA["properties"]))
        if unknown:
            raise UsageError(f"unknown ia3 option {unknown[0]!r}", location=f"$.method.config.{unknown[0]}",
                             expected=sorted(CONFIG_SCHEMA["properties"]), hint="check the spelling", code="bad_option")
        for key in ("target_modules", "feedforward_modules"):
            value = config.get(key)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise UsageError(f"{key} is not a valid regular expression: {exc}",
                                     location=f"$.method.config.{key}", found=value, code="bad_option") from None
            elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise UsageError(f"{key} must be a list of module names or a regular expression",
                                 location=f"$.method.config.{key}", found=value,
                                 hint='e.g. ["k_proj", "v_proj", "down_proj"]', code="bad_option")
        if not config["target_modules"]:
            raise UsageError("target_modules is empty", location="$.method.config.target_modules",
                             hint='name the modules to adapt, e.g. ["k_proj", "v_proj", "down_proj"]', code="bad_option")
        return config

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {f"{module}.{self.name}.{PARAM}": (vector_size(target),)}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        if target.get("kind") not in KINDS:
            problems.append(f"kind {target.get('kind')!r} is not one (IA)^3 adapts; expected one of {list(KINDS)}")
        shape = target.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape [d0, d1]")
        if not isinstance(target.get("feedforward"), bool):
            problems.append("feedforward must be true (input scaled) or false (output scaled)")
        return problems

    def merged_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], base_weight: np.ndarray) -> np.ndarray:
        """The stored weight with its rows or columns multiplied by ``l`` (float32), for ``adapterkit merge``.

        An output-scaled module's bias is scaled by :meth:`merged_bias`.
        """
        vector = self._vector(module, tensors).astype(np.float32)
        weight = np.asarray(base_weight, dtype=np.float32)
        if weight.shape != tuple(target["shape"]) or vector.shape != (weight.shape[scaled_axis(target)],):
            raise BaseModelError(f"{module}: base weight {list(weight.shape)} does not fit the (IA)^3 vector "
                                 f"{list(vector.shape)}", location=module, code="shape_mismatch")
        return weight * (vector[:, None] if scaled_axis(target) == 0 else vector[None, :])

    def merged_bias(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                    tensors: Mapping[str, np.ndarray], base_bias: np.ndarray) -> np.ndarray:
        """The stored bias for ``adapterkit merge``: ``l * b`` when the output is scaled, else unchanged."""
        bias = np.asarray(base_bias, dtype=np.float32)
        if target.get("feedforward"):
            return bias  # the input is scaled: W (l * x) + b leaves b alone
        vector = self._vector(module, tensors).astype(np.float32)
        if bias.shape != vector.shape:
            raise BaseModelError(f"{module}: base bias {list(bias.shape)} does not fit the (IA)^3 vector "
                                 f"{list(vector.shape)}", location=module, code="shape_mismatch")
        return bias * vector

    def compose(self, adapters: Sequence[Adapter], weights: Sequence[float], strategy: str,
                options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
        """``linear``: ``l = sum_i w_i * l_i`` per module, over the union of the adapters' modules, a module
        an adapter lacks counting as zero: PEFT's ``IA3Model.add_weighted_adapter``, to the bit."""
        if options:
            raise UsageError(f"(IA)^3's {strategy} strategy takes only weights", found=sorted(options),
                             hint="leave out --density, --rank and --seed", code="bad_option")
        targets: dict[str, dict[str, Any]] = {}
        sums: dict[str, np.ndarray] = {}
        for adapter, weight in zip(adapters, weights, strict=True):
            for module, target in sorted(adapter.targets.items()):
                first = targets.setdefault(module, dict(target))
                if bool(first.get("feedforward")) != bool(target.get("feedforward")):
                    raise UsageError(f"{module} scales its input in one adapter and its output in another",
                                     location=module, hint="compose adapters with the same feedforward_modules",
                                     code="feedforward_mismatch")
                vector = self._vector(module, adapter.tensors).astype(np.float32)
                key = f"{module}.{self.name}.{PARAM}"
                sums[key] = sums.get(key, np.zeros_like(vector)) + vector * np.float32(weight)
        config = {"target_modules": _union([a.config.get("target_modules") for a in adapters],
                                           sorted(targets)),
                  "feedforward_modules": _union([a.config.get("feedforward_modules", []) for a in adapters],
                                                sorted(m for m, t in targets.items() if t.get("feedforward")))}
        return self.minimal_config(config), targets, sums

    def _vector(self, module: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        value = tensors.get(f"{module}.{self.name}.{PARAM}", tensors.get(PARAM))
        if value is None:
            raise TensorFileError(f"(IA)^3 tensor of {module} is missing", location=module,
                                  expected=[f"{module}.{self.name}.{PARAM}"], found=sorted(tensors), code="missing_tensor")
        return np.asarray(value)

    # ---- torch (adapterkit_ia3.layer imports torch) ---------------------------
    def inject(self, model: Any, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        from . import layer

        config = self.resolve_config(config)
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise UsageError("adapter name must be a non-empty string without '.'", found=adapter_name, code="bad_name")
        plan = layer.plan_from_targets(model, targets) if targets is not None else layer.plan_from_config(model, config)
        for path, entry in plan.items():
            module = model.get_submodule(path)
            if isinstance(module, layer.Ia3Layer) and adapter_name in module.ia3_l:
                raise UsageError(f"module {path} already holds an (IA)^3 adapter named {adapter_name!r}",
                                 hint="inject under another name", code="duplicate_adapter")
        layer.freeze_base(model)
        for path, entry in plan.items():
            wrapper = layer.wrap(model, path)
            wrapper.add_adapter(adapter_name, entry["feedforward"])
        return plan

    def load_state(self, model: Any, tensors: Mapping[str, Any], adapter_name: str = "default") -> None:
        import torch

        params = self._named_params(model, adapter_name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise TensorFileError(f"(IA)^3 tensors do not match the injected adapter {adapter_name!r}: "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected",
                                  expected={"missing": missing}, found={"unexpected": unexpected},
                                  hint="the tensors must be the canonical <module>.ia3.l of exactly the adapted modules",
                                  code="tensor_mismatch")
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise TensorFileError("(IA)^3 tensor has the wrong shape", location=key, expected=list(param.shape),
                                      found=list(tensors[key].shape), code="tensor_shape")
        layers = self._layers_of(model, adapter_name)
        merged = [w for _, w in layers if adapter_name in w.merged]
        for wrapper in merged:
            wrapper.unmerge(adapter_name)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(torch.as_tensor(tensors[key]).to(device=param.device, dtype=param.dtype))
        for wrapper in merged:
            wrapper.merge(adapter_name)

    def extract_state(self, model: Any, adapter_name: str = "default") -> dict[str, Any]:
        return {key: param.detach().clone() for key, param in self._named_params(model, adapter_name).items()}

    def trainable_parameters(self, model: Any, adapter_name: str = "default") -> list[Any]:
        return list(self._named_params(model, adapter_name).values())

    def set_enabled(self, model: Any, enabled: bool) -> None:
        from .layer import ia3_layers

        for path, wrapper in ia3_layers(model):
            if not enabled and wrapper.merged:
                raise UsageError(f"module {path} holds a merged (IA)^3 adapter; unmerge it before disabling",
                                 location=path, code="merged_adapter")
        for _, wrapper in ia3_layers(model):
            wrapper.enabled = bool(enabled)

    def merge(self, model: Any, adapter_name: str = "default") -> None:
        for _, wrapper in self._layers_of(model, adapter_name):
            wrapper.merge(adapter_name)

    def unmerge(self, model: Any, adapter_name: str = "default") -> None:
        for _, wrapper in self._layers_of(model, adapter_name):
            wrapper.unmerge(adapter_name)

    def unload(self, model: Any) -> Any:
        """Put every base module back; merged adapters stay folded in (merge + unload = a merged model)."""
        from .layer import ia3_layers, replace_module

        for path, wrapper in ia3_layers(model):
            if path:
                replace_module(model, path, wrapper.base_layer)
            else:
                model = wrapper.base_layer
        return model

    # ---- helpers --------------------------------------------------------------
    def _layers_of(self, model: Any, adapter_name: str) -> list[tuple[str, Any]]:
        from .layer import ia3_layers

        layers = [(path, w) for path, w in ia3_layers(model) if adapter_name in w.ia3_l]
        if not layers:
            raise UsageError(f"the model holds no (IA)^3 adapter named {adapter_name!r}", code="unknown_adapter")
        return layers

    def _named_params(self, model: Any, adapter_name: str) -> dict[str, Any]:
        return {f"{path}.{self.name}.{PARAM}": w.ia3_l[adapter_name] for path, w in self._layers_of(model, adapter_name)}
