"""Shared by LoRA formats that hold one rank and one scale per adapter (mlx-lm, torchtune).

Writing: every module is padded to the largest rank with zero rows of A and
zero columns of B (the product is unchanged), and each module's scale is folded
into its B as ``B * (scale_m / file_scale)``. The adapter's own manifest facts
(config, per-module r and alpha, base model, task) go into a *record* kept in
the foreign config under :data:`RECORD_KEY`, so reading the folder back gives
the same adapter: padding is cut off and the fold undone. A fold that does not
divide back bit for bit (the ratio is not a power of two) keeps the original B
in the record (base64), as the GGUF plugin does. The record is tied to the
tensors by a digest over their keys, dtypes, shapes and bytes; when the tensors
change (trained further, edited) the record is ignored with a warning and the
folder reads with the foreign format's own semantics.

Torch-free: numpy only.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import BaseModelInfo, read_base_model, targets_fingerprint
from adapterkit.core.errors import BaseModelError, FormatError, LossyConversionError, UsageError
from adapterkit.core.format.manifest import Manifest
from .config import validate_config
from .method import lora_scale

RECORD_KEY = "adapterkit"
RECORD_VERSION = 1
#: a foreign config may carry the record's original B tensors; allow more than the default JSON cap
CONFIG_MAX_BYTES = 512 * 1024 * 1024
DTYPE_NAMES = {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16",
               np.dtype("<f8"): "float64"}
_NUMPY_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_BLOCK = re.compile(r"^(?P<prefix>(?:.+?\.)?layers)\.(?P<index>\d+)\.(?P<rel>.+)$")


@dataclass
class Module:
    """One adapted linear module in canonical orientation: A ``[r, in]``, B ``[out, r]``."""

    a: np.ndarray
    b: np.ndarray
    r: int
    alpha: float
    scale: float = 0.0

    @property
    def shape(self) -> list[int]:
        return [int(self.b.shape[0]), int(self.a.shape[1])]


def split_block(module: str) -> tuple[str, int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ("model.layers", 3, "self_attn.q_proj"); None outside blocks."""
    match = _BLOCK.match(module)
    return (match["prefix"], int(match["index"]), match["rel"]) if match else None


