"""Read a local Hugging Face base model folder without loading its weights.

Only ``config.json`` and the safetensors headers are read, so checking an
adapter against a 14 GB base takes milliseconds and no torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import safetensors_io
from .errors import BaseModelError
from .io import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class WeightInfo:
    shape: tuple[int, ...]
    dtype: str
    file: str


@dataclass
class BaseModelInfo:
    path: Path
    config: dict[str, Any]
    weights: dict[str, WeightInfo]

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(w.shape) for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(math.prod(w.shape) * safetensors_io.DTYPES[w.dtype].itemsize for w in self.weights.values())

    def resolve(self, name: str) -> str | None:
        """The checkpoint key of a parameter named as in the live model.

        Checkpoints of task models sometimes carry the base-model prefix
        (``bert.encoder...``) and sometimes not; try both directions.
        """
        if name in self.weights:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self.weights:
            return rest
        for prefix in self._prefixes():
            if f"{prefix}.{name}" in self.weights:
                return f"{prefix}.{name}"
        return None

    def _prefixes(self) -> list[str]:
        return sorted({key.split(".", 1)[0] for key in self.weights if "." in key})

    def weight_shape(self, module: str) -> tuple[int, ...] | None:
        key = self.resolve(f"{module}.weight")
        return self.weights[key].shape if key else None


def read_base_model(path: str | Path) -> BaseModelInfo:
    """config.json and the tensor headers of a local HF model folder."""
    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(
            "base model folder not found", file=str(path),
            hint="pass a local Hugging Face model folder (config.json + safetensors); nothing is downloaded",
            code="base_missing",
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BaseModelError("base model folder has no config.json", file=str(path), code="base_missing")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise BaseModelError("config.json must be a JSON object", file=str(config_path), code="base_invalid")
    files = weight_files(path)
    weights: dict[str, WeightInfo] = {}
    for file in files:
        header = safetensors_io.read_header(file)
        for key, info in header.tensors.items():
            weights[key] = WeightInfo(info.shape, info.dtype, file.name)
    return BaseModelInfo(path, config, weights)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (the index's shards, or the single file)."""
    index = path / INDEX_NAME
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise BaseModelError("index has no weight_map object", file=str(index), location="$.weight_map", code="base_invalid")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise BaseModelError("index names a shard outside the folder", file=str(index), found=name, code="base_invalid")
        return [path / name for name in names]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise BaseModelError(
        "base model folder has no safetensors weights", file=str(path),
        hint="save the model with save_pretrained(safe_serialization=True)", code="base_missing",
    )


def fingerprint(shapes: Iterable[tuple[str, Iterable[int]]]) -> str:
    """sha256 over sorted ``<module>.weight:<d0>x<d1>...`` lines (docs/format.md, Fingerprint)."""
    lines = sorted(f"{module}.weight:{'x'.join(str(int(d)) for d in shape)}\n" for module, shape in shapes)
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def targets_fingerprint(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """The fingerprint a base must have for these manifest targets."""
    return fingerprint((module, target["shape"]) for module, target in targets.items())
