"""The PEFT ``IA3`` codec: (IA)^3 adapters inside adapterkit's ``peft`` format (PEFT 0.21's layout).

The ``peft`` format owns the folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
``.bin``, PEFT's common config fields, safe loading); this codec says what ``peft_type: "IA3"``
means, through the context the format hands it (docs/plugins.md, "The PEFT codec context").
It uses the public ``adapterkit`` API only.

One tensor per adapted module::

    base_model.model.<module>.ia3_l     [out, 1]  ordinary module: the output is scaled
    base_model.model.<module>.ia3_l     [1, in]   feed-forward module: the input is scaled

(``peft/tuners/ia3/layer.py``: ``IA3Layer.update_layer``; the adapter name is stripped from
the key on save.) PEFT decides which modules are feed-forward by ``module_path.endswith(name)``
over ``feedforward_modules`` (a regular expression when it is a string), and requires
``feedforward_modules`` to be a subset of ``target_modules`` when both are lists. The
canonical tensor is the same vector, 1-d, byte for byte. PEFT records neither the base
weights' full shapes nor whether a module has a bias, so reading needs the base model
(``--base``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, check_tensor_dims,
)

from .method import KINDS, vector_size

LEAF = "ia3_l"
#: every field of PEFT 0.21.2's IA3Config besides PeftConfig's
KNOWN_FIELDS = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                          "modules_to_save", "init_ia3_weights"})
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
_BASE_HINT = ("PEFT IA3 folders record neither the base weights' shapes nor their biases: pass the base model "
              "(--base <local model folder>, or base=<folder or torch model>)")


def peft_feedforward(rule: Any, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    if isinstance(rule, str):
        return re.fullmatch(rule, module) is not None
    return any(module.endswith(name) for name in rule or ())


class Ia3PeftCodec(Codec):
    """PEFT's IA3 layout for the ``ia3`` method."""

    format = "peft"
    key = "IA3"
    methods = ("ia3",)
    description = "PEFT (IA)^3 (reading needs the base model)"

    # ---- read -----------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, file = context.config, context.tensors_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "ia3")  # a field of another PEFT release is not dropped
        ff_rule = config.get("feedforward_modules") or []
        _check_rule(ff_rule, context.config_file)
        raw = context.tensors
        check_tensor_dims(raw, file)
        vectors, other = {}, []
        for key, value in raw.items():
            module = context.module_of(key, LEAF)
            (other.append(key) if module is None else vectors.__setitem__(module, value))
        if other:
            raise LossyConversionError(
                f"the file holds {len(other)} tensors that are not (IA)^3 vectors; they would be lost",
                file=file, found=sorted(other)[:5],
                hint="modules_to_save (e.g. a classification head PEFT trained) has no place in an (IA)^3 adapter",
                code="unsupported")
        if not vectors:
            raise FormatError(f"the file holds no (IA)^3 vector ({context.key('<module>', LEAF)})", file=file,
                              code="no_targets")
        if context.base is None:
            raise FormatError("the base model is needed to read this adapter", file=str(context.folder),
                              hint=_BASE_HINT, code="needs_base")
        conv1d = bool(config.get("fan_in_fan_out", False))
        targets, tensors, dtypes = {}, {}, set()
        for module, value in sorted(vectors.items()):
            feedforward = peft_feedforward(ff_rule, module)
            if value.ndim != 2 or value.shape[0 if feedforward else 1] != 1:
                want = "[1, in] (feed-forward)" if feedforward else "[out, 1]"
                raise FormatError(f"(IA)^3 vector has shape {list(value.shape)}, PEFT stores {want}", file=file,
                                  location=context.key(module, LEAF), code="tensor_shape")
            kind, shape, bias = context.base_module(module)
            target = {"kind": kind or ("conv1d" if conv1d else "linear"), "shape": list(shape),
                      "feedforward": feedforward, "bias": bias}
            size = vector_size(target)
            if value.size != size:
                raise BaseModelError(f"(IA)^3 vector of {module} has {value.size} entries, the base module's "
                                     f"{'input' if feedforward else 'output'} has {size}", location=module,
                                     hint="is this the right base model?", code="wrong_base")
            targets[module] = target
            tensors[f"{module}.ia3.l"] = np.ascontiguousarray(value.reshape(-1))
            dtypes.add(str(value.dtype))
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise FormatError("the (IA)^3 vectors must share one float dtype", file=file, found=sorted(dtypes),
                              code="dtype")
        target_rule = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in targets})
        method_config: dict[str, Any] = {
            "target_modules": target_rule if isinstance(target_rule, str) else sorted(set(target_rule)),
        }
        if ff_rule:
            method_config["feedforward_modules"] = ff_rule if isinstance(ff_rule, str) else sorted(set(ff_rule))
        return context.adapter("ia3", method_config, targets, tensors, dtypes.pop(), base_model=context.base_fields())

    # ---- write ----------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        expected = {f"{module}.ia3.l" for module in adapter.targets}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT IA3 file and would be lost"
        kinds = {module: target.get("kind") for module, target in adapter.targets.items()}
        other = sorted(m for m, kind in kinds.items() if kind not in KINDS)
        if other:
            return f"{other[0]} is a {kinds[other[0]]!r} target; PEFT IA3 is written here for {list(KINDS)} modules"
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets = adapter.targets
        modules = sorted(targets)
        tensors = {}
        for module in modules:
            vector = np.asarray(adapter.tensors[f"{module}.ia3.l"])
            shape = (1, vector.size) if targets[module].get("feedforward") else (vector.size, 1)
            tensors[context.key(module, LEAF)] = vector.reshape(shape)
        selection = context.selection(modules, wanted=adapter.config.get("target_modules"), layered=False)
        original = context.original
        fields = {
            **selection,
            "feedforward_modules": _feedforward_rule(targets, selection["target_modules"], original, adapter.config),
            "fan_in_fan_out": all(targets[m].get("kind") == "conv1d" for m in modules),
            "init_ia3_weights": original.get("init_ia3_weights", True),
            "modules_to_save": None,
        }
        if "auto_mapping" not in original:
            fields["auto_mapping"] = None
        return fields, tensors


