"""The PEFT ``LORA`` codec: ``lora``, ``dora`` and ``qlora`` adapters in PEFT's LoRA layout (the peft format's
codec for ``peft_type`` LORA; the reader is ``peft_read``).

Writing: a ``dora`` adapter gets ``use_dora: true`` and its magnitudes as
``<module>.lora_magnitude_vector``. A ``qlora`` adapter is a plain PEFT LoRA
(PEFT keeps no quantisation in an adapter: it is a property of the base the
user loads); the method and its quantisation go into the safetensors
``__metadata__`` (``adapterkit.method``, ``adapterkit.quantization``), which
PEFT ignores and the reader turns back into a ``qlora`` adapter. When the
adapter came from PEFT, the original config is the starting point (the format
keeps it), so a round trip gives back the same fields; everything that decides
the math (r, alpha and their patterns, rsLoRA, which modules are adapted) is
recomputed from the manifest and checked against PEFT's matching rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import Adapter, Codec
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError
from adapterkit.core.format.adapter import canonical_key

from . import peft_read
from .peft_params import write_parameters
from .targeting import PARAMETER
from .peft_read import MAGNITUDE, METHOD_METADATA, QUANTIZATION_METADATA
from .qlora import QUANT_DEFAULTS

# Fields forced to their plain-LoRA value when an original config is reused.
_PLAIN = {
    "bias": "none", "use_dora": False, "lora_bias": False, "modules_to_save": None, "trainable_token_indices": None,
    "layer_replication": None, "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
    "velora_config": None, "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}
_ALWAYS = ("bias", "use_dora", "lora_bias", "modules_to_save")
_PATTERN_FIELDS = (("r", "rank_pattern"), ("lora_alpha", "alpha_pattern"))
#: canonical parameter -> PEFT's leaf
_LEAF = {"A": "lora_A.weight", "B": "lora_B.weight", MAGNITUDE: "lora_magnitude_vector"}


class LoraPeftCodec(Codec):
    """PEFT's LORA layout for the lora, dora and qlora methods."""

    format = "peft"
    key = "LORA"
    methods = ("lora", "dora", "qlora")
    description = "PEFT LoRA (lora; dora as use_dora; qlora with its quantisation in the safetensors metadata)"

    def read(self, context: Any) -> Adapter:
        return peft_read.read(context)

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        manifest = adapter.manifest
        original, lora = context.original, manifest.config
        modules = {m: t for m, t in manifest.targets.items() if t.get("kind") != PARAMETER}
        parameters = {m: t for m, t in manifest.targets.items() if t.get("kind") == PARAMETER}
        conv1d = _fan_in_fan_out(modules) if modules or not parameters else False
        tensors = _peft_tensors(adapter, context, modules)
        selection: dict[str, Any] = {"target_modules": []}
        if modules:
            selection = context.selection(modules, wanted=lora.get("target_modules"),
                                          layers=lora.get("layers_to_transform"))
        fields: dict[str, Any] = {
            **selection,
            **_ranks(manifest.targets, context),
            "use_rslora": bool(lora.get("use_rslora", False)),
            "fan_in_fan_out": conv1d,
            "lora_dropout": lora.get("dropout", 0.0),
            "init_lora_weights": _init(original.get("init_lora_weights", True), context),
            **{k: v for k, v in _PLAIN.items() if k in original or k in _ALWAYS},
            "use_dora": manifest.method == "dora",
        }
        if parameters:
            param_tensors, fields["target_parameters"] = write_parameters(parameters, adapter.tensors,
                                                                          manifest.method, context)
            tensors.update(param_tensors)
        if manifest.method == "qlora":
            quantization = {k: lora.get(k, v) for k, v in QUANT_DEFAULTS.items()}
            context.metadata[METHOD_METADATA] = "qlora"
            context.metadata[QUANTIZATION_METADATA] = json.dumps(quantization, sort_keys=True, separators=(",", ":"))
        return fields, tensors


