"""Read an AdapterHub adapter folder (LoRA or bottleneck) into adapterkit's canonical layout.

Tensors are taken over byte for byte. LoRA: ``<m>.loras.<name>.lora_A`` ->
``<m>.lora.A`` (and B). Bottleneck: ``<container>.adapters.<name>.adapter_down.0.weight``
-> ``<anchor>.bottleneck.down.weight`` and so on, the anchor being the site's
layer norm (see adapterkit.plugins.bottleneck). The adapter name (which AdapterHub
keeps in every key) goes to ``provenance.converted_from.adapter_name``, so the
writer can give it back. Everything AdapterHub can hold that these methods
cannot (gating, PHM / Compacter layers, invertible adapters, DoRA, VeRA, IA3,
prefix tuning, unions) is refused with a message saying what would be lost.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import check_tensor_dims, read_torch_tensors
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter, canonical_key
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.errors import (
    AdapterkitError, FormatError, LossyConversionError, TensorFileError,
)
from adapterkit.core.io import read_json
from adapterkit.core.format.manifest import Manifest

from .layout import (
    BIN_NAME, BN_DEFAULTS, BN_PRESETS, CONFIG_NAME, HEAD_FILES, LORA_DEFAULTS, adapter_folder, bottleneck_by_container,
    families_for, is_adapterhub_config, lora_location, lora_unsupported, weights_file,
)

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_LORA_KEY = re.compile(r"(?P<module>.+)\.loras\.(?P<name>[^.]+)\.lora_(?P<which>[AB])")
_BN_KEY = re.compile(r"(?P<container>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)")
_BN_PARAMS = {
    "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias",
    "adapter_norm_before.weight": "ln_before.weight", "adapter_norm_before.bias": "ln_before.bias",
    "adapter_norm_after.weight": "ln_after.weight", "adapter_norm_after.bias": "ln_after.bias",
    "scaling": "scale",
}
_TASKS = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForSequenceClassification", "sequence-classification"),
          ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"))
_KEEP = "use the adapter with AdapterHub's adapters library directly"


def read(path: Path) -> Adapter:
    """The AdapterHub adapter in ``path`` (its folder, or a file AdapterHub wrote in it)."""
    folder = adapter_folder(Path(path))
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"no {CONFIG_NAME} in the folder", file=str(folder),
                          hint="point at the folder model.save_adapter() wrote", code="missing_file")
    full = _read_config(config_path)
    tensors_path = weights_file(folder)
    if tensors_path is None:
        raise FormatError("no adapter.safetensors or pytorch_adapter.bin beside adapter_config.json", file=str(folder),
                          hint="copy the adapter's tensor file into the folder", code="missing_file")
    raw = (read_torch_tensors(tensors_path, hint="save the adapter again with model.save_adapter(..., use_safetensors=True)")
           if tensors_path.name == BIN_NAME else safetensors_io.load(tensors_path)[0])
    if not raw:
        raise FormatError("holds no tensors", file=str(tensors_path), code="empty")
    check_tensor_dims(raw, str(tensors_path))
    config = _method_config(full, str(config_path))
    families = families_for(full.get("model_type"))
    if config.get("architecture") == "lora":
        method, method_config, targets, tensors, name = _read_lora(config, raw, str(tensors_path), str(config_path), families)
    else:
        method, method_config, targets, tensors, name = _read_bottleneck(config, raw, str(tensors_path), str(config_path),
                                                                         families, full)
    if isinstance(full.get("name"), str) and full["name"] != name:
        raise FormatError("adapter_config.json names another adapter than its tensor keys", file=str(config_path),
                          location="$.name", expected=name, found=full["name"], code="name_mismatch")
    dtype = _one_dtype(tensors, str(tensors_path))
    warnings = [f"{folder / f}: the model head saved beside the adapter is not converted (an adapterkit adapter holds "
                "the adapter only)" for f in HEAD_FILES[1:] if (folder / f).is_file()]
    model_class = full.get("model_class")
    base_model: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    if isinstance(full.get("model_type"), str):
        base_model["model_type"] = full["model_type"]
    if isinstance(model_class, str) and model_class:
        base_model["architecture"] = model_class
    if isinstance(full.get("model_name"), str) and full["model_name"]:
        base_model["name"] = full["model_name"]
    manifest = Manifest(
        method=method, config=method_config, targets=targets, dtype=dtype, base_model=base_model,
        task=next((task for suffix, task in _TASKS if isinstance(model_class, str) and model_class.endswith(suffix)), None),
        provenance={"converted_from": {"format": "adapterhub", "adapter_name": name, "config": full}},
    )
    return Adapter(manifest, tensors, source=folder, source_format="adapterhub", warnings=warnings)


# ---- config -------------------------------------------------------------------------

def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except AdapterkitError as exc:
        raise FormatError(exc.message, file=exc.file, location=exc.location, found=exc.found, hint=exc.hint,
                          code=exc.code) from None
    if not is_adapterhub_config(data):
        raise FormatError("is not an AdapterHub adapter config", file=str(path), location="$",
                          expected='{"config": {...}, "name": ..., "version": "adapters.x.y"}',
                          hint="a PEFT adapter_config.json reads with --from peft", code="unsupported")
    return data


def _method_config(full: Mapping[str, Any], file: str) -> dict[str, Any]:
    """The method config as a dict (a preset name expanded to AdapterHub's values)."""
    config = full["config"]
    if isinstance(config, str):
        if config in BN_PRESETS:
            return {**BN_DEFAULTS, **BN_PRESETS[config]}
        if config == "lora":
            return dict(LORA_DEFAULTS)
        raise LossyConversionError(f"AdapterHub config {config!r} is not one adapterkit reads", file=file,
                                   location="$.config", expected=sorted([*BN_PRESETS, "lora"]), found=config,
                                   hint=_KEEP, code="unsupported")
    if not isinstance(config, dict):
        raise FormatError("config must be an object or a preset name", file=file, location="$.config",
                          found=type(config).__name__, code="bad_config")
    architecture = config.get("architecture")
    if architecture not in (None, "lora", "bottleneck"):
        what = {"union": "a ConfigUnion (several methods in one adapter, e.g. MAM or UniPELT)",
                "prefix_tuning": "prefix tuning", "prompt_tuning": "prompt tuning", "reft": "ReFT"}
        raise LossyConversionError(
            f"{what.get(architecture, repr(architecture)) if isinstance(architecture, str) else repr(architecture)[:60]} "
            "adapters are not supported by this converter",
            file=file, location="$.config.architecture", expected=["lora", None], found=architecture,
            hint=_KEEP, code="unsupported",
        )
    return config


def _refuse(config: Mapping[str, Any], file: str, checks: list[tuple[str, Any, str]]) -> None:
    for key, plain, what in checks:
        value = config.get(key, plain)
        if value != plain and not (plain is None and value in (None, False)):
            raise LossyConversionError(f"{what} is not supported: converting would lose it", file=file,
                                       location=f"$.config.{key}", expected=plain, found=value, hint=_KEEP,
                                       code="unsupported")


# ---- LoRA -----------------------------------------------------------------------------

def _read_lora(config: dict[str, Any], raw: dict[str, np.ndarray], file: str, config_file: str,
               families: tuple[str, ...] | None) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, np.ndarray], str]:
    _refuse(config, config_file, [
        ("composition_mode", "add", "IA3 (composition_mode 'scale')"), ("use_gating", False, "a LoRA gate"),
        ("use_dora", False, "DoRA"), ("vera_d", None, "VeRA"), ("vera_b", None, "VeRA"),
        ("n_up_projection", None, "MTL-LoRA"),
    ])
    r, alpha = config.get("r", 8), config.get("alpha", 8)
    if not _is_int(r) or r < 1:
        raise FormatError("r must be a positive integer", file=config_file, location="$.config.r", found=r, code="bad_config")
    if not _is_number(alpha) or alpha <= 0:
        raise FormatError("alpha must be a number > 0", file=config_file, location="$.config.alpha", found=alpha,
                          code="bad_config")
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    names = set()
    for key in sorted(raw):
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise _unknown_key(key, file, "<module>.loras.<name>.lora_A / lora_B")
        names.add(match["name"])
        pairs.setdefault(match["module"], {})[match["which"]] = (key, raw[key])
    name = _one_name(names, file)
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    layers = set()
    for module, pair in sorted(pairs.items()):
        if len(pair) != 2:
            have = next(iter(pair))
            raise FormatError(f"lora_{have} has no matching partner", file=file, location=pair[have][0],
                              hint="the file is incomplete; save the adapter again", code="unpaired")
        reason = lora_unsupported(module, families)
        if reason:
            raise LossyConversionError(reason, file=file, location=pair["A"][0], hint=_KEEP, code="unsupported")
        (a_key, a), (_, b) = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r or not a.size or not b.size:
            raise TensorFileError("LoRA tensor shapes disagree with the config's r", file=file, location=a_key,
                                  expected=f"A [{r}, in], B [out, {r}]", found=f"A {list(a.shape)}, B {list(b.shape)}",
                                  code="shape")
        located = lora_location(module, families)
        kind = located[1][2] if located else "linear"
        if located:
            layers.add(located[0].layer)
        fan_in, fan_out = int(a.shape[1]), int(b.shape[0])
        targets[module] = {"kind": kind, "shape": [fan_in, fan_out] if kind == "conv1d" else [fan_out, fan_in],
                           "r": int(r), "alpha": alpha}
        tensors[canonical_key(module, "lora", "A")] = a
        tensors[canonical_key(module, "lora", "B")] = b
    method_config: dict[str, Any] = {"r": int(r), "alpha": alpha,
                                     "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
    dropout = config.get("dropout", 0.0)
    if _is_number(dropout) and dropout > 0:
        method_config["dropout"] = float(dropout)
    if config.get("leave_out") and layers:
        method_config["layers_to_transform"] = sorted(layers)
    return "lora", method_config, targets, tensors, name


# ---- bottleneck -------------------------------------------------------------------------

def _read_bottleneck(config: dict[str, Any], raw: dict[str, np.ndarray], file: str, config_file: str,
                     families: tuple[str, ...] | None,
                     full: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, np.ndarray], str]:
    config = {**BN_DEFAULTS, **config}
    _refuse(config, config_file, [
        ("use_gating", False, "an adapter gate (UniPELT-style gating)"),
        ("phm_layer", False, "PHM (Compacter) projection layers"),
        ("inv_adapter", None, "an invertible adapter on the embeddings"),
        ("stochastic_depth", 0.0, "stochastic depth (DropPath)"),
    ])
    ln_before = bool(config.get("ln_before"))
    groups: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    names = set()
    for key in sorted(raw):
        match = _BN_KEY.fullmatch(key)
        if match is None:
            raise _unknown_key(key, file, "<layer container>.adapters.<name>.adapter_down.0.weight ...")
        names.add(match["name"])
        groups.setdefault(match["container"], {})[match["param"]] = (key, raw[key])
    name = _one_name(names, file)
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    for container, params in sorted(groups.items()):
        found = bottleneck_by_container(container, families)
        if found is None:
            any_key = next(iter(params.values()))[0]
            raise FormatError(
                "bottleneck adapter sits where adapterkit's bottleneck method cannot place it", file=file,
                location=any_key, expected="BERT attention.output / output, Llama or GPT-2 attention_adapters / "
                "output_adapters of a transformer layer", found=container, hint=_KEEP, code="unsupported",
            )
        where, site = found
        anchor = where.path(site.anchor)
        mapped = _map_params(params, ln_before, file)
        down, up = mapped.get("down.weight"), mapped.get("up.weight")
        if down is None or up is None or down.ndim != 2 or up.shape != down.shape[::-1]:
            raise TensorFileError("adapter_down / adapter_up weights are missing or their shapes disagree", file=file,
                                  location=f"{container}.adapters.{name}", expected="down [size, hidden], up [hidden, size]",
                                  found={k: list(v.shape) for k, v in mapped.items()}, code="shape")
        size, hidden = int(down.shape[0]), int(down.shape[1])
        if _is_int(full.get("hidden_size")) and full["hidden_size"] != hidden:
            raise FormatError("adapter width disagrees with adapter_config.json's hidden_size", file=config_file,
                              location="$.hidden_size", expected=hidden, found=full["hidden_size"], code="bad_config")
        targets[anchor] = {"kind": "block", "site": site.site, "shape": [hidden], "size": size}
        for param, array in mapped.items():
            tensors[canonical_key(anchor, "bottleneck", param)] = array
    method_config = _bn_method_config(config, {t["site"] for t in targets.values()}, config_file)
    _check_params(targets, tensors, method_config, file)
    return "bottleneck", method_config, targets, tensors, name


