"""Read a PEFT LoRA folder (``peft_type`` LORA) into a ``lora``, ``dora`` or ``qlora`` adapter (the LORA codec's reader).

Tensors are taken over byte for byte (no dtype change): ``lora_A`` [r, in] is
``<module>.lora.A`` and ``lora_B`` [out, r] is ``<module>.lora.B``. A DoRA
adapter (``use_dora: true``) becomes method ``dora``: ``<module>.dora.A``,
``.dora.B`` and ``.dora.magnitude`` (PEFT's ``lora_magnitude_vector`` [out]).
A folder adapterkit wrote from a ``qlora`` adapter carries the method and its
quantisation in the safetensors ``__metadata__`` (PEFT ignores it) and reads
back as ``qlora``; any other PEFT LoRA (a QLoRA trained by PEFT included: PEFT
stores it as plain LoRA and keeps no quantisation) reads as ``lora``.
Anything PEFT can express that these cannot (biases, modules_to_save,
embedding LoRA, other LoRA variants) is refused with a message saying what
would be lost; nothing is dropped silently. The peft format hands in the
folder (``ctx``: docs/plugins.md, "The PEFT codec context").
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from adapterkit import Adapter, check_tensor_dims
from adapterkit.core.errors import AdapterkitError, FormatError, LossyConversionError, TensorFileError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import canonical_key

from .qlora import QUANT_DEFAULTS, validate_qlora_config

MAGNITUDE = "magnitude"
#: safetensors __metadata__ keys adapterkit adds (PEFT ignores them): the method and its quantisation
METHOD_METADATA = "adapterkit.method"
QUANTIZATION_METADATA = "adapterkit.quantization"
#: file-key leaves -> canonical parameter (PEFT strips the in-memory ".weight" of DoRA's magnitude; older files kept it)
LEAVES = (("lora_A.weight", "A"), ("lora_B.weight", "B"), ("lora_magnitude_vector", MAGNITUDE),
          ("lora_magnitude_vector.weight", MAGNITUDE))

# Config fields whose non-default value changes the math or adds weights a plain LoRA cannot hold.
_VARIANTS = {
    "velora_config": "VeLoRA", "alora_invocation_tokens": "activated LoRA (aLoRA invocation tokens)",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA (a learned singular-value diagonal)",
    "use_qalora": "QALoRA input pooling", "lora_bias": "a bias on lora_B (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save) and their weights",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (the model's layer stack is rebuilt)",
}
#: every field of PEFT's LoraConfig (0.21.2; the configs of 0.3 to 0.21 have no other), less PeftConfig's own: a
#: set field outside these comes from another PEFT release and is refused, not dropped (tests hold this equal to
#: the installed PEFT and to every release in plugins/peft/releases.json)
KNOWN_FIELDS = frozenset({
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out", "bias", "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern",
    "modules_to_save", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
    "megatron_core", "runtime_config", "layer_replication", "lora_bias", "target_parameters",
    "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "qalora_group_size", "ensure_weight_tying",
    *_VARIANTS,
})
# init_lora_weights values after which the saved LoRA is relative to a modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")

Pairs = dict[str, dict[str, tuple[str, np.ndarray]]]


def read(ctx: Any) -> Adapter:
    """The adapter of a PEFT LoRA folder (``ctx``: the peft format's read context)."""
    config, config_file = ctx.config, ctx.config_file
    ctx.refuse_unknown_fields(KNOWN_FIELDS, "lora")
    _check_fields(config, config_file)
    raw, file = ctx.tensors, ctx.tensors_file
    check_tensor_dims(raw, file)
    dora = config.get("use_dora") is True
    param_targets: dict[str, dict[str, Any]] = {}
    param_tensors: dict[str, np.ndarray] = {}
    if config.get("target_parameters"):
        if dora:
            raise LossyConversionError("DoRA on parameters (use_dora with target_parameters) is not supported",
                                       file=config_file, location="$.use_dora", found=True, code="unsupported")
        from .peft_params import read_parameters

        param_targets, param_tensors, used = read_parameters(ctx, raw, file,
                                                             lambda path: module_r_alpha(ctx, config, path))
        raw = {k: v for k, v in raw.items() if k not in used}
    pairs = _pair_tensors(ctx, raw, file, dora)
    warnings = _warnings(config, config_file)
    method, quantization = "dora" if dora else "lora", None
    if not dora:
        quantization = _quantization(ctx.metadata, file, warnings)
        if quantization is not None:
            method = "qlora"
    targets, tensors, dtype = _targets(ctx, pairs, file, config_file, method)
    if param_targets:
        if method != "lora":
            raise LossyConversionError("QLoRA on parameters is not supported", file=file, code="unsupported")
        for key, array in param_tensors.items():
            if dtype is not None and _float_dtype(array, "LoRA tensors", file, key) != dtype:
                raise FormatError("tensors have mixed dtypes; an adapter has one dtype", file=file, location=key,
                                  code="mixed_dtype")
            dtype = _float_dtype(array, "LoRA tensors", file, key)
        targets.update(param_targets)
        tensors.update(param_tensors)
    method_config = {**_manifest_config(config, targets), **(quantization or {})}
    if param_targets:
        method_config["target_parameters"] = sorted(set(config["target_parameters"]))
    base_model = None
    if param_targets:
        from adapterkit import base_fields

        base_model = base_fields(ctx.base)
    return ctx.adapter(method, method_config, targets, tensors, dtype, base_model=base_model, warnings=warnings)


def module_r_alpha(ctx: Any, config: dict[str, Any], module: str) -> tuple[int, Any]:
    """Rank and alpha PEFT gives ``module`` under ``config`` (r, lora_alpha, rank/alpha_pattern)."""
    r = ctx.pattern_value(module, config.get("rank_pattern"), config.get("r", 8))
    alpha = ctx.pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", 8))
    return r, alpha


# ---- config -----------------------------------------------------------------

def _bad_config(message: str, file: str, location: str, found: Any, hint: str = _FIX) -> FormatError:
    return FormatError(message, file=file, location=location, found=found, hint=hint, code="bad_config")


def _check_fields(config: dict[str, Any], file: str) -> None:
    """LoRA's own fields (the format checked the selection fields: target_modules, layers_to_transform, ...)."""
    r = config.get("r", 8)
    if not _is_int(r) or r < 1:
        raise _bad_config("r must be a positive integer", file, "$.r", r)
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha) or alpha <= 0:
        raise _bad_config("lora_alpha must be a number > 0", file, "$.lora_alpha", alpha)
    for name, check in (("rank_pattern", _is_positive_int), ("alpha_pattern", _is_positive)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise _bad_config(f"{name} must map module names to numbers > 0", file, f"$.{name}", pattern)
        for key in pattern:
            try:
                re.compile(key)
            except re.error as exc:
                raise _bad_config(f"not a valid regular expression: {exc}", file, f"$.{name}[{key!r}]", key,
                                  hint="PEFT matches this as a regex; escape special characters") from None
    use_dora = config.get("use_dora", False)
    if not (use_dora is None or isinstance(use_dora, bool)):
        raise _bad_config("use_dora must be true or false", file, "$.use_dora", use_dora)
    bias = config.get("bias", "none")
    if bias != "none":
        raise LossyConversionError(
            "trained biases are not supported: the biases saved with the adapter would be lost",
            file=file, location="$.bias", expected="none", found=bias,
            hint="retrain with bias='none', or merge the adapter into the base with PEFT instead", code="unsupported",
        )
    for name, what in _VARIANTS.items():
        if config.get(name):
            raise LossyConversionError(
                f"{what} is not supported by adapterkit's lora method: converting would lose it",
                file=file, location=f"$.{name}", expected="unset (null/false/empty)", found=config[name],
                hint="use the adapter with PEFT directly, or merge it into the base with PEFT", code="unsupported",
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _warnings(config: dict[str, Any], file: str) -> list[str]:
    init = config.get("init_lora_weights")
    out = []
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS) or config.get("loftq_config"):
        out.append(
            f"{file} $.init_lora_weights: {init!r} initialisation changes the base weights; this adapter is "
            "relative to that changed base unless it was saved with path_initial_model_for_weight_conversion"
        )
    return out


# ---- tensors ----------------------------------------------------------------

def _split(ctx: Any, key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "A"); DoRA's magnitude -> (module, "magnitude")."""
    for leaf, which in LEAVES:
        module = ctx.module_of(key, leaf)
        if module is not None:
            return module, which
    return None


def _pair_tensors(ctx: Any, raw: dict[str, np.ndarray], file: str, dora: bool) -> Pairs:
    """module -> {"A": (key, array), "B": (key, array)} (+ "magnitude" for DoRA); refuse every other key."""
    pairs: Pairs = {}
    for key in sorted(raw):
        split = _split(ctx, key)
        if split is None or (split[1] == MAGNITUDE and not dora):
            raise _unknown_key(key, file)
        module, which = split
        pairs.setdefault(module, {})[which] = (key, raw[key])
    if not pairs:
        raise FormatError(
            "holds no LoRA tensors", file=file, expected="base_model.model.<module>.lora_A.weight keys", code="empty",
        )
    for module, pair in pairs.items():
        if dora and MAGNITUDE not in pair:
            some = next(iter(pair.values()))[0]
            raise FormatError(
                f"adapter_config.json says use_dora is true but {module} has no DoRA magnitude (lora_magnitude_vector)",
                file=file, location=some, expected=ctx.key(module, "lora_magnitude_vector"), found="nothing",
                hint="the file is incomplete, or adapter_config.json's $.use_dora is wrong; save the adapter again",
                code="unpaired",
            )
        if "A" not in pair and "B" not in pair:
            raise FormatError(
                "DoRA magnitude without lora_A / lora_B", file=file, location=pair[MAGNITUDE][0],
                expected=f"{ctx.key(module, 'lora_A.weight')} / .lora_B.weight", found="nothing",
                hint="the file is incomplete; save the adapter again", code="unpaired",
            )
        if "A" not in pair or "B" not in pair:
            have, missing = ("A", "B") if "A" in pair else ("B", "A")
            raise FormatError(
                f"lora_{have} has no matching lora_{missing}", file=file, location=pair[have][0],
                expected=ctx.key(module, f"lora_{missing}.weight"), found="nothing",
                hint="the file is incomplete; save the adapter again", code="unpaired",
            )
        if not _MODULE_PATH.fullmatch(module):
            raise FormatError(
                "module path has characters a module path cannot have", file=file, location=pair["A"][0],
                found=module, code="bad_key",
            )
    return pairs


def _unknown_key(key: str, file: str) -> AdapterkitError:
    lossy = (
        ("lora_embedding_A", "LoRA on embedding layers (lora_embedding_A/B) is not supported yet"),
        ("lora_embedding_B", "LoRA on embedding layers (lora_embedding_A/B) is not supported yet"),
        ("lora_magnitude_vector", "a DoRA magnitude vector while adapter_config.json's use_dora is not true "
                                  "(PEFT would ignore it)"),
        (".lora_A.bias", "a bias on lora_A is not supported"),
        (".lora_B.bias", "a bias on lora_B (lora_bias) is not supported"),
        ("modules_to_save", "fully trained modules (modules_to_save) are not supported"),
        ("trainable_tokens", "trainable token embeddings are not supported"),
    )
    for marker, what in lossy:
        if marker in key:
            return LossyConversionError(
                f"{what}: converting would lose this tensor", file=file, location=key,
                hint="use the adapter with PEFT directly, or merge it into the base with PEFT", code="unsupported",
            )
    hint = "a plain PEFT LoRA file holds only base_model.model.<module>.lora_A.weight / .lora_B.weight"
    if not key.startswith("base_model.model."):
        hint += "; keys without the base_model.model. prefix were not written by PeftModel.save_pretrained"
    elif ".default." in key:
        hint += "; the adapter name is still in the key (save with PeftModel.save_pretrained, not model.state_dict())"
    else:
        hint += "; other tensors (full embeddings, heads, biases) would be lost"
    return FormatError(
        "unknown tensor key", file=file, location=key, expected="<module>.lora_A.weight or .lora_B.weight",
        hint=hint, code="unknown_key",
    )


def _float_dtype(array: np.ndarray, what: str, file: str, key: str) -> str:
    name = safetensors_io.dtype_name(array)
    if name not in _DTYPES:
        raise FormatError(f"{what} must be floating point", file=file, location=key,
                          expected=sorted(_DTYPES.values()), found=str(array.dtype), code="bad_dtype")
    return _DTYPES[name]


def _targets(ctx: Any, pairs: Pairs, file: str, config_file: str, method: str
             ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], str]:
    config = ctx.config
    conv1d = bool(config.get("fan_in_fan_out", False))
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for module in sorted(pairs):
        (a_key, a), (b_key, b) = pairs[module]["A"], pairs[module]["B"]
        m_key, magnitude = pairs[module].get(MAGNITUDE, (None, None))
        for key, array in ((a_key, a), (b_key, b)):
            if array.ndim != 2:
                raise LossyConversionError(
                    f"{array.ndim}-D LoRA tensor: LoRA on convolution layers is not supported "
                    "(linear and GPT-2 Conv1D only)",
                    file=file, location=key, expected="2-D", found=list(array.shape), code="unsupported",
                )
            dtypes.setdefault(_float_dtype(array, "LoRA tensors", file, key), key)
        r = a.shape[0]
        if b.shape[1] != r or r < 1:
            raise TensorFileError(
                "lora_B's second dimension must equal lora_A's first (the rank)", file=file, location=b_key,
                expected=f"[out, {r}]", found=list(b.shape), code="shape",
            )
        want_r, alpha = module_r_alpha(ctx, config, module)
        if want_r != r:
            raise FormatError(
                "adapter_config.json's rank for this module disagrees with the tensor shape (PEFT could not load it)",
                file=config_file, location=f"$.r / $.rank_pattern ({module})", expected=r, found=want_r,
                hint="fix r or rank_pattern in adapter_config.json", code="rank_mismatch",
            )
        fan_in, fan_out = a.shape[1], b.shape[0]
        if fan_in < 1 or fan_out < 1:
            key, shape = (a_key, list(a.shape)) if fan_in < 1 else (b_key, list(b.shape))
            raise TensorFileError(
                "a LoRA factor with an empty dimension: the adapted layer would have no inputs or outputs",
                file=file, location=key, expected="lora_A [r, in] and lora_B [out, r] with in, out >= 1",
                found=shape, hint="the file is damaged; save the adapter again", code="shape",
            )
        targets[module] = {
            "kind": "conv1d" if conv1d else "linear",
            "shape": [fan_in, fan_out] if conv1d else [fan_out, fan_in],
            "r": int(r),
            "alpha": alpha,
        }
        tensors[canonical_key(module, method, "A")] = a
        tensors[canonical_key(module, method, "B")] = b
        if magnitude is not None:
            if magnitude.shape != (fan_out,):
                raise TensorFileError(
                    "DoRA magnitude must hold one value per output of the module", file=file, location=m_key,
                    expected=[int(fan_out)], found=list(magnitude.shape), code="shape",
                )
            dtypes.setdefault(_float_dtype(magnitude, "DoRA magnitude", file, m_key), m_key)
            tensors[canonical_key(module, method, MAGNITUDE)] = magnitude
    if len(dtypes) > 1:
        found = ", ".join(f"{d} ({k})" for d, k in dtypes.items())
        raise FormatError(
            "tensors have mixed dtypes; an adapter has one dtype", file=file, found=found,
            hint="cast every tensor to one dtype and save the adapter again", code="mixed_dtype",
        )
    return targets, tensors, next(iter(dtypes), None)  # type: ignore[arg-type]