def _ranks(targets: Mapping[str, Mapping[str, Any]], context: Any) -> dict[str, Any]:
    """r, lora_alpha, rank_pattern, alpha_pattern giving every target its own r and alpha under the PEFT release
    written for: the original's four fields when together they still do, else all four recomputed, else (a
    release whose matching differs: ``context.release``) every other module's full path as the key of both maps."""
    values = {field: {module: target[name] for module, target in targets.items()}
              for field, name in (("r", "r"), ("lora_alpha", "alpha"))}
    original = context.original
    keep = {k: original[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern") if k in original}
    computed: dict[str, Any] = {}
    for field, pattern in _PATTERN_FIELDS:
        computed[field], computed[pattern] = context.patterns(values[field])
    full_paths = {**computed, **{pattern: {m: values[field][m] for m in sorted(targets)
                                           if values[field][m] != computed[field]}
                                 for field, pattern in _PATTERN_FIELDS}}
    release = context.release
    for field, pattern in _PATTERN_FIELDS:
        if release is not None and computed[pattern] and not release.knows(context.peft_type, pattern):
            added = release.added(context.peft_type, pattern)
            raise release.refusal(pattern, computed[pattern], added[0] if added else None)
    for fields in (keep, computed, full_paths):
        given = {field: (fields.get(field, 8), dict(sorted((fields.get(pattern) or {}).items())))
                 for field, pattern in _PATTERN_FIELDS}
        if fields and all(context.pattern_values(m, given) == {f: values[f][m] for f in values} for m in targets):
            return fields
    module = next(m for m in sorted(targets) if context.pattern_values(m, given) != {f: values[f][m] for f in values})
    label = release.label if release is not None else "PEFT"
    raise LossyConversionError(
        f"{label} matches rank_pattern / alpha_pattern keys so that no pattern gives {module} its r "
        f"{values['r'][module]} and lora_alpha {values['lora_alpha'][module]}", location=f"$.targets[{module!r}]",
        found=module, hint="use a newer --peft-version", code="peft_version")


def _init(value: Any, context: Any) -> Any:
    """init_lora_weights for the release written for: a string it does not know is ``true`` when it only
    initialised A and B (the saved tensors replace them), refused when it changed the base weights."""
    release = context.release
    if release is None or not isinstance(value, str) or release.knows_init(value):
        return value
    if value.lower().startswith(peft_read.BASE_CHANGING_INITS):
        raise release.refusal("init_lora_weights", value, release.init_added(value),
                              what=f"init_lora_weights = {value!r} (it changes the base weights)")
    return True


def _fan_in_fan_out(targets: Mapping[str, Mapping[str, Any]]) -> bool:
    if not targets:
        raise FormatError("the adapter has no targets; a PEFT adapter needs at least one module", location="$.targets")
    kinds = {module: target.get("kind") for module, target in targets.items()}
    unsupported = sorted(m for m, k in kinds.items() if k not in ("linear", "conv1d"))
    if unsupported:
        raise LossyConversionError(
            f"PEFT LoRA here supports linear and conv1d targets only; {kinds[unsupported[0]]!r} targets would be lost",
            location=f"$.targets[{unsupported[0]!r}].kind", expected=["linear", "conv1d"], found=kinds[unsupported[0]],
            code="unsupported",
        )
    if len(set(kinds.values())) > 1:
        one = {k: next(m for m, v in kinds.items() if v == k) for k in ("linear", "conv1d")}
        raise LossyConversionError(
            "PEFT has one fan_in_fan_out flag per adapter, so it cannot mix conv1d (GPT-2 Conv1D) and linear targets",
            location="$.targets", expected="all linear or all conv1d",
            found=f"conv1d {one['conv1d']}, linear {one['linear']}",
            hint="split the adapter into two (one per kind) and save each as PEFT", code="unsupported",
        )
    return next(iter(kinds.values())) == "conv1d"


def _peft_tensors(adapter: Adapter, context: Any, modules: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    method = adapter.manifest.method
    params = ("A", "B", MAGNITUDE) if method == "dora" else ("A", "B")
    expected: set[str] = {canonical_key(m, method, p) for m, t in adapter.targets.items() if m not in modules
                          for p in ("A", "B")}
    for module, target in modules.items():
        for which in params:
            key = canonical_key(module, method, which)
            expected.add(key)
            if key not in adapter.tensors:
                raise TensorFileError(
                    "adapter tensor missing", location=key, expected="present", found="nothing", code="missing_tensor",
                )
            out[context.key(module, _LEAF[which])] = adapter.tensors[key]
        a, b = out[context.key(module, _LEAF["A"])], out[context.key(module, _LEAF["B"])]
        r, alpha = target.get("r"), target.get("alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise FormatError(
                "target has no numeric alpha", location=f"$.targets[{module!r}].alpha", found=alpha,
                hint="lora targets record r and alpha per module", code="bad_target",
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise TensorFileError(
                "LoRA tensor shapes disagree with the target's rank", location=canonical_key(module, method, "A"),
                expected=f"A [{r}, in], B [out, {r}]", found=f"A {list(a.shape)}, B {list(b.shape)}", code="shape",
            )
    extra = sorted(set(adapter.tensors) - expected)
    if extra:
        raise LossyConversionError(
            "tensor has no place in a PEFT LoRA file and would be lost", location=extra[0],
            expected=f"only <module>.{method}.{{{', '.join(params)}}} of the manifest's targets", code="unsupported",
        )
    return out
