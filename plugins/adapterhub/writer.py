"""Write an adapterkit LoRA or bottleneck adapter as an AdapterHub folder.

``adapter_config.json`` is AdapterHub's full config (every field, ``indent=2,
sort_keys=True``); the tensors go to ``pytorch_adapter.bin`` (what
``model.load_adapter(path)`` reads by default; a plain dict of tensors that
``torch.load(weights_only=True)`` accepts) or, with ``weights="safetensors"``,
to ``adapter.safetensors`` (``load_adapter(path, use_safetensors=True)``).

AdapterHub holds one configuration per adapter and decides itself which
modules of which layers get an adapter, so the writer checks that the
adapter's targets are exactly such a set and refuses otherwise:

- LoRA: one rank; the modules of each adapted layer are the same subset of
  q / k / v (``attn_matrices``), the ``intermediate`` and the ``output``
  projection of that family; other layers go to ``leave_out``. Per-module
  scales (alpha, rsLoRA) are folded into B, relative to the most common scale,
  which becomes ``alpha = scale * r``.
- bottleneck: the same sites (attention / ffn) in every adapted layer; one
  bottleneck width per layer (``reduction_factor``, a per-layer mapping when
  widths differ).

Layers after the last adapted one: with ``base`` (a local model folder) the
exact layer count puts them in ``leave_out``; without it the model is taken to
end with the last adapted layer.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter, canonical_key
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError
from adapterkit.core.io import atomic_write_bytes

from .layout import (
    BIN_NAME, BN_DEFAULTS, CONFIG_NAME, LORA_DEFAULTS, MODEL_TYPES, SAFETENSORS_NAME, VERSION, Located,
    bottleneck_by_anchor, families_for, lora_location, lora_modules, lora_unsupported,
)

_BN_KEYS = {"up.weight": "adapter_up.weight", "up.bias": "adapter_up.bias", "ln_after.weight": "adapter_norm_after.weight",
            "ln_after.bias": "adapter_norm_after.bias", "scale": "scaling"}
_FIX_PEFT = "save it with --to peft instead, or retrain it on the modules AdapterHub adapts"


def write(adapter: Adapter, path: Path, base: Any = None, name: str | None = None, weights: str = "bin") -> None:
    """Write ``adapter`` into the (new, empty) folder ``path``.

    :param base: optional local base model folder (or ``BaseModelInfo``): gives the layer count and hidden size.
    :param name: the adapter name in the keys (default: the name it had in AdapterHub, else ``"default"``).
    :param weights: ``"bin"`` (pytorch_adapter.bin, AdapterHub's default) or ``"safetensors"``.
    """
    if weights not in ("bin", "safetensors"):
        raise FormatError("weights must be 'bin' or 'safetensors'", found=weights, code="bad_option")
    manifest = adapter.manifest
    original = _original(manifest.provenance)
    name = name or original.get("adapter_name") or "default"
    if not isinstance(name, str) or not name or "." in name:
        raise FormatError("adapter name must be a non-empty string without '.'", found=name, code="bad_name")
    info = _base_info(base)
    families = families_for(manifest.base_model.get("model_type"))
    if families == ():
        raise LossyConversionError(
            "this converter knows where AdapterHub puts adapters only for BERT, Llama and GPT-2 models",
            location="$.base_model.model_type", expected=sorted(MODEL_TYPES.values()),
            found=manifest.base_model.get("model_type"), hint="save it with --to peft or in the adapterkit format",
            code="unsupported",
        )
    if manifest.method == "lora":
        config, tensors, family, hidden = _lora(adapter, name, families, info)
    elif manifest.method == "bottleneck":
        config, tensors, family, hidden = _bottleneck(adapter, name, families, info)
    else:
        raise LossyConversionError(
            f"AdapterHub's format here holds lora and bottleneck adapters, not {manifest.method!r}",
            location="$.method.name", expected=["lora", "bottleneck"], found=manifest.method,
            hint="save it in the adapterkit format instead", code="unsupported",
        )
    old_config: dict[str, Any] = original["config"] if isinstance(original.get("config"), dict) else {}
    old_inner: dict[str, Any] = old_config["config"] if isinstance(old_config.get("config"), dict) else {}
    if old_inner.get("architecture") == config.get("architecture"):
        config = _keep_original(old_inner, config)
    full = {
        "config": config,
        "hidden_size": hidden,
        "model_class": manifest.base_model.get("architecture") or old_config.get("model_class") or "",
        "model_name": manifest.base_model.get("name") or old_config.get("model_name") or "",
        "model_type": manifest.base_model.get("model_type") or MODEL_TYPES[family],
        "name": name,
        "version": old_config.get("version") or VERSION,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / CONFIG_NAME, json.dumps(full, indent=2, sort_keys=True).encode("utf-8"))
    if weights == "safetensors":
        safetensors_io.save(path / SAFETENSORS_NAME, tensors)
    else:
        _save_bin(path / BIN_NAME, tensors)


def _keep_original(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The config AdapterHub wrote, with the fields that decide the math replaced by the recomputed ones.

    Where the original spells a value differently but equivalently (``reduction_factor`` 16 vs 16.0,
    a ``leave_out`` that lists layers the model does not have), the original spelling is kept.
    """
    out = {**old, **new}
    for key in ("reduction_factor", "leave_out", "alpha", "attn_matrices"):
        if key in old and _same(old[key], new[key], key):
            out[key] = old[key]
    return out


def _same(old: Any, new: Any, key: str) -> bool:
    if key == "leave_out":
        return isinstance(old, list) and set(new) <= set(old) and all(i > max(new, default=-1) or i in new for i in old
                                                                      if isinstance(i, int))
    if key == "attn_matrices":
        return isinstance(old, list) and sorted(old) == sorted(new)
    return old == new and type(old) is type(new) or (not isinstance(old, bool) and old == new)


def _original(provenance: Mapping[str, Any]) -> dict[str, Any]:
    source = provenance.get("converted_from") or {}
    return dict(source) if isinstance(source, dict) and source.get("format") == "adapterhub" else {}


def _base_info(base: Any) -> Any:
    if base is None:
        return None
    from adapterkit.core.format.base_model import BaseModelInfo, read_base_model

    return base if isinstance(base, BaseModelInfo) else read_base_model(base)


def _num_layers(info: Any) -> int | None:
    if info is None:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = info.config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _leave_out(layers: set[int], info: Any) -> list[int]:
    total = _num_layers(info)
    end = total if total is not None and total > max(layers) else max(layers) + 1
    return [i for i in range(end) if i not in layers]


def _one_family(found: Mapping[str, Located], what: str) -> str:
    families = {where.family for where in found.values()}
    if len(families) != 1:
        raise FormatError(f"the {what} targets span several model families", location="$.targets",
                          found=sorted(families), code="bad_target")
    return families.pop()


# ---- LoRA ---------------------------------------------------------------------------------

def _lora(adapter: Adapter, name: str, families: tuple[str, ...] | None,
          info: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], str, int]:
    from adapterkit.plugins.lora import lora_scale

    targets = adapter.targets
    use_rslora = bool(adapter.config.get("use_rslora", False))
    located: dict[str, Located] = {}
    entries: dict[str, tuple[str, str | None, str, str]] = {}
    for module, target in sorted(targets.items()):
        found = lora_location(module, families)
        if found is None:
            reason = lora_unsupported(module, families)
            raise LossyConversionError(
                reason or "AdapterHub cannot put LoRA on this module: converting would lose it",
                location=f"$.targets[{module!r}]", found=module,
                expected="" if reason else _lora_expected(module, families), hint=_FIX_PEFT, code="unsupported",
            )
        located[module], entries[module] = found
        if target.get("kind") != found[1][2]:
            raise FormatError("target kind differs from the module AdapterHub wraps there",
                              location=f"$.targets[{module!r}].kind", expected=found[1][2], found=target.get("kind"),
                              code="bad_target")
    family = _one_family(located, "LoRA")
    ranks = {int(t["r"]) for t in targets.values()}
    if len(ranks) != 1:
        raise LossyConversionError("AdapterHub's LoRA has one rank per adapter; this adapter's modules have "
                                   "several", location="$.targets", expected="one r", found=sorted(ranks),
                                   hint="save it with --to peft instead (rank_pattern)", code="unsupported")
    r = ranks.pop()
    # which (location, attn) per layer, and the same set in every adapted layer
    per_layer: dict[int, set[tuple[str, str | None]]] = {}
    for module, where in located.items():
        per_layer.setdefault(where.layer, set()).add(entries[module][:2])
    kinds = {frozenset(v) for v in per_layer.values()}
    if len(kinds) != 1:
        raise LossyConversionError(
            "AdapterHub adapts the same modules in every adapted layer; this adapter adapts different ones per layer",
            location="$.targets", found={str(k): sorted(f"{a}:{b}" if b else a for a, b in v) for k, v in per_layer.items()},
            hint=_FIX_PEFT, code="unsupported",
        )
    chosen = next(iter(kinds))
    attn = sorted({key for loc, key in chosen if loc == "selfattn" and key}, key="qkv".index)
    scales = {m: lora_scale(int(t["r"]), t["alpha"], use_rslora) for m, t in targets.items()}
    counts = Counter(scales.values())
    scale = max(counts, key=lambda s: (counts[s], -s))
    tensors: dict[str, np.ndarray] = {}
    hidden: int | None = None
    for module in sorted(targets):
        a, b = _tensor(adapter, module, "lora", "A"), _tensor(adapter, module, "lora", "B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise TensorFileError("LoRA tensor shapes disagree with the target's rank",
                                  location=canonical_key(module, "lora", "A"), expected=f"A [{r}, in], B [out, {r}]",
                                  found=f"A {list(a.shape)}, B {list(b.shape)}", code="shape")
        if scales[module] != scale:  # fold this module's scale into B
            b = (b.astype(np.float32) * np.float32(scales[module] / scale)).astype(b.dtype)
        tensors[f"{module}.loras.{name}.lora_A"] = a
        tensors[f"{module}.loras.{name}.lora_B"] = b
        side = entries[module][3]
        hidden = hidden or int(a.shape[1] if side == "in" else b.shape[0])
    extra = sorted(k for k in adapter.tensors if k.rsplit(".lora.", 1)[0] not in targets)
    if extra:
        raise LossyConversionError("tensor has no place in an AdapterHub LoRA file and would be lost", location=extra[0],
                                   code="unsupported")
    alpha = scale * r
    config = {
        **LORA_DEFAULTS,
        "selfattn_lora": bool(attn), "intermediate_lora": ("intermediate", None) in chosen,
        "output_lora": ("output", None) in chosen, "attn_matrices": attn or list(LORA_DEFAULTS["attn_matrices"]),
        "r": r, "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "dropout": float(adapter.config.get("dropout", 0.0)),
        "leave_out": _leave_out(set(per_layer), info),
    }
    assert hidden is not None
    return config, tensors, family, _hidden(info, hidden)