def _map_params(params: dict[str, tuple[str, np.ndarray]], ln_before: bool, file: str) -> dict[str, np.ndarray]:
    """AdapterHub's module names -> adapterkit's (``adapter_down.N`` depends on ln_before)."""
    out: dict[str, np.ndarray] = {}
    down_index = "1" if ln_before else "0"
    for param, (key, array) in params.items():
        parts = param.split(".")
        if parts[0] == "adapter_down":
            index, leaf = (parts[1], parts[2]) if len(parts) == 3 else (None, None)
            if index == down_index and leaf in ("weight", "bias"):
                ours = f"down.{leaf}"
            elif ln_before and index == "0" and leaf in ("weight", "bias"):
                ours = f"ln_before.{leaf}"  # the same module as adapter_norm_before
            else:
                raise _unknown_key(key, file, "adapter_down.0 (or .1 after ln_before) weight / bias")
        elif param in _BN_PARAMS:
            ours = _BN_PARAMS[param]
        else:
            raise _unknown_key(key, file, "adapter_down / adapter_up / adapter_norm_before / adapter_norm_after / scaling")
        if ours in out and not np.array_equal(out[ours], array):
            raise TensorFileError("adapter_norm_before and adapter_down.0 are one module but hold different values",
                                  file=file, location=key, code="conflict")
        out[ours] = array
    return out


