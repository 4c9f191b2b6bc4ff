"""Write an adapterkit LoRA, DoRA or QLoRA adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors).

A ``dora`` adapter is written with ``use_dora: true`` and its magnitudes as
``<module>.lora_magnitude_vector``. A ``qlora`` adapter is a plain PEFT LoRA
(PEFT keeps no quantisation in an adapter: it is a property of the base the
user loads); the method and its quantisation go into the safetensors
``__metadata__`` (``adapterkit.method``, ``adapterkit.quantization``), which
PEFT ignores and the reader turns back into a ``qlora`` adapter.

The config is PEFT's own (``json.dumps(indent=2, sort_keys=True)``). When the
adapter came from PEFT, the original config is the starting point, so a round
trip gives back the same fields; everything that decides the math (r, alpha and
their patterns, rsLoRA, which modules are adapted) is recomputed from the
manifest and checked against PEFT's matching rules before it is written.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core import safetensors_io
from adapterkit.core.adapter import Adapter, canonical_key
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError
from adapterkit.core.io import atomic_write_bytes

from .detect import (
    CONFIG_NAME, MAGNITUDE, METHOD_METADATA, QUANTIZATION_METADATA, SAFETENSORS_NAME, lora_key, peft_task_type,
    module_r_alpha, selects,
)

#: adapterkit methods a PEFT LoRA folder can hold
METHODS = ("lora", "dora", "qlora")

# Fields forced to their plain-LoRA value when an original config is reused.
_PLAIN = {
    "bias": "none", "use_dora": False, "lora_bias": False, "modules_to_save": None, "trainable_token_indices": None,
    "layer_replication": None, "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
    "velora_config": None, "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}


def write(adapter: Adapter, path: Path, base: Any = None) -> None:
    """Write ``adapter`` into the (new, empty) folder ``path``.

    :param base: optional local base model folder (or ``BaseModelInfo``); with it the
        written ``target_modules`` is checked to select exactly the adapted modules.
    """
    manifest = adapter.manifest
    if manifest.method not in METHODS:
        raise LossyConversionError(
            f"PEFT's LoRA format cannot hold a {manifest.method!r} adapter", location="$.method.name",
            expected=list(METHODS), found=manifest.method, hint="save it in the adapterkit format instead",
            code="unsupported",
        )
    targets = manifest.targets
    conv1d = _fan_in_fan_out(targets)
    tensors = _peft_tensors(adapter)
    original = _original_config(manifest.provenance)
    config = dict(original)
    config.update(_selection(adapter, original, _module_universe(base)))
    config.update(_ranks(targets, original))
    lora = manifest.config
    fields = {
        "peft_type": "LORA",
        "use_rslora": bool(lora.get("use_rslora", False)),
        "fan_in_fan_out": conv1d,
        "lora_dropout": lora.get("dropout", 0.0),
        "inference_mode": True,
        "task_type": peft_task_type(manifest.task, original.get("task_type")),
        "base_model_name_or_path": manifest.base_model.get("name"),
        "revision": manifest.base_model.get("revision"),
        "init_lora_weights": original.get("init_lora_weights", True),
        **{k: v for k, v in _PLAIN.items() if k in original or k in ("bias", "use_dora", "lora_bias", "modules_to_save")},
        "use_dora": manifest.method == "dora",
    }
    for key, value in fields.items():
        if not (key in original and _same(original[key], value)):
            config[key] = value
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    safetensors_io.save(path / SAFETENSORS_NAME, tensors, _metadata(manifest))


def _metadata(manifest: Any) -> dict[str, str]:
    """PEFT's ``{"format": "pt"}``, plus the method and quantisation of a qlora adapter."""
    metadata = {"format": "pt"}
    if manifest.method == "qlora":
        from adapterkit.plugins.lora.qlora import QUANT_DEFAULTS

        quantization = {k: manifest.config.get(k, v) for k, v in QUANT_DEFAULTS.items()}
        metadata[METHOD_METADATA] = "qlora"
        metadata[QUANTIZATION_METADATA] = json.dumps(quantization, sort_keys=True, separators=(",", ":"))
    return metadata