def _lora_expected(module: str, families: tuple[str, ...] | None) -> str:
    for family in families or ("llama", "bert", "gpt2"):
        return f"{family}: " + ", ".join(lora_modules(family))
    return ""


# ---- bottleneck ----------------------------------------------------------------------------

def _bottleneck(adapter: Adapter, name: str, families: tuple[str, ...] | None,
                info: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], str, int]:
    from adapterkit.plugins.bottleneck import BottleneckMethod

    method = BottleneckMethod()
    cfg = method.resolve_config(adapter.config)
    located: dict[str, Located] = {}
    containers: dict[str, str] = {}
    per_layer: dict[int, dict[str, int]] = {}
    hidden: int | None = None
    for module, target in sorted(adapter.targets.items()):
        found = bottleneck_by_anchor(module, families)
        if found is None or found[1].site != target.get("site"):
            raise LossyConversionError(
                "AdapterHub places bottleneck adapters only after the attention and feed-forward sub-layers of BERT, "
                "Llama and GPT-2 layers; this target is elsewhere", location=f"$.targets[{module!r}]", found=module,
                hint="save it in the adapterkit format instead", code="unsupported",
            )
        where, site = found
        located[module] = where
        containers[module] = where.path(site.container)
        per_layer.setdefault(where.layer, {})[site.site] = int(target["size"])
        hidden = hidden or int(target["shape"][0])
        if int(target["shape"][0]) != hidden:
            raise FormatError("targets disagree on the hidden size", location=f"$.targets[{module!r}].shape",
                              expected=[hidden], found=target["shape"], code="bad_target")
    family = _one_family(located, "bottleneck")
    site_sets = {frozenset(v) for v in per_layer.values()}
    if len(site_sets) != 1:
        raise LossyConversionError(
            "AdapterHub puts the same adapters (attention and/or ffn) in every adapted layer; this adapter differs "
            "per layer", location="$.targets", found={str(k): sorted(v) for k, v in per_layer.items()},
            hint="save it in the adapterkit format instead", code="unsupported",
        )
    assert hidden is not None
    hidden = _hidden(info, hidden)
    sizes = {}
    for layer, by_site in per_layer.items():
        if len(set(by_site.values())) != 1:
            raise LossyConversionError(
                "AdapterHub gives both adapters of a layer one width (reduction_factor); this layer's differ",
                location="$.targets", found={f"layer {layer}": by_site}, hint="save it in the adapterkit format instead",
                code="unsupported",
            )
        sizes[layer] = next(iter(by_site.values()))
    tensors = _bn_tensors(adapter, method, cfg, containers, name)
    sites = next(iter(site_sets))
    config = {
        **BN_DEFAULTS,
        "mh_adapter": "attention" in sites, "output_adapter": "ffn" in sites,
        "reduction_factor": _reduction(hidden, sizes),
        "non_linearity": cfg["non_linearity"], "original_ln_before": cfg["original_ln_before"],
        "original_ln_after": cfg["original_ln_after"], "residual_before_ln": cfg["residual_before_ln"],
        "adapter_residual_before_ln": cfg["adapter_residual_before_ln"], "ln_before": cfg["ln_before"],
        "ln_after": cfg["ln_after"], "init_weights": cfg["init_weights"], "is_parallel": cfg["parallel"],
        "scaling": cfg["scaling"], "dropout": cfg["dropout"], "leave_out": _leave_out(set(per_layer), info),
    }
    return config, tensors, family, hidden