def _check_rule(rule: Any, file: str) -> None:
    names_ok = isinstance(rule, list) and all(isinstance(name, str) for name in rule)
    if not (isinstance(rule, str) or names_ok):
        raise FormatError("feedforward_modules must be a list of names or a regex string", file=file,
                          location="$.feedforward_modules", found=rule,
                          hint="fix the value in adapter_config.json (PEFT itself could not load it)", code="bad_config")
    if isinstance(rule, str):
        try:
            re.compile(rule)
        except re.error as exc:
            raise FormatError(f"not a valid regular expression: {exc}", file=file, location="$.feedforward_modules",
                              found=rule, hint="PEFT matches this as a regex; escape special characters",
                              code="bad_config") from None


def _feedforward_rule(targets: Mapping[str, Mapping[str, Any]], target_modules: Any, original: Mapping[str, Any],
                      config: Mapping[str, Any]) -> Any:
    """``feedforward_modules`` that PEFT reads as exactly the adapter's feed-forward targets: the original
    config's, the method config's, the full paths, or an exact regex (PEFT checks no subset for a regex)."""
    feedforward = sorted(m for m, t in targets.items() if t.get("feedforward"))
    candidates = [original.get("feedforward_modules"), config.get("feedforward_modules", []), feedforward]
    for rule in candidates:
        if rule is None or not (isinstance(rule, str) or isinstance(rule, list)):
            continue
        if any(peft_feedforward(rule, m) != bool(t.get("feedforward")) for m, t in targets.items()):
            continue
        if isinstance(rule, list) and isinstance(target_modules, list) and not set(rule) <= set(target_modules):
            continue  # PEFT's IA3Config refuses feedforward_modules that are not among the target_modules
        return rule
    return "|".join(re.escape(m) for m in feedforward)