def _same(a: Any, b: Any) -> bool:
    """Equal as PEFT would read them (0 == 0.0), but never True == 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _original_config(provenance: Mapping[str, Any]) -> dict[str, Any]:
    source = provenance.get("converted_from") or {}
    if source.get("format") == "peft" and isinstance(source.get("config"), dict):
        return dict(source["config"])
    return {}


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


def _peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    expected: set[str] = set()
    method = adapter.manifest.method
    params = ("A", "B", MAGNITUDE) if method == "dora" else ("A", "B")
    for module, target in adapter.targets.items():
        for which in params:
            key = canonical_key(module, method, which)
            expected.add(key)
            if key not in adapter.tensors:
                raise TensorFileError(
                    "adapter tensor missing", location=key, expected="present", found="nothing", code="missing_tensor",
                )
            out[lora_key(module, which)] = adapter.tensors[key]
        a, b = out[lora_key(module, "A")], out[lora_key(module, "B")]
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


# ---- rank and alpha ----------------------------------------------------------

def _ranks(targets: Mapping[str, Mapping[str, Any]], original: Mapping[str, Any]) -> dict[str, Any]:
    """r, lora_alpha, rank_pattern, alpha_pattern giving every target its own r and alpha."""
    keep = {k: original[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern") if k in original}
    if keep and _resolves(keep, targets):
        return keep
    r = _most_common(t["r"] for t in targets.values())
    alpha = _most_common(t["alpha"] for t in targets.values())
    for escape in (False, True):
        out = {
            "r": r, "lora_alpha": alpha,
            "rank_pattern": _exceptions(targets, "r", r, escape),
            "alpha_pattern": _exceptions(targets, "alpha", alpha, escape),
        }
        if _resolves(out, targets):
            return out
    raise AssertionError("escaped full-path patterns must resolve exactly")  # pragma: no cover


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -float(v)))  # ties: the smaller value


def _exceptions(targets: Mapping[str, Mapping[str, Any]], field: str, default: Any, escape: bool) -> dict[str, Any]:
    return {
        (re.escape(m) if escape else m): t[field]
        for m, t in sorted(targets.items()) if not _same(t[field], default)
    }


def _resolves(config: Mapping[str, Any], targets: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether PEFT, reading ``config``, gives every target its recorded r and alpha."""
    for module, target in targets.items():
        r, alpha = module_r_alpha(config, module)
        if r != target["r"] or not _same(alpha, target["alpha"]):
            return False
    return True


# ---- which modules ------------------------------------------------------------

_SELECTION = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _selection(adapter: Adapter, original: Mapping[str, Any], universe: set[str] | None) -> dict[str, Any]:
    """target_modules (and friends) that select exactly the adapted modules under PEFT's rules."""
    modules = set(adapter.targets)

    def exact(candidate: Mapping[str, Any]) -> bool:
        if not all(selects(candidate, m) for m in modules):
            return False
        return universe is None or {m for m in universe | modules if selects(candidate, m)} == modules

    if original and exact(original):
        return {k: original[k] for k in _SELECTION if k in original}
    lora = adapter.manifest.config
    wanted = lora.get("target_modules")
    if isinstance(wanted, (list, str)) and wanted != "all-linear":
        layers = lora.get("layers_to_transform")
        candidate = {"target_modules": wanted, "layers_to_transform": layers, "layers_pattern": None}
        if exact(candidate):
            return {**candidate, "exclude_modules": None}
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    candidate = {"target_modules": leaves, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
    if exact(candidate) and (universe is not None or _looks_complete(modules)):
        return candidate
    return {**candidate, "target_modules": exact_regex(modules)}


def _module_universe(base: Any) -> set[str] | None:
    """Module paths of the base model (from its weight names), or None without a base."""
    if base is None:
        return None
    from adapterkit.core.base_model import BaseModelInfo, read_base_model

    info = base if isinstance(base, BaseModelInfo) else read_base_model(base)
    return {key.rsplit(".", 1)[0] for key in info.weights if "." in key}


def _is_index(part: str) -> bool:
    """A block number as nn.ModuleList writes it (no sign, no leading zero)."""
    return part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0"))


def _template(module: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``model.layers.3.mlp`` -> (("model", "layers", "#", "mlp"), (3,))."""
    parts = module.split(".")
    return tuple("#" if _is_index(p) else p for p in parts), tuple(int(p) for p in parts if _is_index(p))


def _looks_complete(modules: set[str]) -> bool:
    """Without a base: leaf names are exact only if every repeated block is adapted alike.

    Templates that share the block prefix (``model.layers.#``) must cover the same
    block numbers, and the numbers must run 0..n-1; otherwise leaf names would also
    select blocks the adapter leaves alone.
    """
    by_block: dict[tuple[str, ...], dict[tuple[str, ...], set[tuple[int, ...]]]] = {}
    for module in modules:
        template, index = _template(module)
        if "#" not in template:
            continue
        last = len(template) - 1 - template[::-1].index("#")
        by_block.setdefault(template[: last + 1], {}).setdefault(template, set()).add(index)
    for groups in by_block.values():
        index_sets = list(groups.values())
        if any(s != index_sets[0] for s in index_sets):
            return False
        for position in range(len(next(iter(index_sets[0])))):
            values = {index[position] for index in index_sets[0]}
            if values != set(range(len(values))):
                return False
    return True


def exact_regex(modules: Iterable[str]) -> str:
    """A regex that full-matches exactly ``modules``, compacted where paths differ by one block number."""
    groups: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
    for module in modules:
        template, index = _template(module)
        groups.setdefault(template, set()).add(index)
    pieces: list[str] = []
    merged: dict[tuple[tuple[str, ...], frozenset[tuple[int, ...]]], list[str]] = {}
    for template, indices in groups.items():
        if template[-1] == "#" or template.count("#") > 1:  # spelled out path by path
            for index in indices:
                numbers = iter(index)
                pieces.append(r"\.".join(str(next(numbers)) if p == "#" else re.escape(p) for p in template))
            continue
        merged.setdefault((template[:-1], frozenset(indices)), []).append(template[-1])
    for (head, indices), leaves in merged.items():
        parts = [_alternation(str(i[0]) for i in indices) if p == "#" else re.escape(p) for p in head]
        pieces.append(r"\.".join([*parts, _alternation(re.escape(leaf) for leaf in leaves)]))
    return "|".join(sorted(pieces))


def _alternation(items: Iterable[str]) -> str:
    items = sorted(set(items), key=lambda s: (len(s), s))
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


