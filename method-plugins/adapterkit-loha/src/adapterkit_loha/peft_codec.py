"""The PEFT ``LOHA`` codec: LoHa adapters inside adapterkit's ``peft`` format (PEFT 0.21's layout).

The ``peft`` format owns the folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
``.bin``, PEFT's common fields); this codec says what ``peft_type: "LOHA"`` means, through the
context the format hands it (docs/plugins.md, "The PEFT codec context"). Public API only.

Four tensors per adapted module (``peft/tuners/loha/layer.py``: ``LoHaLayer.create_adapter_parameters``;
the adapter name is stripped from the key on save)::

    base_model.model.<module>.hada_w1_a   [out, r]   -> <module>.loha.w1_a
    base_model.model.<module>.hada_w1_b   [r, in]    -> <module>.loha.w1_b
    base_model.model.<module>.hada_w2_a   [out, r]   -> <module>.loha.w2_a
    base_model.model.<module>.hada_w2_b   [r, in]    -> <module>.loha.w2_b

byte for byte. The tensors give every module's shape and rank, so reading needs no base model;
``alpha`` comes from ``alpha`` / ``alpha_pattern`` and is checked, like ``r`` / ``rank_pattern``,
against PEFT's matching (``LoHaModel._create_and_replace``). PEFT 0.21's LoHa adapts ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` (``LoHaModel.layers_mapping``), not transformers ``Conv1D``
(GPT-2): a loha adapter on Conv1D targets is refused for this format (PEFT could not load it), and
PEFT's convolution LoHa (4-d factors, or ``hada_t1`` / ``hada_t2`` with ``use_effective_conv2d``)
is refused on reading. ``modules_to_save`` (fully trained modules) is refused: it would be lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, TensorFileError, check_tensor_dims, is_int,
    is_number,
)

from .math import PARAMS
from .method import DEFAULTS, NAME, factor_shapes, resolve

PREFIX = "hada_"
LEAVES = {f"{PREFIX}{p}": p for p in PARAMS}
#: PEFT's Tucker cores of an effective-conv LoHa (use_effective_conv2d on a kernel > 1)
CONV_LEAVES = ("hada_t1", "hada_t2")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
#: every field of PEFT 0.21's LoHaConfig besides PeftConfig's
KNOWN_FIELDS = frozenset({
    "rank_pattern", "alpha_pattern", "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
    "target_modules", "exclude_modules", "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save",
})
_FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"
_PATTERNS = (("r", "rank_pattern"), ("alpha", "alpha_pattern"))


def _bad(message: str, file: str, location: str, found: Any, hint: str = _FIX) -> FormatError:
    return FormatError(message, file=file, location=location, found=found, hint=hint, code="bad_config")


class LohaPeftCodec(Codec):
    """PEFT's LOHA layout for the ``loha`` method."""

    format = "peft"
    key = "LOHA"
    methods = (NAME,)
    description = "PEFT LoHa (linear modules; reading needs no base model)"

    # ---- read ------------------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, config_file, file = context.config, context.config_file, context.tensors_file
        context.refuse_unknown_fields(KNOWN_FIELDS, NAME)
        _check_config(config, config_file)
        raw = context.tensors
        check_tensor_dims(raw, file)
        groups: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
        for key in sorted(raw):
            module, param = _split(context, key)
            if module is None:
                if any(context.module_of(key, leaf) for leaf in CONV_LEAVES):
                    raise LossyConversionError(
                        "an effective-conv LoHa (hada_t1 / hada_t2, use_effective_conv2d on a Conv2d) is not supported: "
                        "the loha method adapts linear modules only", file=file, location=key, code="unsupported")
                raise LossyConversionError(
                    "the file holds a tensor that is not a LoHa factor; it would be lost", file=file, location=key,
                    expected=f"{context.key('<module>', 'hada_w1_a')} (w1_a, w1_b, w2_a, w2_b)",
                    hint="PEFT LoHa files hold only base_model.model.<module>.hada_w{1,2}_{a,b}", code="unsupported")
            groups.setdefault(module, {})[param] = (key, raw[key])
        if not groups:
            raise FormatError(f"the file holds no LoHa factor ({context.key('<module>', 'hada_w1_a')})", file=file,
                              code="no_targets")
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for module, group in sorted(groups.items()):
            missing = [p for p in PARAMS if p not in group]
            if missing:
                raise FormatError(f"LoHa module {module} lacks hada_{missing[0]}", file=file,
                                  location=context.key(module, f"{PREFIX}{missing[0]}"), expected=list(LEAVES),
                                  found=sorted(f"{PREFIX}{p}" for p in group),
                                  hint="the file is incomplete; save the adapter again", code="unpaired")
            arrays = {p: group[p][1] for p in PARAMS}
            for p, array in arrays.items():
                if array.ndim != 2:
                    raise LossyConversionError(
                        f"{array.ndim}-d LoHa factor: LoHa on convolution layers is not supported (linear modules only)",
                        file=file, location=group[p][0], expected="2-d", found=list(array.shape), code="unsupported")
                name = str(array.dtype)
                if name not in DTYPE_NAMES:
                    raise FormatError("LoHa factors must be floating point", file=file, location=group[p][0],
                                      expected=list(DTYPE_NAMES), found=name, code="bad_dtype")
                dtypes.setdefault(name, group[p][0])
            out, r = arrays["w1_a"].shape
            inn = arrays["w1_b"].shape[1]
            target = {"kind": "linear", "shape": [int(out), int(inn)]}
            for p, want in factor_shapes(target, int(r)).items():
                if tuple(arrays[p].shape) != want:
                    raise TensorFileError("LoHa factor shapes disagree (w1_a, w2_a [out, r]; w1_b, w2_b [r, in])",
                                          file=file, location=group[p][0], expected=list(want),
                                          found=list(arrays[p].shape), code="shape")
            want_r = context.pattern_value(module, config.get("rank_pattern"), config.get("r", DEFAULTS["r"]))
            if want_r != r:
                raise FormatError("adapter_config.json's rank for this module disagrees with the tensor shapes "
                                  "(PEFT could not load it)", file=config_file,
                                  location=f"$.r / $.rank_pattern ({module})", expected=int(r), found=want_r,
                                  hint="fix r or rank_pattern in adapter_config.json", code="rank_mismatch")
            alpha = context.pattern_value(module, config.get("alpha_pattern"), config.get("alpha", DEFAULTS["alpha"]))
            targets[module] = {**target, "r": int(r), "alpha": alpha}
            for p in PARAMS:
                tensors[f"{module}.{NAME}.{p}"] = arrays[p]
        if len(dtypes) > 1:
            raise FormatError("LoHa factors have mixed dtypes; an adapter has one dtype", file=file,
                              found=", ".join(f"{d} ({k})" for d, k in dtypes.items()), code="mixed_dtype")
        base_model = _check_base(context, targets) if context.base is not None else None
        return context.adapter(NAME, _method_config(config, targets), targets, tensors, next(iter(dtypes)),
                               base_model=base_model)

    # ---- write -----------------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        targets = adapter.targets
        conv1d = sorted(m for m, t in targets.items() if t.get("kind") == "conv1d")
        if conv1d:
            return (f"{conv1d[0]} is a transformers Conv1D (GPT-2) target; PEFT 0.21's LoHa adapts nn.Linear, "
                    "nn.Conv1d and nn.Conv2d only (LoHaModel.layers_mapping), so PEFT could not load it: keep the "
                    "adapter in the adapterkit format, or merge it into the base")
        other = sorted(m for m, t in targets.items() if t.get("kind") != "linear")
        if other:
            return f"{other[0]} is a {targets[other[0]].get('kind')!r} target; PEFT LoHa is written here for linear modules"
        expected = {f"{m}.{NAME}.{p}" for m in targets for p in PARAMS}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT LoHa file and would be lost"
        for module, target in sorted(targets.items()):
            for p, want in factor_shapes(target, int(target["r"])).items():
                got = tuple(np.shape(adapter.tensors[f"{module}.{NAME}.{p}"]))
                if got != want:
                    return f"{module}.{NAME}.{p} has shape {list(got)}, its target says {list(want)}"
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets, config = adapter.targets, resolve(adapter.config)
        modules = sorted(targets)
        tensors = {context.key(m, f"{PREFIX}{p}"): adapter.tensors[f"{m}.{NAME}.{p}"] for m in modules for p in PARAMS}
        selection = context.selection(modules, wanted=config["target_modules"], layers=config["layers_to_transform"])
        original = context.original
        fields = {
            **selection,
            **_ranks(targets, context, config),
            "rank_dropout": config["rank_dropout"],
            "module_dropout": config["module_dropout"],
            "use_effective_conv2d": config["use_effective_conv2d"],
            "init_weights": config["init_weights"],
            "modules_to_save": None,
        }
        if "auto_mapping" not in original:
            fields["auto_mapping"] = None
        return fields, tensors


