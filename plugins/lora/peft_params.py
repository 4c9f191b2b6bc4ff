"""PEFT ``target_parameters`` (``lora.ParamWrapper``) in and out of ``parameter`` targets (:mod:`.stacked`).

PEFT keys a parameter's LoRA by its *module*: the last-registered targeted parameter of a module is
``<module>.lora_A.weight``, the one before ``<module>.base_layer.lora_A.weight``, and so on. The file
records neither the number of experts, nor the parameters' order, nor their orientation, so reading
needs the base model (its parameters in registration order and each experts module's
``is_transposed``); the adapterkit targets record all three, so writing does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import FormatError, TensorFileError

from . import stacked
from .targeting import PARAMETER

_NEEDS_BASE = ("PEFT target_parameters files record neither the number of experts nor the order or orientation "
               "of the parameters: pass the base model (--base DIR, or base=<folder or model>)")

#: module path -> [(parameter name, shape, is_transposed)] in registration order
Layout = dict[str, list[tuple[str, tuple[int, ...], bool]]]


def base_layout(base: Any, file: str) -> Layout:
    """Every module's own parameters of the base (a live model, or a local folder built on the meta device)."""
    if base is None:
        raise FormatError("reading LoRA on parameters (target_parameters) needs the base model", file=file,
                          location="$.target_parameters", hint=_NEEDS_BASE, code="needs_base")
    model = base
    if not hasattr(base, "named_modules"):
        from .qlora import _meta_model

        model = _meta_model(getattr(base, "path", base) if not isinstance(base, (str, Path)) else base)
    from .param_layer import parameters_of

    layout: Layout = {}
    for path, module in model.named_modules():
        if ".parametrizations" in f".{path}":
            continue
        flag = bool(getattr(module, "is_transposed", False))
        params = [(name, tuple(p.shape), flag) for name, p in parameters_of(module)]
        if params:
            layout[path] = params
    return layout


def _selected(key: str, wanted: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in wanted)


def read_parameters(ctx: Any, raw: dict[str, np.ndarray], file: str, r_alpha: Any
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], set[str]]:
    """(targets, canonical tensors, the file keys used) of the parameters ``target_parameters`` selects."""
    config = ctx.config
    wanted = config.get("target_parameters") or []
    if not isinstance(wanted, list) or not all(isinstance(t, str) and t for t in wanted):
        raise FormatError("target_parameters must be a list of parameter names", file=ctx.config_file,
                          location="$.target_parameters", found=wanted, code="bad_config")
    layout = base_layout(ctx.base, ctx.config_file)
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for module, params in layout.items():
        chosen = [(i, p) for i, p in enumerate(params) if _selected(f"{module}.{p[0]}", wanted)]
        for depth, (index, (name, shape, transposed)) in enumerate(reversed(chosen)):
            prefix = module + ".base_layer" * depth
            a_key, b_key = ctx.key(prefix, "lora_A.weight"), ctx.key(prefix, "lora_B.weight")
            if a_key not in raw or b_key not in raw:
                continue  # PEFT skips a module with no such parameter in this layer; nothing stored
            a, b = raw[a_key], raw[b_key]
            path = f"{module}.{name}"
            r, alpha = r_alpha(path)
            target: dict[str, Any] = {"kind": PARAMETER, "shape": list(shape), "r": int(r), "alpha": alpha,
                                      "param_index": index}
            if a.ndim != 2 or b.ndim != 2 or len(shape) not in (2, 3):
                raise TensorFileError("LoRA on a parameter needs 2-d factors and a 2-d or 3-d parameter", file=file,
                                      location=a_key, found=[list(a.shape), list(b.shape), list(shape)], code="shape")
            experts = shape[0] if len(shape) == 3 else 1
            if a.shape[0] != experts * r or b.shape[1] != experts * r:
                raise TensorFileError(f"factors of {path} do not hold {experts} expert(s) of rank {r}", file=file,
                                      location=a_key, expected=f"A [{experts * r}, in], B [out, {experts * r}]",
                                      found=f"A {list(a.shape)}, B {list(b.shape)}",
                                      hint="fix r / rank_pattern in adapter_config.json, or pass the right base",
                                      code="rank_mismatch")
            if len(shape) == 3:
                layout_name = stacked.detect_layout(a.shape, b.shape, shape, transposed)
                if layout_name is None:
                    raise TensorFileError(f"factors of {path} fit neither orientation of the parameter", file=file,
                                          location=a_key, expected=f"parameter {list(shape)}",
                                          found=f"A {list(a.shape)}, B {list(b.shape)}",
                                          hint="is this the right base model?", code="shape")
                target["layout"] = layout_name
                a, b = stacked.from_peft(a, b, experts)
            elif (a.shape[1], b.shape[0]) != (shape[1], shape[0]):
                raise TensorFileError(f"factors of {path} do not fit the parameter", file=file, location=a_key,
                                      expected=f"A [r, {shape[1]}], B [{shape[0]}, r]",
                                      found=f"A {list(a.shape)}, B {list(b.shape)}", code="shape")
            targets[path] = target
            tensors[f"{path}.lora.A"], tensors[f"{path}.lora.B"] = a, b
            used |= {a_key, b_key}
    if wanted and not targets:
        raise FormatError("target_parameters selects no parameter of the base model that has LoRA tensors",
                          file=ctx.config_file, location="$.target_parameters", found=wanted,
                          hint="is this the right base model?", code="wrong_base")
    return targets, tensors, used


def write_parameters(targets: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, np.ndarray], method: str,
                     context: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT's keys for the ``parameter`` targets and the ``target_parameters`` list selecting them."""
    by_module: dict[str, list[tuple[int, str]]] = {}
    for path, target in targets.items():
        module, _, name = path.rpartition(".")
        by_module.setdefault(module, []).append((int(target.get("param_index", 0)), name))
    out: dict[str, np.ndarray] = {}
    for module, names in by_module.items():
        for depth, (_, name) in enumerate(sorted(names, reverse=True)):
            path = f"{module}.{name}"
            a, b = tensors[f"{path}.{method}.A"], tensors[f"{path}.{method}.B"]
            if a.ndim == 3:
                a, b = stacked.to_peft(a, b)
            prefix = module + ".base_layer" * depth
            out[context.key(prefix, "lora_A.weight")], out[context.key(prefix, "lora_B.weight")] = a, b
    original = context.original.get("target_parameters") or []
    keep = bool(original) and all(_selected(p, original) for p in targets) and all(
        any(_selected(p, [t]) for p in targets) for t in original)
    return out, (list(original) if keep else sorted(targets))
