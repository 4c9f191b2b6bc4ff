"""The PEFT ``ADALORA`` codec: AdaLoRA adapters inside adapterkit's ``peft`` format (PEFT 0.21.2's layout).

Three tensors per adapted module (``get_peft_model_state_dict``; the adapter name stripped, ``ranknum`` not
saved)::

    base_model.model.<module>.lora_A   [r, in]      <-> <module>.adalora.A
    base_model.model.<module>.lora_E   [r, 1]       <-> <module>.adalora.E
    base_model.model.<module>.lora_B   [out, r]     <-> <module>.adalora.B

A folder saved after budget pruning has ``rank_pattern`` in its config (``<module>.lora_E`` -> one boolean per
initial rank) and its tensors cut to the kept ranks (``AdaLoraModel.resize_state_dict_by_rank_pattern``); PEFT
loads it by resizing each listed module to the mask's sum first (``resize_modules_by_rank_pattern``), keeping
``ranknum = init_r``. A module pruned to rank 0 has zero-sized tensors: it adds nothing, so it is read as no
target (adapterkit's format has no empty tensor), its all-false mask kept in ``rank_pattern``; written back, PEFT
resizes it to rank 0 again, and with the ``base`` option its zero-sized tensors are written as PEFT writes them
(without the base their shapes are unknown: PEFT then warns of missing keys and loads the same model). PEFT 0.8
and 0.9 cannot resize a module to rank 0 (``r`` must be positive): written for them, such a module is left out of
the selection and ``rank_pattern``, which adds the same nothing. Without ``rank_pattern`` every module has
``init_r``. The
tensors give every shape, so reading needs no base (``kind`` is ``conv1d`` when the config says
``fan_in_fan_out``); a base given as ``base`` decides the kind per module and is checked against the shapes.

Config fields PEFT's AdaLoRA ignores (``r``, ``use_rslora``, ``alpha_pattern``, ``lora_bias``, the init configs)
are kept from the original config on writing; fields that change the model in a way this method does not hold
(``bias``, ``modules_to_save``, ``layer_replication``, ...) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, UsageError, in_out_features,
)

from .method import DEFAULTS, KINDS, check_config, pattern_key

LEAVES = {"A": "lora_A", "E": "lora_E", "B": "lora_B"}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
#: PEFT's AdaLoRA fields (AdaLoraConfig + the LoraConfig fields it uses) -> the method config's (same names)
METHOD_FIELDS = ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                 "orth_reg_weight", "total_step", "init_lora_weights")
#: LoraConfig fields that change what PEFT builds, and the values this codec holds (None: null or absent)
#: every field of PEFT 0.21.2's AdaLoraConfig besides PeftConfig's (LoraConfig's among them)
KNOWN_FIELDS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "beta1", "beta2", "bias", "corda_config", "deltaT",
    "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "init_lora_weights", "init_r",
    "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save",
    "monteclora_config", "orth_reg_weight", "qalora_group_size", "r", "rank_pattern", "runtime_config",
    "target_modules", "target_parameters", "target_r", "tfinal", "tinit", "total_step", "trainable_token_indices",
    "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
})
REFUSED: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "modules_to_save": (None, []), "use_dora": (False, None), "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}), "target_parameters": (None, []), "megatron_config": (None, {}),
    "use_qalora": (False, None), "alora_invocation_tokens": (None, []), "loftq_config": (None, {}),
    "arrow_config": (None, {}), "use_bdlora": (None, False), "kasa_config": (None, {}),
    "monteclora_config": (None, {}), "velora_config": (None, {}), "ensure_weight_tying": (False, None),
}


def _holds(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(value == a and type(value) is type(a) or value is None and a is None for a in allowed)


class AdaLoraPeftCodec(Codec):
    """PEFT's ADALORA layout for the ``adalora`` method."""

    format = "peft"
    key = "ADALORA"
    methods = ("adalora",)
    description = "PEFT AdaLoRA (SVD-form LoRA; pruned rank_pattern folders too)"

    # ---- read -----------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, file = context.config, context.tensors_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "adalora")
        for field, allowed in REFUSED.items():
            if field in config and not _holds(config[field], allowed):
                raise LossyConversionError(
                    f"PEFT AdaLoRA config field {field}={config[field]!r} has no place in an adalora adapter",
                    file=context.config_file, location=f"$.{field}", found=config[field],
                    expected=[a for a in allowed], hint=f"adapterkit's adalora holds only {field}={allowed[0]!r}",
                    code="unsupported")
        method_config: dict[str, Any] = {field: config.get(field, DEFAULTS[field]) for field in METHOD_FIELDS}
        for field in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if config.get(field) not in (None, []):
                method_config[field] = config[field]
        rule = config.get("target_modules")
        if isinstance(rule, list):
            rule = sorted(set(rule))
        method_config["target_modules"] = rule
        if config.get("rank_pattern") is not None:
            method_config["rank_pattern"] = config["rank_pattern"]
        found: dict[str, dict[str, np.ndarray]] = {}
        other = []
        for key, value in context.tensors.items():
            for param, leaf in LEAVES.items():
                module = context.module_of(key, leaf)
                if module is not None:
                    found.setdefault(module, {})[param] = value
                    break
            else:
                other.append(key)
        if other:
            raise LossyConversionError(f"the file holds {len(other)} tensors that are not AdaLoRA's; they would be lost",
                                       file=file, found=sorted(other)[:5],
                                       hint="modules_to_save and trainable tokens have no place in an adalora adapter",
                                       code="unsupported")
        if not found:
            raise FormatError(f"the file holds no AdaLoRA tensor ({context.key('<module>', 'lora_A')})", file=file,
                              code="no_targets")
        if method_config.get("target_modules") is None:  # PEFT's selection by the modules it saved
            method_config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in found})
        try:  # the config first: the tensor checks below rely on init_r and rank_pattern
            check_config({**DEFAULTS, **method_config})
        except UsageError as exc:
            field = (exc.location or "").removeprefix("$.method.config.")
            raise FormatError(f"PEFT AdaLoRA config: {field} {exc.message.removeprefix(field).strip()}",
                              file=context.config_file, location=f"$.{field}" if field else None, found=exc.found,
                              hint=exc.hint, code="bad_config") from None
        conv1d = bool(config.get("fan_in_fan_out", False))
        init_r = method_config["init_r"]
        pattern = config.get("rank_pattern") or {}
        targets, tensors, dtypes = {}, {}, set()
        for module, parts in sorted(found.items()):
            missing = [LEAVES[p] for p in LEAVES if p not in parts]
            if missing:
                raise FormatError(f"{module} lacks its {missing[0]} tensor", file=file,
                                  location=context.key(module, missing[0]), code="missing_tensor")
            a, e, b = parts["A"], parts["E"], parts["B"]
            if a.ndim != 2 or e.ndim != 2 or b.ndim != 2 or e.shape != (a.shape[0], 1) or b.shape[1] != a.shape[0]:
                raise FormatError(f"{module}: lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)} "
                                  "are not [r, in], [r, 1], [out, r]", file=file, location=context.key(module, "lora_A"),
                                  code="tensor_shape")
            if a.shape[1] == 0 or b.shape[0] == 0:
                raise FormatError(f"{module}: empty input or output dimension", file=file,
                                  location=context.key(module, "lora_A"), code="tensor_shape")
            r = int(a.shape[0])
            mask = pattern.get(pattern_key(module))
            expected_r = sum(bool(v) for v in mask) if mask is not None else init_r
            if r != expected_r:
                why = f"its rank_pattern keeps {expected_r}" if mask is not None else f"init_r is {init_r} (no rank_pattern)"
                raise FormatError(f"{module} has rank {r} but {why}: PEFT could not load this folder", file=file,
                                  location=context.key(module, "lora_A"), code="tensor_shape")
            in_base = context.base_module(module, KINDS) if context.base is not None else None
            kind = (in_base and in_base.kind) or ("conv1d" if conv1d else "linear")
            fan_in, fan_out = int(a.shape[1]), int(b.shape[0])
            shape = [fan_out, fan_in] if kind == "linear" else [fan_in, fan_out]
            if in_base is not None and in_base.shape != shape:
                raise BaseModelError(f"the AdaLoRA factors of {module} make a {kind} weight of shape {shape}, the "
                                     f"base's is {in_base.shape}", location=module,
                                     hint="is this the right base model?", code="wrong_base")
            if r == 0:  # pruned to rank 0: adds nothing, so it is no target (its rank_pattern mask stays)
                continue
            targets[module] = {"kind": kind, "shape": shape, "r": r}
            for param, value in (("A", a), ("E", e), ("B", b)):
                tensors[f"{module}.adalora.{param}"] = np.ascontiguousarray(value)
                dtypes.add(str(value.dtype))
        if not targets:
            raise FormatError("every module is pruned to rank 0: the adapter changes nothing", file=file,
                              hint="save the adapter from an earlier step of the budget schedule", code="no_targets")
        # a mask names a module with tensors, or prunes it to rank 0 (nothing to store: adapterkit writes none)
        stray = sorted(key for key in set(pattern) - {pattern_key(m) for m in found} if not _pruned(pattern[key]))
        if stray:
            raise FormatError(f"rank_pattern names {stray[0]!r}, which has no tensors", file=context.config_file,
                              location="$.rank_pattern", code="bad_config")
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise FormatError("the AdaLoRA tensors must share one float dtype", file=file, found=sorted(dtypes),
                              code="dtype")
        method_config = {k: v for k, v in method_config.items() if k not in DEFAULTS or v != DEFAULTS[k]}
        return context.adapter("adalora", method_config, targets, tensors, dtypes.pop(),
                               base_model=context.base_fields())

    # ---- write ----------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        expected = {f"{m}.adalora.{p}" for m in adapter.targets for p in LEAVES}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT ADALORA file and would be lost"
        config = {**DEFAULTS, **adapter.config}
        for module, target in sorted(adapter.targets.items()):
            if target.get("kind") not in KINDS:
                return f"{module} is a {target.get('kind')!r} target; PEFT ADALORA is written here for {list(KINDS)}"
            if int(target.get("r", -1)) > config["init_r"]:
                return f"{module} has rank {target.get('r')} above init_r {config['init_r']}"
        if config["total_step"] is None:
            return ("PEFT's AdaLoraConfig requires total_step, and this adapter's config has none: set "
                    "method.config.total_step (adapterkit train records the steps it ran)")
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets = adapter.targets
        modules = sorted(targets)
        config = {**DEFAULTS, **adapter.config}
        tensors = {}
        for module in modules:
            for param, leaf in LEAVES.items():
                tensors[context.key(module, leaf)] = np.asarray(adapter.tensors[f"{module}.adalora.{param}"])
        pattern = _rank_pattern(targets, config, context.original)
        # a module pruned to rank 0 is no target but PEFT must adapt it to resize it by its mask
        pruned = [key.removesuffix(".lora_E") for key, mask in (pattern or {}).items() if _pruned(mask)]
        release = context.release
        if pruned and release is not None and not release.before("0.8.0") and release.before("0.10.0"):
            pattern = {key: mask for key, mask in pattern.items() if not _pruned(mask)} or None
            pruned = []
        conv1d = all(targets[m].get("kind") == "conv1d" for m in modules)
        if pruned and context.base is not None:
            dtype = np.asarray(next(iter(tensors.values()))).dtype
            for module in pruned:
                fan_in, fan_out = in_out_features("conv1d" if conv1d else "linear",
                                                  context.base_module(module, kinds=KINDS).shape)
                for leaf, empty in (("A", (0, fan_in)), ("E", (0, 1)), ("B", (fan_out, 0))):
                    tensors[context.key(module, LEAVES[leaf])] = np.zeros(empty, dtype=dtype)
        fields: dict[str, Any] = {
            **context.selection(sorted({*modules, *pruned}), wanted=config.get("target_modules"),
                                layers=config.get("layers_to_transform")),
            **{field: config[field] for field in METHOD_FIELDS},
            "rank_pattern": pattern,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "modules_to_save": None,
        }
        original = context.original
        if "r" not in original:
            fields["r"] = 8  # PEFT's default; AdaLoRA ignores r (and warns when it is not 8)
        return fields, tensors