# ---- manifest fields ----------------------------------------------------------

def _manifest_config(config: dict[str, Any], targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The lora method config, with only non-default values."""
    out: dict[str, Any] = {}
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if r != 8:
        out["r"] = r
    if alpha != 8:
        out["alpha"] = alpha
    if config.get("use_rslora"):
        out["use_rslora"] = True
    dropout = config.get("lora_dropout", 0.0)
    if _is_number(dropout) and dropout != 0:
        out["dropout"] = dropout
    target_modules = config.get("target_modules")
    if isinstance(target_modules, list) and target_modules:
        out["target_modules"] = sorted(set(target_modules))
    elif isinstance(target_modules, str):
        out["target_modules"] = target_modules
    else:  # PEFT normally writes the resolved names; fall back to the adapted leaves
        out["target_modules"] = sorted({module.rsplit(".", 1)[-1] for module, t in targets.items()
                                        if t.get("kind") != "parameter"}) or "all-linear"
    if out.get("target_modules") == "all-linear":
        del out["target_modules"]
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            out[name] = dict(config[name])
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        out["layers_to_transform"] = [layers] if isinstance(layers, int) else list(layers)
    return out


def _quantization(metadata: dict[str, str], file: str, warnings: list[str]) -> dict[str, Any] | None:
    """The qlora quantisation adapterkit recorded in the safetensors metadata, or None (a plain LoRA)."""
    if metadata.get(METHOD_METADATA) != "qlora":
        return None
    try:
        recorded = json.loads(metadata.get(QUANTIZATION_METADATA, "{}"))
        if not isinstance(recorded, dict) or not set(recorded) <= set(QUANT_DEFAULTS):
            raise ValueError(f"expected an object with keys from {sorted(QUANT_DEFAULTS)}")
        resolved = validate_qlora_config(recorded)
    except (ValueError, AdapterkitError) as exc:
        warnings.append(f"{file} __metadata__[{QUANTIZATION_METADATA!r}]: unreadable qlora quantisation ({exc}); "
                        "read as a plain lora adapter")
        return None
    return {k: resolved[k] for k in QUANT_DEFAULTS}