def number(value: float) -> int | float:
    """An integral float as int (alpha 16.0 -> 16), for tidy JSON."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else value


def alpha_for(scale: float, r: int) -> int | float:
    """An alpha with ``alpha / r == scale`` exactly in float arithmetic when one is near ``scale * r``."""
    alpha = scale * r
    candidates = [float(round(alpha)), alpha]
    up = down = alpha
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for candidate in candidates:
        if candidate > 0 and candidate / r == scale:
            return number(candidate)
    return number(alpha)


# ---- options and the base model ------------------------------------------------

def base_info(base: Any, fallback: Any = None) -> BaseModelInfo | None:
    """The base model: the ``base`` option (a folder or BaseModelInfo), else ``fallback`` when it names
    an existing local model folder (a config's model path; nothing is downloaded), else None."""
    if isinstance(base, BaseModelInfo):
        return base
    if base is not None:
        return read_base_model(base)
    if isinstance(fallback, str) and fallback:
        try:
            if (Path(fallback) / "config.json").is_file():
                return read_base_model(fallback)
        except (OSError, ValueError, BaseModelError):
            return None
    return None


def num_layers(info: BaseModelInfo) -> int | None:
    """Number of transformer blocks: config num_hidden_layers, else counted from the weight names."""
    value = info.config.get("num_hidden_layers")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    indices = {block[1] for key in info.weights if (block := split_block(key.rsplit(".", 1)[0]))}
    return max(indices) + 1 if indices else None


def check_base(modules: Mapping[str, Module], info: BaseModelInfo | None, file: str) -> None:
    """Every module exists in the base with weight ``[out, in]``."""
    if info is None:
        return
    for name, module in sorted(modules.items()):
        shape = info.weight_shape(name)
        if shape is None:
            raise BaseModelError("adapted module does not exist in the base model", file=file, location=name,
                                 expected=f"{name}.weight in {info.path}", found=None,
                                 hint="pass the base model the adapter was trained on", code="wrong_base")
        if list(shape) != module.shape:
            raise BaseModelError("base weight shape differs from the adapter's [out, in]", file=file, location=name,
                                 expected=module.shape, found=list(shape),
                                 hint="pass the base model the adapter was trained on", code="wrong_base")


# ---- writing -------------------------------------------------------------------

def adapter_modules(adapter: Adapter, fmt: str) -> dict[str, Module]:
    """The LoRA modules of ``adapter`` with their effective scales; refuse what ``fmt`` cannot hold."""
    manifest = adapter.manifest
    if manifest.method != "lora":
        raise LossyConversionError(f"the {fmt} format holds LoRA adapters only", expected="lora", found=manifest.method,
                                   hint="convert to the adapterkit format instead", code="unsupported_method")
    use_rslora = bool(manifest.config.get("use_rslora", False))
    modules: dict[str, Module] = {}
    expected: set[str] = set()
    for name, target in sorted(manifest.targets.items()):
        kind = target.get("kind", "linear")
        if kind != "linear":
            raise LossyConversionError(f"the {fmt} format adapts nn.Linear modules only", location=name,
                                       expected="linear", found=kind, hint="GPT-2 style Conv1D adapters stay in PEFT",
                                       code="unsupported_module")
        keys = (f"{name}.lora.A", f"{name}.lora.B")
        expected.update(keys)
        missing = [k for k in keys if k not in adapter.tensors]
        if missing:
            raise FormatError("adapter tensor is missing", location=missing[0], code="missing_tensor")
        a, b = adapter.tensors[keys[0]], adapter.tensors[keys[1]]
        r = int(target.get("r", a.shape[0]))
        alpha = target.get("alpha", manifest.config.get("alpha", 8))
        modules[name] = Module(a, b, r, alpha, lora_scale(r, alpha, use_rslora))
    extra = sorted(set(adapter.tensors) - expected)
    if extra:
        raise LossyConversionError(f"the {fmt} format holds only LoRA A and B", location=extra[0], found=extra,
                                   hint="drop the extra tensors first", code="unsupported_tensor")
    if not modules:
        raise FormatError("the adapter has no targets", code="empty_adapter")
    return modules


def common_scale(modules: Mapping[str, Module]) -> float:
    """The file scale: the one most modules fold into by a power of two (bitwise reversible), then the
    one most modules have (their B stay untouched), then the larger."""
    counts = Counter(m.scale for m in modules.values())

    def reversible(scale: float) -> int:
        return sum(n for s, n in counts.items() if math.frexp(s / scale)[0] == 0.5)

    return max(counts, key=lambda s: (reversible(s), counts[s], s))


@dataclass
class Uniform:
    """Modules padded to one rank with scales folded into B, plus what undoes it."""

    rank: int
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    folds: dict[str, float]
    originals: dict[str, np.ndarray]


def uniform(modules: Mapping[str, Module], file_scale: float) -> Uniform:
    """Pad every module to the largest rank and fold ``scale_m / file_scale`` into its B."""
    rank = max(m.r for m in modules.values())
    out = Uniform(rank, {}, {}, {}, {})
    for name, module in modules.items():
        b = module.b
        factor = module.scale / file_scale
        if factor != 1.0:
            folded = (b.astype(np.float64) * factor).astype(b.dtype)
            if not np.isfinite(folded.astype(np.float32)).all():
                raise LossyConversionError("folding the module's scale into B overflows its dtype", location=name,
                                           found=factor, hint="cast the adapter to float32 first", code="fold_overflow")
            out.folds[name] = factor
            if not _same_bits(_unfold(folded, factor), b):
                out.originals[name] = b
            b = folded
        a_pad = np.zeros((rank, module.a.shape[1]), dtype=module.a.dtype)
        a_pad[: module.r] = module.a
        b_pad = np.zeros((b.shape[0], rank), dtype=b.dtype)
        b_pad[:, : module.r] = b
        out.a[name], out.b[name] = a_pad, b_pad
    return out


def _unfold(b: np.ndarray, factor: float) -> np.ndarray:
    return (b.astype(np.float64) / factor).astype(b.dtype)


def _same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: ties a record to the tensors it describes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{array.dtype.str}|{list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def make_record(adapter: Adapter, modules: Mapping[str, Module], plan: Uniform, digest: str) -> dict[str, Any]:
    """The manifest facts a foreign config cannot hold, to restore the adapter exactly."""
    manifest = adapter.manifest
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "tensors": digest,
        "config": manifest.config,
        "dtype": manifest.dtype,
        "targets": {name: {"r": m.r, "alpha": m.alpha} for name, m in sorted(modules.items())},
    }
    if plan.folds:
        record["folds"] = dict(sorted(plan.folds.items()))
    if plan.originals:
        record["originals"] = {name: base64.b64encode(np.ascontiguousarray(b).tobytes()).decode("ascii")
                               for name, b in sorted(plan.originals.items())}
    for key in ("base_model", "task", "annotations"):
        value = getattr(manifest, key)
        if value:
            record[key] = value
    provenance = {k: v for k, v in manifest.provenance.items() if k != "converted_from"}
    if provenance:
        record["provenance"] = provenance
    return record


# ---- reading -------------------------------------------------------------------

def restore(record: Any, modules: Mapping[str, Module], digest: str,
            warnings: list[str]) -> tuple[dict[str, Module], dict[str, Any]] | None:
    """Undo padding and folds with a record written by :func:`make_record`; None (and a warning) when it
    does not describe these tensors. Modules in the file but not in the record must have B = 0 (fill-ins)."""

    def ignored(why: str) -> None:
        warnings.append(f"the {RECORD_KEY!r} record in the config was ignored ({why}); "
                        "the tensors are read with the format's own semantics")

    if record is None:
        return None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        ignored("unknown record version")
        return None
    if record.get("tensors") != digest:
        ignored("the tensors changed since adapterkit wrote them")
        return None
    try:
        config = record["config"]
        use_rslora = bool(validate_config(config)["use_rslora"])
        dtype = _NUMPY_DTYPES[record["dtype"]]
        targets, folds = record["targets"], record.get("folds", {})
        originals = record.get("originals", {})
        out: dict[str, Module] = {}
        for name, module in modules.items():
            if name not in targets:
                if np.any(module.b.astype(np.float32)):
                    raise ValueError(f"{name} is not in the record but its B is not zero")
                continue
            r, alpha = targets[name]["r"], targets[name]["alpha"]
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= module.a.shape[0]:
                raise ValueError(f"{name}: r {r!r} is not a rank of the stored tensors")
            a, b = module.a[:r], module.b[:, :r]
            if np.any(module.a[r:].astype(np.float32)) or np.any(module.b[:, r:].astype(np.float32)):
                raise ValueError(f"{name}: rank padding is not zero")
            if name in originals:
                raw = base64.b64decode(originals[name], validate=True)
                b = np.frombuffer(bytearray(raw), dtype=dtype).reshape(b.shape)
            elif name in folds:
                factor = folds[name]
                if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                        or factor == 0:
                    raise ValueError(f"{name}: fold factor {factor!r} is not a finite non-zero number")
                b = _unfold(b, float(factor))
            out[name] = Module(np.ascontiguousarray(a), np.ascontiguousarray(b), r, alpha,
                               lora_scale(r, alpha, use_rslora))
        if set(targets) - set(out):
            raise ValueError("the record names modules the file does not hold")
    except (KeyError, TypeError, ValueError, UsageError) as exc:
        ignored(f"it is inconsistent: {exc}")
        return None
    fields = ("config", "dtype", "base_model", "task", "annotations", "provenance")
    facts = {k: record[k] for k in fields if k in record}
    problem = _facts_problem(out, facts)
    if problem:
        ignored(f"it is inconsistent: {problem}")
        return None
    return out, facts


def _facts_problem(modules: Mapping[str, Module], facts: Mapping[str, Any]) -> str | None:
    """Why the record's manifest facts cannot be trusted (the record's digest covers the tensors only), or None."""
    from adapterkit import manifest_errors

    for key in ("config", "base_model", "annotations", "provenance"):
        if key in facts and not isinstance(facts[key], dict):
            return f"{key} is not an object"
    targets = {n: {"kind": "linear", "shape": m.shape, "r": m.r, "alpha": number(m.alpha)} for n, m in modules.items()}
    provenance = {**(facts.get("provenance") or {}), "converted_from": {"format": "record", "config": {}}}
    manifest = Manifest(method="lora", config=dict(facts.get("config") or {}), targets=targets,
                        dtype=facts.get("dtype", "float32"),
                        base_model={**(facts.get("base_model") or {}), "fingerprint": targets_fingerprint(targets)},
                        task=facts.get("task", "causal-lm"), provenance=provenance,
                        annotations=dict(facts.get("annotations") or {}))
    errors = manifest_errors(manifest)
    return str(errors[0]) if errors else None


def plain_config(modules: Mapping[str, Module], r: int, alpha: float, dropout: float = 0.0) -> dict[str, Any]:
    """A lora config (non-default values only) that selects exactly ``modules``."""
    blocks = {name: split_block(name) for name in modules}
    config: dict[str, Any] = {}
    if r != 8:
        config["r"] = r
    if alpha != 8:
        config["alpha"] = number(alpha)
    if dropout:
        config["dropout"] = dropout
    if all(blocks.values()):
        config["target_modules"] = sorted({b[2] for b in blocks.values() if b})
        config["layers_to_transform"] = sorted({b[1] for b in blocks.values() if b})
    else:
        config["target_modules"] = sorted(modules)
    return config


def build_adapter(modules: Mapping[str, Module], *, config: dict[str, Any], fmt: str, source_config: dict[str, Any],
                  info: BaseModelInfo | None, name: str | None, facts: Mapping[str, Any] | None, file: str,
                  warnings: list[str]) -> Adapter:
    """An Adapter from canonical modules; ``facts`` (from a record) override config, base model and task."""
    dtypes = {DTYPE_NAMES.get(t.dtype) for m in modules.values() for t in (m.a, m.b)}
    if len(dtypes) != 1 or None in dtypes:
        raise FormatError("tensors must share one float dtype (float32, float16, bfloat16 or float64)", file=file,
                          found=sorted(str(d) for d in dtypes), hint="cast every tensor to one dtype",
                          code="mixed_dtype")
    facts = facts or {}
    targets = {n: {"kind": "linear", "shape": m.shape, "r": m.r, "alpha": number(m.alpha)}
               for n, m in sorted(modules.items())}
    tensors: dict[str, np.ndarray] = {}
    for n, m in sorted(modules.items()):
        tensors[f"{n}.lora.A"], tensors[f"{n}.lora.B"] = m.a, m.b
    base_model = dict(facts.get("base_model") or {})
    if not base_model:
        if name:
            base_model["name"] = name
        if info is not None:
            for key, value in (("model_type", info.model_type), ("architecture", info.architecture)):
                if value:
                    base_model[key] = value
    base_model["fingerprint"] = targets_fingerprint(targets)
    provenance = dict(facts.get("provenance") or {})
    provenance["converted_from"] = {"format": fmt, "config": source_config}
    manifest = Manifest(
        method="lora", config=dict(facts.get("config", config)), targets=targets, dtype=dtypes.pop() or "float32",
        base_model=base_model, task=facts.get("task", "causal-lm"), provenance=provenance,
        annotations=dict(facts.get("annotations") or {}),
    )
    return Adapter(manifest, tensors, warnings=list(warnings))
