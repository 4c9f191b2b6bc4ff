"""Read a PEFT LoRA folder into adapterkit's canonical layout.

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
would be lost; nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core import safetensors_io
from adapterkit.core.adapter import Adapter, canonical_key
from adapterkit.core.base_model import targets_fingerprint
from adapterkit.core.errors import (
    AdapterkitError, FormatError, LossyConversionError, TensorFileError, UnsafeFileError,
)
from adapterkit.core.io import read_json
from adapterkit.core.manifest import Manifest

from .detect import (
    BIN_NAME, CONFIG_NAME, MAGNITUDE, METHOD_METADATA, QUANTIZATION_METADATA, TASKS, adapter_folder, is_lora_config,
    module_r_alpha, split_lora_key, weights_file,
)

# Config fields whose non-default value changes the math or adds weights a plain LoRA cannot hold.
_VARIANTS = {
    "velora_config": "VeLoRA", "alora_invocation_tokens": "activated LoRA (aLoRA invocation tokens)",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA (a learned singular-value diagonal)",
    "use_qalora": "QALoRA input pooling", "lora_bias": "a bias on lora_B (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save) and their weights",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (the model's layer stack is rebuilt)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
}
# init_lora_weights values after which the saved LoRA is relative to a modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def read(path: Path) -> Adapter:
    """The PEFT LoRA adapter in ``path`` (its folder, or a file PEFT wrote in it)."""
    folder = adapter_folder(Path(path))
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(
            f"no {CONFIG_NAME} in the folder", file=str(folder),
            hint=_subfolder_hint(folder) or "point at the folder PeftModel.save_pretrained wrote", code="missing_file",
        )
    config = _read_config(config_path)
    tensors_path = weights_file(folder)
    if tensors_path is None:
        raise FormatError(
            "no adapter_model.safetensors or adapter_model.bin beside adapter_config.json", file=str(folder),
            hint="copy the adapter's tensor file into the folder", code="missing_file",
        )
    if tensors_path.name == BIN_NAME:
        raw, metadata = _load_bin(tensors_path), {}
    else:
        raw, metadata = safetensors_io.load(tensors_path)
    dora = config.get("use_dora") is True
    pairs = _pair_tensors(raw, str(tensors_path), dora)
    warnings = _warnings(config, str(config_path))
    method, quantization = "dora" if dora else "lora", None
    if not dora:
        quantization = _quantization(metadata or {}, str(tensors_path), warnings)
        if quantization is not None:
            method = "qlora"
    targets, tensors, dtype = _targets(pairs, config, str(tensors_path), str(config_path), method)
    manifest = Manifest(
        method=method,
        config={**_manifest_config(config, targets), **(quantization or {})},
        targets=targets,
        dtype=dtype,
        base_model=_base_model(config, targets),
        task=TASKS.get(config.get("task_type")) if isinstance(config.get("task_type"), str) else None,
        provenance={"converted_from": {"format": "peft", "config": config}},
    )
    return Adapter(manifest, tensors, source=folder, source_format="peft", warnings=warnings)


def _subfolder_hint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    names = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
    if names:
        return f"adapters saved under a non-default name live in subfolders; point at one of {names}"
    return None


# ---- config -----------------------------------------------------------------

def _read_config(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        config = read_json(path)
    except AdapterkitError as exc:
        raise FormatError(
            exc.message, file=exc.file, location=exc.location, found=exc.found, hint=exc.hint, code=exc.code,
        ) from None
    if not isinstance(config, dict):
        raise _bad_config("must be a JSON object", file, "$", type(config).__name__)
    if not is_lora_config(config):
        peft_type = config.get("peft_type")
        raise FormatError(
            "is not a PEFT LoRA config", file=file, location="$.peft_type", expected="LORA", found=peft_type,
            hint=f"the peft format reads LoRA adapters only; a {peft_type} adapter has other tensors and math"
            if peft_type else "a LoRA config has peft_type LORA (or r and lora_alpha)",
            code="unsupported",
        )
    _check_fields(config, file)
    return config


def _bad_config(message: str, file: str, location: str, found: Any, hint: str = _FIX) -> FormatError:
    return FormatError(message, file=file, location=location, found=found, hint=hint, code="bad_config")


def _check_fields(config: dict[str, Any], file: str) -> None:
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
            _check_regex(key, file, f"$.{name}[{key!r}]")
    targets = config.get("target_modules")
    names_ok = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if not (targets is None or isinstance(targets, str) or names_ok):
        raise _bad_config("target_modules must be a list of names or a regex string", file, "$.target_modules", targets)
    if isinstance(targets, str):
        _check_regex(targets, file, "$.target_modules")
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(i) for i in layers))):
        raise _bad_config(
            "layers_to_transform must be an integer or a list of integers", file, "$.layers_to_transform", layers,
        )
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


def _check_regex(pattern: str, file: str, location: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _bad_config(
            f"not a valid regular expression: {exc}", file, location, pattern,
            hint="PEFT matches this as a regex; escape special characters",
        ) from None


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
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) or config.get("loftq_config"):
        out.append(
            f"{file} $.init_lora_weights: {init!r} initialisation changes the base weights; this adapter is "
            "relative to that changed base unless it was saved with path_initial_model_for_weight_conversion"
        )
    return out


# ---- tensors ----------------------------------------------------------------

def _load_bin(path: Path) -> dict[str, np.ndarray]:
    """A PEFT ``adapter_model.bin``, unpickled with torch's weights-only loader and nothing else."""
    import pickle
    import warnings

    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise TensorFileError(
            "not a torch.save file", file=str(path), expected="a zip archive or a binary pickle", found=repr(magic),
            hint="save the adapter again with PeftModel.save_pretrained", code="bad_pickle",
        )

    import torch

    from adapterkit.core.torch_bridge import to_numpy
    from adapterkit.core.torch_pickle import check_torch_file, one_line

    check_torch_file(path)  # every size the pickle claims fits in the file, before torch allocates any

    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(handle, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = lines[0] if lines else str(exc)[:200]
        raise UnsafeFileError(
            "the pickle needs more than tensors to load (loading it fully could run code); refused",
            file=str(path), found=detail[:300],
            hint="if you trust the file, re-save its tensors as adapter_model.safetensors in a sandbox "
            "(torch.load(..., weights_only=False) then safetensors.torch.save_file) and read that instead",
            code="unsafe_pickle",
        ) from None
    except Exception as exc:
        raise TensorFileError(
            f"not a readable torch file: {one_line(exc)}", file=str(path), code="bad_pickle",
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise TensorFileError(
            "must hold a dict of tensor name -> tensor", file=str(path), found=type(data).__name__,
            hint="save it with torch.save(peft_state_dict) or, better, as safetensors", code="bad_pickle",
        )
    try:
        return {key: to_numpy(value) for key, value in data.items()}
    except (TypeError, ValueError) as exc:
        raise TensorFileError(f"tensor dtype not supported: {exc}", file=str(path), code="bad_dtype") from None


def _pair_tensors(raw: dict[str, np.ndarray], file: str, dora: bool = False) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """module -> {"A": (key, array), "B": (key, array)} (+ "magnitude" for DoRA); refuse every other key."""
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key in sorted(raw):
        split = split_lora_key(key)
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
                f"{CONFIG_NAME} says use_dora is true but {module} has no DoRA magnitude (lora_magnitude_vector)",
                file=file, location=some,
                expected=f"base_model.model.{module}.lora_magnitude_vector", found="nothing",
                hint="the file is incomplete, or adapter_config.json's $.use_dora is wrong; save the adapter again",
                code="unpaired",
            )
        if "A" not in pair and "B" not in pair:
            raise FormatError(
                "DoRA magnitude without lora_A / lora_B", file=file, location=pair[MAGNITUDE][0],
                expected=f"base_model.model.{module}.lora_A.weight / .lora_B.weight", found="nothing",
                hint="the file is incomplete; save the adapter again", code="unpaired",
            )
        if "A" not in pair or "B" not in pair:
            have, missing = ("A", "B") if "A" in pair else ("B", "A")
            raise FormatError(
                f"lora_{have} has no matching lora_{missing}", file=file, location=pair[have][0],
                expected=f"base_model.model.{module}.lora_{missing}.weight", found="nothing",
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


def _targets(
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]], config: dict[str, Any], file: str, config_file: str,
    method: str = "lora",
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], str]:
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
            name = safetensors_io.dtype_name(array)
            if name not in _DTYPES:
                raise FormatError(
                    "LoRA tensors must be floating point", file=file, location=key,
                    expected=sorted(_DTYPES.values()), found=str(array.dtype), code="bad_dtype",
                )
            dtypes.setdefault(_DTYPES[name], key)
        r = a.shape[0]
        if b.shape[1] != r or r < 1:
            raise TensorFileError(
                "lora_B's second dimension must equal lora_A's first (the rank)", file=file, location=b_key,
                expected=f"[out, {r}]", found=list(b.shape), code="shape",
            )
        want_r, alpha = module_r_alpha(config, module)
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
            name = safetensors_io.dtype_name(magnitude)
            if name not in _DTYPES:
                raise FormatError("DoRA magnitude must be floating point", file=file, location=m_key,
                                  expected=sorted(_DTYPES.values()), found=str(magnitude.dtype), code="bad_dtype")
            dtypes.setdefault(_DTYPES[name], m_key)
            tensors[canonical_key(module, method, "magnitude")] = magnitude
    if len(dtypes) > 1:
        found = ", ".join(f"{d} ({k})" for d, k in dtypes.items())
        raise FormatError(
            "tensors have mixed dtypes; an adapter has one dtype", file=file, found=found,
            hint="cast every tensor to one dtype and save the adapter again", code="mixed_dtype",
        )
    return targets, tensors, next(iter(dtypes))


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
        out["target_modules"] = sorted({module.rsplit(".", 1)[-1] for module in targets})
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
    from adapterkit.plugins.lora.qlora import QUANT_DEFAULTS, validate_qlora_config

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


def _base_model(config: dict[str, Any], targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    for field, key in (("name", "base_model_name_or_path"), ("revision", "revision")):
        if isinstance(config.get(key), str) and config[key]:
            out[field] = config[key]
    return out
