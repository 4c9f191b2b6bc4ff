"""LoRA as an adapterkit :class:`Method`: config, targets, tensors, and the torch life cycle.

Canonical tensors per adapted module ``m``: ``m.lora.A`` ``[r, in]`` and
``m.lora.B`` ``[out, r]``; the weight changes by ``scale * B @ A`` (transposed
for GPT-2's Conv1D, whose weight is stored ``[in, out]``), with
``scale = alpha / r`` or ``alpha / sqrt(r)`` under rsLoRA.

This module imports no torch: the torch side lives in ``layer`` and
``targeting`` and is imported inside the methods that need it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterkit.core.errors import BaseModelError, LossyConversionError, TensorFileError, UsageError
from adapterkit.core.plugin.capabilities import (
    DeltaWeight, Factors, FromFactors, LowRank, Quantizable, RuntimeComposable,
)
from adapterkit.core.plugin.method import Method

from . import stacked
from .config import CONFIG_SCHEMA, DEFAULTS, TARGET_SCHEMA, validate_config
from .targeting import PARAMETER, in_out_features, module_hparams

if TYPE_CHECKING:  # pragma: no cover
    import torch

KINDS = ("linear", "conv1d")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _target_hparams(module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[int, float]:
    """(r, alpha) of a target: the recorded values, else the config's patterns and defaults."""
    r, alpha = module_hparams(module, {**DEFAULTS, **config})
    return int(target.get("r", r)), target.get("alpha", alpha)