def _pruned(mask: Any) -> bool:
    """Whether a ``rank_pattern`` mask prunes its module to rank 0 (no target, nothing stored)."""
    return isinstance(mask, list) and not any(mask)


def _consistent(pattern: Any, targets: Mapping[str, Mapping[str, Any]], init_r: int) -> bool:
    """Whether PEFT, loading with ``pattern``, gives every module exactly its recorded rank."""
    if not isinstance(pattern, Mapping):
        return False
    keys = {pattern_key(m): m for m in targets}
    if not all(_pruned(pattern[key]) for key in set(pattern) - set(keys)):
        return False  # only modules pruned to rank 0 are left out of targets
    for key, module in keys.items():
        mask = pattern.get(key)
        want = int(targets[module]["r"])
        if mask is None:
            if want != init_r:
                return False
        elif not (isinstance(mask, list) and len(mask) == init_r and sum(bool(v) for v in mask) == want):
            return False
    return True


def _rank_pattern(targets: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any],
                  original: Mapping[str, Any]) -> dict[str, list[bool]] | None:
    """``rank_pattern`` under which PEFT resizes each module to its rank: the original's or the config's when it
    does, else None when every module has ``init_r``, else one mask per module (the first ``r`` entries kept)."""
    init_r = int(config["init_r"])
    for candidate in (original.get("rank_pattern"), config.get("rank_pattern")):
        if candidate is not None and _consistent(candidate, targets, init_r):
            return dict(candidate)
    if all(int(t["r"]) == init_r for t in targets.values()):
        return None
    return {pattern_key(m): [i < int(targets[m]["r"]) for i in range(init_r)] for m in sorted(targets)}
