"""The files of a PEFT adapter folder: names, finding them, reading them strictly, writing them as PEFT does.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``json.dumps(indent=2,
sort_keys=True)``) and ``adapter_model.safetensors`` (``{"format": "pt"}`` metadata), or
``adapter_model.bin`` (``torch.save``) with ``safe_serialization=False``; an adapter saved under a
name other than ``default`` goes into a sub-folder of that name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import read_torch_tensors
from adapterkit.core.errors import AdapterkitError, FormatError
from adapterkit.core.format import safetensors_io
from adapterkit.core.io import atomic_write_bytes, read_json

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
#: the safetensors metadata PEFT writes; a codec's metadata is added to it
PEFT_METADATA = {"format": "pt"}
_RESAVE = "save the adapter again with PeftModel.save_pretrained (safetensors)"


def adapter_folder(path: Path) -> Path:
    """The adapter folder of ``path``: itself, or the parent of a file PEFT writes."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        return path.parent
    return path


def weights_file(folder: Path) -> Path | None:
    """The tensor file PEFT would load: safetensors first, then the pickle."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def subfolder_hint(folder: Path) -> str | None:
    """Where the adapters are when ``folder`` holds named adapters in sub-folders (None otherwise)."""
    if not folder.is_dir():
        return None
    names = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
    if names:
        return f"adapters saved under a non-default name live in subfolders; point at one of {names}"
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``folder``: strict JSON (no duplicate keys, no NaN, size cap), an object."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FormatError(f"no {CONFIG_NAME} in the folder", file=str(folder),
                          hint=subfolder_hint(folder) or "point at the folder PeftModel.save_pretrained wrote",
                          code="missing_file")
    try:
        config = read_json(path)
    except AdapterkitError as exc:
        raise FormatError(exc.message, file=exc.file, location=exc.location, found=exc.found, hint=exc.hint,
                          code=exc.code) from None
    if not isinstance(config, dict):
        raise FormatError("must be a JSON object", file=str(path), location="$", found=type(config).__name__,
                          hint="fix the value in adapter_config.json (PEFT itself could not load it)", code="bad_config")
    return config


def require_weights(folder: Path) -> Path:
    """The tensor file of ``folder`` (:func:`weights_file`), or a FormatError saying it is missing."""
    path = weights_file(folder)
    if path is None:
        raise FormatError(f"no {SAFETENSORS_NAME} or {BIN_NAME} beside {CONFIG_NAME}", file=str(folder),
                          hint="copy the adapter's tensor file into the folder", code="missing_file")
    return path


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors under the file's keys, safetensors metadata)``; a ``.bin`` goes through
    :func:`adapterkit.read_torch_tensors` (weights only, sizes checked first) and has no metadata.
    Empty tensors are returned as they are (PEFT saves AdaLoRA modules pruned to rank 0 that way)."""
    if path.name == BIN_NAME:
        return read_torch_tensors(path, hint=_RESAVE), {}
    tensors, metadata = safetensors_io.load(path)
    return tensors, dict(metadata or {})


def write_folder(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                 metadata: Mapping[str, str]) -> None:
    """``adapter_config.json`` as PEFT writes it, then ``adapter_model.safetensors`` with ``metadata``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    safetensors_io.save(folder / SAFETENSORS_NAME, tensors, {**PEFT_METADATA, **metadata})