def _bn_method_config(config: Mapping[str, Any], sites: set[str], file: str) -> dict[str, Any]:
    """AdapterHub's BnConfig -> adapterkit's bottleneck config (the preset that leaves the fewest fields)."""
    from adapterkit.plugins.bottleneck import minimal, validate_config

    scaling = config.get("scaling", 1.0)
    values = {
        "attention_adapter": "attention" in sites,  # what the file holds (AdapterHub's mh_adapter)
        "ffn_adapter": "ffn" in sites,  # (output_adapter)
        "parallel": bool(config.get("is_parallel", False)),
        "reduction_factor": config.get("reduction_factor", 16),
        "non_linearity": str(config.get("non_linearity", "relu")).lower(),
        "original_ln_before": bool(config.get("original_ln_before")),
        "original_ln_after": bool(config.get("original_ln_after")),
        "residual_before_ln": config.get("residual_before_ln", True),
        "adapter_residual_before_ln": bool(config.get("adapter_residual_before_ln")),
        "ln_before": bool(config.get("ln_before")),
        "ln_after": bool(config.get("ln_after")),
        "scaling": float(scaling) if _is_number(scaling) else scaling,
        "init_weights": config.get("init_weights", "bert"),
        "dropout": config.get("dropout", 0.0),
        "leave_out": config.get("leave_out") or [],  # validate_config checks it is a list of layer indices
    }
    best: dict[str, Any] | None = None
    for preset in ("seq_bn", "double_seq_bn", "par_bn"):
        try:
            resolved = validate_config({**values, "preset": preset})
        except AdapterkitError as exc:
            raise FormatError(f"AdapterHub config value adapterkit cannot use: {exc.message}", file=file,
                              location=(exc.location or "").replace("$.method.config", "$.config"), found=exc.found,
                              hint=exc.hint, code="bad_config") from None
        candidate = minimal(resolved)
        if best is None or len(candidate) < len(best):
            best = candidate
    assert best is not None
    return best


