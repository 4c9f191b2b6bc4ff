"""Shared builders for the core tests: LoRA adapters without torch, folders, hand-made files.

Everything here is torch-free: an adapter is a :class:`Manifest` plus numpy
arrays, so tests of the format, validate and the CLI run in milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import adapterkit
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.io import canonical_json
from adapterkit.core.format.manifest import MANIFEST_NAME, Manifest
from adapterkit.core.store.native import TENSOR_FILE
from adapterkit.core.plugin.registry import Registry, get_plugin_manager

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def require_methods(*names: str) -> None:
    """Fail, not skip, when a method plugin a test needs is missing: `make install` installs every one (the
    examples/ and method-plugins/ packages), so a skip would only hide a broken install."""
    import pytest

    missing = sorted(set(names) - set(adapterkit.default_registry().methods))
    if missing:
        pytest.fail(f"method plugins {missing} are not installed; run `make install` (it installs examples/ and "
                    "method-plugins/)", pytrace=False)

NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype("<f8"),
}


def llama_targets(layers: Iterable[int] = (0, 1), r: int = 4, alpha: float = 8) -> dict[str, dict[str, Any]]:
    """q_proj and v_proj targets with the shapes of ``models.tiny_llama`` (hidden 32, 2 kv heads of 8)."""
    targets = {}
    for i in layers:
        targets[f"model.layers.{i}.self_attn.q_proj"] = {"kind": "linear", "shape": [32, 32], "r": r, "alpha": alpha}
        targets[f"model.layers.{i}.self_attn.v_proj"] = {"kind": "linear", "shape": [16, 32], "r": r, "alpha": alpha}
    return targets


def gpt2_targets(r: int = 4, alpha: float = 8) -> dict[str, dict[str, Any]]:
    """GPT-2 Conv1D targets of ``models.tiny_gpt2`` (weights stored [in, out])."""
    return {
        f"transformer.h.{i}.attn.c_attn": {"kind": "conv1d", "shape": [32, 96], "r": r, "alpha": alpha} for i in (0, 1)
    }


def bert_targets(prefix: str = "bert.", r: int = 4, alpha: float = 8) -> dict[str, dict[str, Any]]:
    """BERT query/value targets of ``models.tiny_bert``."""
    out = {}
    for i in (0, 1):
        for name in ("query", "value"):
            out[f"{prefix}encoder.layer.{i}.attention.self.{name}"] = {
                "kind": "linear", "shape": [32, 32], "r": r, "alpha": alpha,
            }
    return out


def lora_shapes(module: str, target: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Canonical LoRA keys and shapes of one target: A [r, in], B [out, r]."""
    d0, d1 = target["shape"]
    fan_in, fan_out = (d0, d1) if target["kind"] == "conv1d" else (d1, d0)
    r = target["r"]
    return {f"{module}.lora.A": (r, fan_in), f"{module}.lora.B": (fan_out, r)}


def lora_tensors(targets: Mapping[str, Mapping[str, Any]], seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Random LoRA tensors (B non-zero, so the adapter changes the model) in ``dtype``."""
    rng = np.random.default_rng(seed)
    out = {}
    for module in sorted(targets):
        for key, shape in lora_shapes(module, targets[module]).items():
            out[key] = (rng.standard_normal(shape) * 0.1).astype(np.float32).astype(NUMPY_DTYPES[dtype])
    return out


def make_lora_adapter(
    targets: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    config: Mapping[str, Any] | None = None,
    base_model: Mapping[str, Any] | None = None,
    task: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    annotations: Mapping[str, Any] | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> Adapter:
    """A LoRA adapter built without torch (default: the tiny llama q/v targets, r=4, alpha=8)."""
    targets = copy.deepcopy(dict(targets if targets is not None else llama_targets()))
    rs = {t["r"] for t in targets.values()}
    alphas = {t["alpha"] for t in targets.values()}
    default_config: dict[str, Any] = {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
    if len(rs) == 1:
        default_config["r"] = rs.pop()
    if len(alphas) == 1:
        default_config["alpha"] = alphas.pop()
    base = {"fingerprint": targets_fingerprint(targets), **(base_model or {})}
    manifest = Manifest(
        method="lora",
        config=dict(config) if config is not None else default_config,
        targets=targets,
        dtype=dtype,
        base_model=base,
        task=task,
        provenance=dict(provenance or {}),
        annotations=dict(annotations or {}),
    )
    arrays = dict(tensors) if tensors is not None else lora_tensors(targets, seed, dtype)
    return Adapter(manifest, arrays)


def write_adapter(tmp_path: Path, name: str = "adapter", **kwargs: Any) -> Path:
    """Save ``make_lora_adapter(**kwargs)`` as an adapterkit folder ``tmp_path / name``."""
    folder = Path(tmp_path) / name
    adapterkit.save(make_lora_adapter(**kwargs), folder)
    return folder


# ---- editing saved folders by hand (what a corrupting tool or a person does) ----

def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST_NAME).read_text("utf-8"))


def write_manifest(folder: Path, data: Any) -> None:
    (Path(folder) / MANIFEST_NAME).write_bytes(canonical_json(data))


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Apply ``edit`` (mutating, or returning a replacement) to adapter.json."""
    data = read_manifest(folder)
    result = edit(data)
    data = data if result is None else result
    write_manifest(folder, data)
    return data


def replace_tensor_file(folder: Path, data: bytes, name: str = TENSOR_FILE) -> None:
    """Replace a tensor file and update its sha256 and size, so only the content is wrong."""
    folder = Path(folder)
    (folder / name).write_bytes(data)

    def fix(manifest: dict[str, Any]) -> None:
        manifest["tensors"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    edit_manifest(folder, fix)


def replace_tensors(folder: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Rewrite adapter.safetensors with ``tensors`` (checksums updated)."""
    from adapterkit.core.format import safetensors_io

    replace_tensor_file(folder, safetensors_io.serialize(tensors, {"format": "pt"}))


def load_tensors(folder: Path) -> dict[str, np.ndarray]:
    from adapterkit.core.format import safetensors_io

    return safetensors_io.load(Path(folder) / TENSOR_FILE)[0]


def raw_safetensors(header: Any, data: bytes = b"", *, length: int | None = None, pad: bool = True) -> bytes:
    """Hand-made safetensors bytes: 8-byte length, JSON header (any value), data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


# ---- plugins ------------------------------------------------------------------

def registry_with(*plugins: tuple[str, object], load_entrypoints: bool = True, only: set[str] | None = None) -> Registry:
    """A fresh registry: the installed plugins (unless disabled) plus throwaway ones."""
    names = None if only is None else set(only) | {name for name, _ in plugins}
    return Registry(*get_plugin_manager(plugins=list(plugins), load_entrypoints=load_entrypoints, only=names))


def error_codes(report: Any) -> list[str]:
    return [e.code for e in report.errors]


def bits(array: np.ndarray) -> bytes:
    """The exact bytes of an array (NaN payloads and -0.0 included), with dtype and shape."""
    array = np.ascontiguousarray(array)
    return f"{array.dtype.str}{array.shape}".encode() + array.tobytes()
