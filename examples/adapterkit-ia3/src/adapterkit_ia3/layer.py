"""The torch side of (IA)^3: a wrapper module that keeps the original as ``base_layer`` and holds one
vector per adapter name (imported only when a model is touched)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adapterkit import BaseModelError, UsageError, attached

from .method import in_out, matches


def describe(module: nn.Module) -> tuple[str, list[int]] | None:
    """("linear", [out, in]) or ("conv1d", [in, out]) for the modules (IA)^3 adapts, else None."""
    if isinstance(module, nn.Linear):
        return "linear", list(module.weight.shape)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d", list(module.weight.shape)  # transformers' Conv1D: weight [in, out]
    return None


class Ia3Layer(nn.Module):
    """``base_layer`` with (IA)^3 vectors: output-scaled (``feedforward`` False) or input-scaled."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        found = describe(base_layer)
        if found is None:
            raise UsageError(f"(IA)^3 adapts linear and Conv1D modules, not {type(base_layer).__name__}",
                             code="unsupported_module")
        self.base_layer = base_layer
        self.kind, self.shape = found
        self.in_features, self.out_features = in_out(self.kind, self.shape)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.merged: list[str] = []
        #: per merged adapter: the exact base weight and bias before it was folded in
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.enabled = True

    def add_adapter(self, name: str, feedforward: bool) -> None:
        size = self.in_features if feedforward else self.out_features
        weight = self.base_layer.weight
        self.ia3_l[name] = nn.Parameter(torch.ones(size, device=weight.device, dtype=torch.float32))
        self.feedforward[name] = bool(feedforward)

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scale_in = scale_out = None
        if not self.enabled:
            return None, None
        for name, vector in self.ia3_l.items():
            if name in self.merged:
                continue
            if self.feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale_in, scale_out = self._scales()
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    # ---- merge: exact unmerge by restoring saved copies ------------------------
    def _axis(self, name: str) -> int:
        output_axis = 0 if self.kind == "linear" else 1
        return 1 - output_axis if self.feedforward[name] else output_axis

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        self._saved[name] = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        with torch.no_grad():
            vector = self.ia3_l[name].detach().float()
            shaped = vector[:, None] if self._axis(name) == 0 else vector[None, :]
            weight.copy_((weight.float() * shaped).to(weight.dtype))
            if bias is not None and not self.feedforward[name]:
                bias.copy_((bias.float() * vector).to(bias.dtype))
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        redo = []
        while self.merged:  # undo later merges first: the saved copies are exact
            last = self.merged.pop()
            weight, bias = self._saved.pop(last)
            with torch.no_grad():
                self.base_layer.weight.copy_(weight)
                if bias is not None:
                    self.base_layer.bias.copy_(bias)
            if last == name:
                break
            redo.append(last)
        for other in reversed(redo):  # adapters merged after ``name`` stay merged
            self.merge(other)


def ia3_layers(model: nn.Module) -> list[tuple[str, Ia3Layer]]:
    return [(path, module) for path, module in model.named_modules() if isinstance(module, Ia3Layer)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def wrap(model: nn.Module, path: str) -> Ia3Layer:
    module = model.get_submodule(path)
    if isinstance(module, Ia3Layer):
        return module
    wrapper = Ia3Layer(module)
    replace_module(model, path, wrapper)
    return wrapper


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, Ia3Layer) else module


def _entry(module: nn.Module, feedforward: bool) -> dict[str, Any]:
    kind, shape = describe(_base(module))  # type: ignore[misc]
    return {"kind": kind, "shape": shape, "feedforward": bool(feedforward),
            "bias": getattr(_base(module), "bias", None) is not None}


def plan_from_config(model: nn.Module, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    plan, stray = {}, []
    for path, module in model.named_modules():
        if not path or path.endswith(".base_layer") or ".base_layer." in path or describe(_base(module)) is None:
            continue
        feedforward = matches(config["feedforward_modules"], path)
        if matches(config["target_modules"], path):
            plan[path] = _entry(module, feedforward)
        elif feedforward:
            stray.append(path)
    if not plan:
        raise UsageError("no linear or Conv1D module matches target_modules", location="$.method.config.target_modules",
                         found=config["target_modules"], hint="name modules of this model (e.g. k_proj, v_proj, down_proj)",
                         code="no_targets")
    if stray:
        raise UsageError("feedforward_modules must be a subset of target_modules", found=stray[:3],
                         location="$.method.config.feedforward_modules", code="bad_option")
    return plan


def plan_from_targets(model: nn.Module, targets: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check every recorded target against the model before anything is wrapped."""
    hint = "apply the adapter to the base model it was made for"
    plan = {}
    for path, target in targets.items():
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            module = None
        if module is None:
            raise BaseModelError(f"module {path} not found in the model", location=path, hint=hint, code="missing_module")
        found = describe(_base(module))
        if found is None or found[0] != target.get("kind", found[0]):
            raise BaseModelError(f"module {path} is not of the recorded kind", location=path, expected=target.get("kind"),
                                 found=found[0] if found else type(_base(module)).__name__, hint=hint, code="kind_mismatch")
        if found[1] != list(target["shape"]):
            raise BaseModelError(f"module {path}: base weight shape differs from the adapter's", location=path,
                                 expected=list(target["shape"]), found=found[1], hint=hint, code="shape_mismatch")
        plan[path] = {**_entry(module, bool(target.get("feedforward"))), **dict(target)}
    if not plan:
        raise UsageError("the adapter has no targets", code="no_targets")
    return plan


def freeze_base(model: nn.Module) -> None:
    """Freeze everything but the parameters of adapters already in the model (any method)."""
    keep = {id(p) for _, w in ia3_layers(model) for p in w.ia3_l.values()}
    for injected in attached(model).values():
        keep.update(id(p) for p in injected.parameters())
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