def _check_params(targets: Mapping[str, Any], tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], file: str) -> None:
    """Every target has exactly the params its config implies (ln_before / ln_after / scaling)."""
    from adapterkit.plugins.bottleneck import BottleneckMethod

    method = BottleneckMethod()
    resolved = method.resolve_config(config)
    want: dict[str, tuple[int, ...]] = {}
    for module, target in targets.items():
        want.update(method.expected_tensors(module, target, resolved))
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise TensorFileError("the tensors do not match adapter_config.json (ln_before, ln_after, scaling)", file=file,
                              expected={"missing": missing[:6]}, found={"unexpected": extra[:6]}, code="tensor_mismatch")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise TensorFileError("tensor has the wrong shape", file=file, location=key, expected=list(shape),
                                  found=list(tensors[key].shape), code="shape")


# ---- shared ---------------------------------------------------------------------------------

def _one_name(names: set[str], file: str) -> str:
    if len(names) != 1:
        raise FormatError("the file holds several adapters; AdapterHub saves one per folder", file=file,
                          found=sorted(names), hint="save each adapter with model.save_adapter(folder, name)",
                          code="several_adapters")
    return next(iter(names))


def _one_dtype(tensors: Mapping[str, np.ndarray], file: str) -> str:
    dtypes: dict[str, str] = {}
    for key, array in tensors.items():
        name = safetensors_io.dtype_name(array)
        if name not in _DTYPES:
            raise FormatError("adapter tensors must be floating point", file=file, location=key,
                              expected=sorted(_DTYPES.values()), found=str(array.dtype), code="bad_dtype")
        dtypes.setdefault(_DTYPES[name], key)
    if len(dtypes) > 1:
        raise FormatError("tensors have mixed dtypes; an adapter has one dtype", file=file,
                          found=", ".join(f"{d} ({k})" for d, k in dtypes.items()), code="mixed_dtype")
    return next(iter(dtypes))


def _unknown_key(key: str, file: str, expected: str) -> AdapterkitError:
    lossy = ((".gate.", "an adapter gate"), ("phm", "PHM (Compacter) weights"),
             ("invertible_adapters", "an invertible adapter"), ("prefix_tunings", "prefix tuning"),
             ("prompt_tunings", "prompt tuning"), ("refts", "ReFT"), ("shared_parameters", "shared (VeRA) parameters"),
             (".m.weight", "a DoRA magnitude vector"), ("adapter_fusion", "AdapterFusion weights"))
    for marker, what in lossy:
        if marker in key:
            return LossyConversionError(f"{what} is not supported: converting would lose this tensor", file=file,
                                        location=key, hint=_KEEP, code="unsupported")
    return FormatError("unknown tensor key", file=file, location=key, expected=expected, code="unknown_key")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