class LoraFamily(Method):
    """What LoRA, DoRA and QLoRA share: the config, targets with per-module r and alpha, the wrapper layer.

    The capabilities differ (DoRA's update is not low rank), so each method subclasses
    its own: :class:`LoraMethod`, :class:`~.dora.DoraMethod`, :class:`~.qlora.QloraMethod`.
    """

    name = "lora"
    version = "1"
    #: the target kinds this method adapts (``parameter``: LoRA on a parameter itself, :mod:`.stacked`)
    kinds: tuple[str, ...] = KINDS

    # ---- torch-free ---------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_config(config)

    def target_schema(self) -> dict[str, Any]:
        return TARGET_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        r, _ = _target_hparams(module, target, config)
        if target.get("kind") == PARAMETER:
            a_shape, b_shape = stacked.factor_shapes(target, r)
            return {f"{module}.{self.name}.A": a_shape, f"{module}.{self.name}.B": b_shape}
        fan_in, fan_out = in_out_features(target.get("kind", "linear"), target["shape"])
        return {f"{module}.{self.name}.A": (r, fan_in), f"{module}.{self.name}.B": (fan_out, r)}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        problems = []
        kind, shape = target.get("kind"), target.get("shape")
        if kind not in self.kinds:
            problems.append(f"kind {kind!r} is not one {self.label} adapts; expected one of {list(self.kinds)}")
        if kind == PARAMETER:
            problems += stacked.check_target(target)
        elif not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            problems.append(f"shape {shape!r} is not a 2-d weight shape [d0, d1]")
        r, alpha = target.get("r"), target.get("alpha")
        if "r" in target and not (isinstance(r, (int, float)) and not isinstance(r, bool) and float(r).is_integer() and r >= 1):
            problems.append(f"r is {r!r}; the rank must be an integer >= 1")
        if "alpha" in target and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            problems.append(f"alpha is {alpha!r}; alpha must be a number > 0")
        return problems

    def scale(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> float:
        """The scale of one target under ``config``."""
        r, alpha = _target_hparams(module, target, config)
        return lora_scale(r, alpha, bool(config.get("use_rslora", False)))

    def factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                tensors: Mapping[str, np.ndarray]) -> Factors:
        """A, B and the scale of one module (``tensors`` keyed by param, ``A`` / ``B``)."""
        if stacked.is_stacked(target):
            raise LossyConversionError(stacked.not_low_rank(module, target), location=module,
                                       hint="merge it into the base (adapterkit merge) or keep it as PEFT / adapterkit",
                                       code="unsupported")
        a, b = self._a_b(module, tensors)
        return Factors(a, b, float(self.scale(module, target, config)))

    # ---- torch --------------------------------------------------------------
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        from .layer import LoraLayer, wrap

        config = self.resolve_config(config)
        _check_adapter_name(adapter_name)
        plan = _plan_from_targets(model, targets, config) if targets is not None else _plan_from_config(model, config)
        for path, (module, entry) in plan.items():
            existing = _existing_layer(module, entry)
            if existing is not None and adapter_name in existing.lora_A:
                raise UsageError(f"module {path} already holds a LoRA adapter named {adapter_name!r}",
                                 hint="inject under another name", code="duplicate_adapter")
        self.prepare_model(model, config, [p for p, (_, e) in plan.items() if e["kind"] != PARAMETER])
        keep_trainable = _adapter_parameter_ids(model)
        for param in model.parameters():
            if id(param) not in keep_trainable:
                param.requires_grad_(False)
        for path, (module, entry) in plan.items():
            if entry["kind"] == PARAMETER:
                from .param_layer import LoraParameter

                owner, param_name = module
                layer = LoraParameter.on(owner, param_name, entry.get("layout", stacked.OUT_IN))
            else:
                layer = wrap(model, path, model.get_submodule(path))
            r, alpha = entry["r"], entry["alpha"]
            scale = lora_scale(r, alpha, config["use_rslora"])
            layer.add_adapter(adapter_name, r, alpha, scale, config["dropout"], config["init"], method=self.name)
            for param in layer.adapter_params(adapter_name).values():
                param.requires_grad_(True)
        return {path: entry for path, (_, entry) in plan.items()}

    def prepare_model(self, model: torch.nn.Module, config: Mapping[str, Any], paths: list[str]) -> None:
        """Change the base before the adapters are added (QLoRA quantises it); LoRA leaves it alone."""

    def load_state(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        import torch

        params = self._named_params(model, adapter_name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise TensorFileError(
                f"{self.label} tensors do not match the injected adapter {adapter_name!r}: "
                f"{len(missing)} missing, {len(unexpected)} unexpected",
                expected={"missing": missing}, found={"unexpected": unexpected},
                hint=f"the tensors must be the canonical <module>.{self.name}.{{{','.join(self.params)}}} "
                     "of exactly the adapted modules",
                code="tensor_mismatch",
            )
        for key, param in params.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise TensorFileError(f"{self.label} tensor has the wrong shape", location=key, expected=list(param.shape),
                                      found=list(tensors[key].shape), code="tensor_shape")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
        for _, layer in self._layers_of(model, adapter_name):
            if adapter_name in layer.merged:
                layer.sync_weight()

    def extract_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return {key: param.detach().clone() for key, param in self._named_params(model, adapter_name).items()}

    def trainable_parameters(self, model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        return list(self._named_params(model, adapter_name).values())

    def set_enabled(self, model: torch.nn.Module, enabled: bool) -> None:
        from .layer import lora_layers

        for _, layer in lora_layers(model):
            if self.name in layer.method.values():
                layer.set_enabled(enabled, method=self.name)

    def merge(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        for _, layer in self._layers_of(model, adapter_name):
            layer.merge(adapter_name)

    def unmerge(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        for _, layer in self._layers_of(model, adapter_name):
            layer.unmerge(adapter_name)

    def unload(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put every base module back; merged adapters stay folded in (merge + unload = a merged model).

        The model's handles of this method (``adapterkit.core.runtime.inject.attached``) are dropped with the
        wrappers. A wrapper that also holds adapters of another LoRA-family method is refused, untouched.
        """
        from adapterkit import attached, detach

        from .layer import lora_layers, replace_module

        layers = [(path, layer) for path, layer in lora_layers(model) if self.name in layer.method.values()]
        for path, layer in layers:
            others = sorted({m for m in layer.method.values() if m != self.name})
            if others:
                raise UsageError(f"module {path} also holds {', '.join(others)} adapters; unload those first",
                                 location=path, code="mixed_adapters")
        for name in [name for name, injected in attached(model).items() if injected.method.name == self.name]:
            detach(model, name)
        for path, layer in layers:
            base = layer.release()
            if base is None:  # a parameter's parametrization, removed in place
                continue
            if path:
                replace_module(model, path, base)
            else:
                model = base
        return model

    # ---- torch helpers ------------------------------------------------------
    @property
    def label(self) -> str:
        return {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA"}.get(self.name, self.name)

    #: canonical param names of one adapted module
    params: tuple[str, ...] = ("A", "B")

    def _layers_of(self, model: torch.nn.Module, adapter_name: str) -> list[tuple[str, Any]]:
        from .layer import lora_layers

        layers = lora_layers(model, adapter_name)
        if not layers:
            raise UsageError(f"the model holds no {self.label} adapter named {adapter_name!r}", code="unknown_adapter")
        other = next((layer.method[adapter_name] for _, layer in layers if layer.method[adapter_name] != self.name), None)
        if other is not None:
            raise UsageError(f"adapter {adapter_name!r} is a {other} adapter, not {self.name}",
                             hint=f"use the {other} method's handle", code="unknown_adapter")
        return layers

    def _named_params(self, model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
        params = {}
        for path, layer in self._layers_of(model, adapter_name):
            for param_name, param in layer.adapter_params(adapter_name).items():
                params[f"{path}.{self.name}.{param_name}"] = param
        return params

    def _a_b(self, module: str, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A and B of ``module`` from tensors keyed canonically or by param name."""
        a = tensors.get(f"{module}.{self.name}.A", tensors.get("A"))
        b = tensors.get(f"{module}.{self.name}.B", tensors.get("B"))
        if a is None or b is None:
            raise TensorFileError(f"{self.label} tensors of {module} are missing", location=module,
                                  expected=[f"{module}.{self.name}.A", f"{module}.{self.name}.B"], found=sorted(tensors),
                                  code="missing_tensor")
        return a, b


class LoraMethod(LoraFamily, LowRank, DeltaWeight, FromFactors, RuntimeComposable, Quantizable):
    """Low-rank adaptation (Hu et al., 2021) of linear and Conv1D modules."""

    name = "lora"
    description = ("LoRA: low-rank update scale * B @ A of linear / Conv1D weights and of parameters "
                   "(mixture-of-experts expert tensors: one pair per expert) (mergeable)")
    kinds = (*KINDS, PARAMETER)
    composition_kinds = ("weighted_sum", "average")
    quantized_method = "qlora"

    def lora_factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> Factors:
        return self.factors(module, target, config, tensors)

    def stacked_factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                        tensors: Mapping[str, np.ndarray]) -> Factors | None:
        if not stacked.is_stacked(target):
            return None
        a, b = self._a_b(module, tensors)
        return Factors(a, b, float(self.scale(module, target, config)))

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 ``scale * B @ A`` in the stored weight's orientation (per expert for a stacked parameter)."""
        if stacked.is_stacked(target):
            a, b = self._a_b(module, tensors)
            return stacked.stacked_delta(a, b, self.scale(module, target, config), target.get("layout", "out_in"))
        return self.factors(module, target, config, tensors).delta(target.get("kind", "linear"))

    def from_factors(self, factors: Mapping[str, tuple[Mapping[str, Any], Factors]],
                     like: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]],
                                                                     dict[str, np.ndarray]]:
        """Each module as ``A`` and ``scale * B`` with alpha = r (scale 1): exact, whatever the source's scales.

        ``like`` (a source config): its selection (``target_modules``, ``layers_to_transform``) and
        ``dropout`` are kept when the modules are the ones it selected; otherwise ``target_modules``
        lists the module paths.
        """
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        for module, (target, f) in sorted(factors.items()):
            a = np.ascontiguousarray(np.asarray(f.a, dtype=np.float32))
            b = np.ascontiguousarray(np.asarray(f.b, dtype=np.float32) * np.float32(f.scale))
            r = int(a.shape[0])
            targets[module] = {"kind": target.get("kind", "linear"), "shape": [int(d) for d in target["shape"]],
                               "r": r, "alpha": r}
            tensors[f"{module}.{self.name}.A"], tensors[f"{module}.{self.name}.B"] = a, b
        ranks = collections.Counter(t["r"] for t in targets.values())
        r = ranks.most_common(1)[0][0]
        config: dict[str, Any] = {"r": r, "alpha": r, "target_modules": sorted(targets)}
        like = dict(like or {})
        if like.get("target_modules") not in (None, "all-linear"):
            config["target_modules"] = like["target_modules"]
            if like.get("layers_to_transform") is not None:
                config["layers_to_transform"] = like["layers_to_transform"]
            if not _selection_holds(config, targets):
                config = {"r": r, "alpha": r, "target_modules": sorted(targets)}
        if like.get("dropout"):
            config["dropout"] = like["dropout"]
        for key in self.carried_config:
            if key in like:
                config[key] = like[key]
        return self.minimal_config(self.resolve_config(config)), targets, tensors

    #: config fields ``from_factors`` keeps from the source (QLoRA's quantisation)
    carried_config: tuple[str, ...] = ()

    # ---- runtime composition ------------------------------------------------
    def composition_refusal(self, composition: Any) -> str | None:
        refusal = super().composition_refusal(composition)
        if refusal is None and composition.nested:
            return (f"method {self.name!r} runs one flat weighted_sum or average block of adapter names, "
                    f"not nested blocks ({composition!r}); compose the inner block into one adapter first")
        return refusal

    def activate_composition(self, model: torch.nn.Module, composition: Any) -> None:
        """Every LoRA-family layer runs ``base(x) + sum_i c_i * scale_i * B_i A_i x`` over the members it holds."""
        from .layer import lora_layers

        coefficients: dict[str, float] = {}
        for name, coefficient in zip(composition.children, composition.coefficients()):
            coefficients[name] = coefficients.get(name, 0.0) + coefficient
        for name in coefficients:
            self._layers_of(model, name)  # each member is an adapter of this method
        layers = lora_layers(model)
        merged = sorted({name for _, layer in layers for name in layer.merged})
        if merged:
            raise UsageError("merged adapters stay in the weights whatever the composition says", found=merged,
                             hint="unmerge them first", code="composition_active")
        for _, layer in layers:
            layer.composition = {name: c for name, c in coefficients.items() if name in layer.lora_A}

    def deactivate_composition(self, model: torch.nn.Module) -> None:
        from .layer import lora_layers

        for _, layer in lora_layers(model):
            layer.composition = None


# ---- torch helpers (called only from the torch methods above) ---------------

def _selection_holds(config: Mapping[str, Any], targets: Mapping[str, Any]) -> bool:
    """Whether every target is one the config's ``target_modules`` / ``layers_to_transform`` select."""
    from .targeting import layer_index, matches_target

    layers = config.get("layers_to_transform")
    return all(matches_target(m, config["target_modules"]) and (layers is None or layer_index(m) in layers)
               for m in targets)


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError("adapter name must be a non-empty string without '.'", found=name, code="bad_name")


def _existing_layer(module: Any, entry: Mapping[str, Any]) -> Any:
    """The LoRA wrapper already on a planned module or parameter, or None."""
    from .layer import LoraLayer

    if entry["kind"] != PARAMETER:
        return module if isinstance(module, LoraLayer) else None
    from torch.nn.utils import parametrize

    from .param_layer import LoraParameter

    owner, name = module
    if not parametrize.is_parametrized(owner, name):
        return None
    return next((p for p in owner.parametrizations[name] if isinstance(p, LoraParameter)), None)


def _parameter_entry(module: torch.nn.Module, name: str, index: int, shape: list[int], r: int,
                     alpha: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": PARAMETER, "shape": shape, "r": r, "alpha": alpha, "param_index": index}
    if len(shape) == 3:  # transformers marks experts applied as x @ W[e] (GPT-OSS) with is_transposed
        entry["layout"] = stacked.IN_OUT if getattr(module, "is_transposed", False) else stacked.OUT_IN
    return entry


def _plan_parameters(model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The parameters ``target_parameters`` selects (PEFT's rule: the path equals an entry or ends with
    ``"." + entry``), each with its rank, alpha, layout and position in its module."""
    from torch import nn

    from .param_layer import parameters_of
    from .targeting import layer_index

    wanted, layers = config.get("target_parameters") or [], config.get("layers_to_transform")
    plan: dict[str, tuple[Any, dict[str, Any]]] = {}
    if not wanted:
        return plan
    for path, module in model.named_modules():
        if isinstance(module, (nn.ParameterDict, nn.ModuleDict, nn.ModuleList)) or ".parametrizations" in f".{path}":
            continue
        for index, (name, param) in enumerate(parameters_of(module)):
            key = f"{path}.{name}" if path else name
            if not any(key == t or key.endswith("." + t) for t in wanted):
                continue
            if layers is not None and layer_index(key) not in layers:
                continue
            if param.dim() not in (2, 3):
                raise UsageError(f"target_parameters selects {key!r}, a {param.dim()}-d parameter; LoRA adapts 2-d "
                                 "[out, in] and 3-d [experts, d1, d2] parameters", location="$.method.config.target_parameters",
                                 found=key, code="bad_target")
            r, alpha = module_hparams(key, config)
            plan[key] = ((module, name), _parameter_entry(module, name, index, list(param.shape), r, alpha))
    if not plan:
        raise UsageError("target_parameters selects no parameter of the model", location="$.method.config.target_parameters",
                         found=wanted, hint='name parameters by their path suffix, e.g. ["mlp.experts.gate_up_proj"]',
                         code="no_targets")
    return plan


def _plan_from_config(model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    from .layer import LoraLayer, describe
    from .targeting import select_modules

    plan = _plan_parameters(model, config)
    try:
        modules = select_modules(model, config)
    except UsageError as exc:
        if not plan or exc.code != "no_targets":
            raise
        modules = {}
    for path, module in modules.items():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind, shape = describe(base)  # select_modules let only linear / Conv1D modules through
        r, alpha = module_hparams(path, config)
        plan[path] = (module, {"kind": kind, "shape": shape, "r": r, "alpha": alpha})
    return plan


def _plan_from_targets(model: torch.nn.Module, targets: Mapping[str, Mapping[str, Any]],
                       config: Mapping[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Check every recorded target against the model before anything is wrapped."""
    from .layer import LoraLayer, describe

    hint = "apply the adapter to the base model it was made for"
    plan = {}
    for path, target in targets.items():
        if target.get("kind") == PARAMETER:
            plan[path] = _parameter_from_target(model, path, target, config, hint)
            continue
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            module = None
        if module is None:
            raise BaseModelError(f"module {path} not found in the model", location=path, hint=hint, code="missing_module")
        base = module.base_layer if isinstance(module, LoraLayer) else module
        found = describe(base)
        kind = found[0] if found else None
        if kind is None or kind != target.get("kind", kind):
            raise BaseModelError(f"module {path} is not of the recorded kind", location=path,
                                 expected=target.get("kind"), found=kind or type(base).__name__, hint=hint, code="kind_mismatch")
        shape = found[1]
        if shape != list(target["shape"]):
            raise BaseModelError(f"module {path}: base weight shape differs from the adapter's", location=path,
                                 expected=list(target["shape"]), found=shape, hint=hint, code="shape_mismatch")
        r, alpha = _target_hparams(path, target, config)
        plan[path] = (module, {"kind": kind, "shape": shape, "r": r, "alpha": alpha})
    if not plan:
        raise UsageError("the adapter has no targets", code="no_targets")
    return plan


def _parameter_from_target(model: torch.nn.Module, path: str, target: Mapping[str, Any], config: Mapping[str, Any],
                           hint: str) -> tuple[Any, dict[str, Any]]:
    """A recorded ``parameter`` target checked against the live model."""
    from .param_layer import parameters_of

    owner_path, _, name = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        owner = None
    params = dict(parameters_of(owner)) if owner is not None else {}
    if name not in params:
        raise BaseModelError(f"parameter {path} not found in the model", location=path, hint=hint, code="missing_module")
    shape = list(params[name].shape)
    if shape != list(target["shape"]):
        raise BaseModelError(f"parameter {path}: shape differs from the adapter's", location=path,
                             expected=list(target["shape"]), found=shape, hint=hint, code="shape_mismatch")
    r, alpha = _target_hparams(path, target, config)
    entry = {k: v for k, v in target.items() if k in ("kind", "shape", "layout", "param_index")}
    return (owner, name), {**entry, "shape": shape, "r": r, "alpha": alpha}


def _adapter_parameter_ids(model: torch.nn.Module) -> set[int]:
    """Parameters of adapters already in the model (any method): injection leaves them as they are."""
    from adapterkit import attached

    from .layer import lora_layers

    ids = {id(p) for _, layer in lora_layers(model) for name in layer.lora_A for p in layer.adapter_params(name).values()}
    for injected in attached(model).values():
        ids.update(id(p) for p in injected.parameters())
    return ids