def _bn_tensors(adapter: Adapter, method: Any, cfg: Mapping[str, Any], containers: Mapping[str, str],
                name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    expected: set[str] = set()
    for module, target in adapter.targets.items():
        prefix = f"{containers[module]}.adapters.{name}."
        for key, shape in method.expected_tensors(module, target, cfg).items():
            expected.add(key)
            array = _tensor(adapter, module, "bottleneck", key.rsplit(".bottleneck.", 1)[1])
            if tuple(array.shape) != shape:
                raise TensorFileError("tensor has the wrong shape", location=key, expected=list(shape),
                                      found=list(array.shape), code="shape")
            param = key.rsplit(".bottleneck.", 1)[1]
            if param.startswith("down."):
                out[prefix + f"adapter_down.{1 if cfg['ln_before'] else 0}.{param[5:]}"] = array
            elif param.startswith("ln_before."):  # one module under two names, as AdapterHub saves it
                out[prefix + f"adapter_norm_before.{param[10:]}"] = array
                out[prefix + f"adapter_down.0.{param[10:]}"] = array
            else:
                out[prefix + _BN_KEYS[param]] = array
    extra = sorted(set(adapter.tensors) - expected)
    if extra:
        raise LossyConversionError("tensor has no place in an AdapterHub bottleneck file and would be lost",
                                   location=extra[0], code="unsupported")
    return out


def _reduction(hidden: int, sizes: Mapping[int, int]) -> Any:
    """reduction_factor(s) for which AdapterHub's ``int(hidden // factor)`` gives each layer's width."""
    factors = {layer: _factor(hidden, size) for layer, size in sizes.items()}
    values = set(factors.values())
    if len(values) == 1:
        return values.pop()
    counts = Counter(factors.values())
    default = max(counts, key=lambda f: (counts[f], -f))
    return {"default": default, **{str(layer): f for layer, f in sorted(factors.items()) if f != default}}


def _factor(hidden: int, size: int) -> int | float:
    if hidden % size == 0:
        return hidden // size
    for candidate in (hidden / (size + 0.5), hidden / size, math.nextafter(hidden / size, 0.0)):
        if int(hidden // candidate) == size:
            return candidate
    raise FormatError(f"no reduction_factor gives a bottleneck of {size} for hidden size {hidden}",
                      found=size, code="unsupported")  # pragma: no cover - (size + 0.5) always works


# ---- shared ------------------------------------------------------------------------------------

def _tensor(adapter: Adapter, module: str, method: str, param: str) -> np.ndarray:
    key = canonical_key(module, method, param)
    if key not in adapter.tensors:
        raise TensorFileError("adapter tensor missing", location=key, expected="present", found="nothing",
                              code="missing_tensor")
    return adapter.tensors[key]


def _hidden(info: Any, found: int) -> int:
    if info is None:
        return found
    for key in ("hidden_size", "n_embd", "d_model"):
        value = info.config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value != found:
                raise FormatError("the base model's hidden size differs from the adapter's", location=key,
                                  expected=found, found=value, hint="is this the right base model?", code="wrong_base")
            return value
    return found


def _save_bin(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """A plain ``{key: tensor}`` dict through ``torch.save`` (loads with ``weights_only=True``)."""
    import io

    import torch

    from adapterkit.core.format.torch_bridge import to_torch

    buffer = io.BytesIO()
    torch.save({key: to_torch(np.ascontiguousarray(array)).clone() for key, array in sorted(tensors.items())}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