# ---- helpers -------------------------------------------------------------------------------

def _split(context: Any, key: str) -> tuple[str | None, str | None]:
    for leaf, param in LEAVES.items():
        module = context.module_of(key, leaf)
        if module is not None:
            return module, param
    return None, None


def _check_config(config: Mapping[str, Any], file: str) -> None:
    """LoHa's own fields (the format checked target_modules, exclude_modules, layers_to_transform, layers_pattern)."""
    r = config.get("r", DEFAULTS["r"])
    if not is_int(r) or r < 1:
        raise _bad("r must be a positive integer", file, "$.r", r)
    alpha = config.get("alpha", DEFAULTS["alpha"])
    if not is_number(alpha) or alpha <= 0:
        raise _bad("alpha must be a number > 0", file, "$.alpha", alpha)
    for name, check in (("rank_pattern", lambda v: is_int(v) and v >= 1), ("alpha_pattern", lambda v: is_number(v) and v > 0)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise _bad(f"{name} must map module names to numbers > 0", file, f"$.{name}", pattern)
    for name, top in (("rank_dropout", 1.0), ("module_dropout", 1.0)):
        value = config.get(name, 0.0)
        if value is None:
            continue
        if not is_number(value) or not 0 <= value <= top or (name == "rank_dropout" and value == 1):
            raise LossyConversionError(f"{name} {value!r} cannot be held by the loha method (it takes "
                                       f"{'[0, 1)' if name == 'rank_dropout' else '[0, 1]'})", file=file,
                                       location=f"$.{name}", found=value, code="unsupported")
    for name in ("use_effective_conv2d", "init_weights"):
        value = config.get(name, DEFAULTS[name])
        if not (value is None or isinstance(value, bool)):
            raise _bad(f"{name} must be true or false", file, f"$.{name}", value)
    if config.get("modules_to_save"):
        raise LossyConversionError(
            "modules_to_save (fully trained modules, e.g. a classification head) is not supported by the loha "
            "method: their weights would be lost", file=file, location="$.modules_to_save",
            expected="null or []", found=config["modules_to_save"],
            hint="save the PEFT adapter without modules_to_save (task_type None), or merge it with PEFT",
            code="unsupported")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise _bad("layers_pattern needs layers_to_transform", file, "$.layers_pattern", config["layers_pattern"])


def _method_config(config: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
    """The loha method config of a PEFT LoHaConfig, default values left out."""
    out: dict[str, Any] = {}
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                 "layers_pattern", "rank_pattern", "alpha_pattern", "exclude_modules"):
        if config.get(name) is not None:
            out[name] = config[name]
    selected = config.get("target_modules")
    if isinstance(selected, list) and selected:
        out["target_modules"] = sorted(set(selected))
    elif isinstance(selected, str) and selected:
        out["target_modules"] = selected
    else:
        out["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in targets})
    if isinstance(out.get("exclude_modules"), list):
        out["exclude_modules"] = sorted(set(out["exclude_modules"])) or None
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        out["layers_to_transform"] = [layers] if isinstance(layers, int) else list(layers)
    resolved = resolve(out)
    return {k: v for k, v in sorted(resolved.items()) if DEFAULTS.get(k, object()) != v}


def _ranks(targets: Mapping[str, Mapping[str, Any]], context: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """r, alpha, rank_pattern, alpha_pattern under which PEFT gives every target its own r and alpha: the original
    config's when they still do, else the method config's, else computed (:meth:`PeftWriteContext.patterns`),
    else full paths as keys."""
    values = {field: {m: t[field] for m, t in targets.items()} for field, _ in _PATTERNS}
    original = context.original
    candidates = []
    if all(k in original for k in ("r", "alpha")):
        candidates.append({k: original.get(k) for k in ("r", "alpha", "rank_pattern", "alpha_pattern")})
    candidates.append({k: config[k] for k in ("r", "alpha", "rank_pattern", "alpha_pattern")})
    computed: dict[str, Any] = {}
    for field, pattern in _PATTERNS:
        computed[field], computed[pattern] = context.patterns(values[field])
    candidates.append(computed)
    candidates.append({**computed, **{pattern: {m: values[field][m] for m in sorted(targets)
                                                if values[field][m] != computed[field]} for field, pattern in _PATTERNS}})
    for fields in candidates:
        maps = {field: (fields[field], dict(fields.get(pattern) or {})) for field, pattern in _PATTERNS}
        if all(context.pattern_values(m, maps) == {f: values[f][m] for f in values} for m in targets):
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in fields.items()}
    raise LossyConversionError("no rank_pattern / alpha_pattern gives every module its r and alpha under PEFT's "
                               "matching", location="$.targets", code="unsupported")


def _check_base(context: Any, targets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """With a base (``--base``): every module exists and is linear of the factors' shape (PEFT's convolution
    LoHa with 2-d factors, a kernel of 1 or not effective, is refused here). Returns the base_model fields."""
    for module, target in sorted(targets.items()):
        found = context.base_module(module, kinds=("linear",)).shape
        if found != target["shape"]:
            raise BaseModelError("base weight shape differs from the LoHa factors'", location=module,
                                 expected=target["shape"], found=found, hint="is this the right base model?",
                                 code="shape_mismatch")
    return context.base_fields()
