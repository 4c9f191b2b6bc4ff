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

from adapterkit.core.errors import BaseModelError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.targeting import weight_name
from adapterkit.core.io import read_json

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

    def target_shape(self, module: str, target: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The shape of the tensor a manifest target changes (:func:`weight_name`), stored whole or as
        :meth:`stacked_slices`; None when the base has neither."""
        name = weight_name(module, target)
        key = self.resolve(name)
        if key is not None:
            return self.weights[key].shape
        slices = self.stacked_slices(name)
        return stacked_shape(slices, self.weights) if slices else None

    def stacked_slices(self, name: str) -> list[StackedSlice] | None:
        """How the checkpoint stores a stacked parameter ``name`` (``[n, rows, cols]``) that it does not hold
        whole: one ``[rows_i, cols]`` matrix per index and part, or None.

        transformers fuses per-expert matrices into one parameter when it loads a checkpoint and splits
        them again when it saves (its conversion mapping); :data:`STACKED_PARTS` restates the names.
        """
        container, _, leaf = name.rpartition(".")
        for parts in STACKED_PARTS.get(leaf, ()):
            for where in _containers(container):
                slices: list[StackedSlice] = []
                index = 0
                while True:
                    keys = [self.resolve(f"{where}.{index}.{part}.weight") for part in parts]
                    if any(key is None or len(self.weights[key].shape) != 2 for key in keys):
                        break
                    start = 0
                    for key in keys:
                        assert key is not None
                        rows = self.weights[key].shape[0]
                        slices.append(StackedSlice(key, index, start, start + rows))
                        start += rows
                    index += 1
                if slices:
                    return slices
        return None


#: per-index checkpoint names of a stacked parameter, tried in order: ``<container>.<i>.<part>.weight``,
#: the parts concatenated along rows (transformers' checkpoint conversion: Qwen2/3-MoE, OLMoE,
#: DeepSeek-V3 ... and Mixtral)
STACKED_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
#: container renamings transformers applies on load (Mixtral's ``block_sparse_moe`` becomes ``mlp``)
CONTAINER_RENAMES = ((".mlp.experts", ".block_sparse_moe.experts"),)


def _containers(container: str) -> list[str]:
    out = [container]
    for new, old in CONTAINER_RENAMES:
        if new in f"{container}":
            out.append(container.replace(new, old))
    return out


@dataclass(frozen=True)
class StackedSlice:
    """One stored matrix of a stacked parameter: rows ``start:stop`` of ``parameter[index]``."""

    key: str
    index: int
    start: int
    stop: int


def stacked_shape(slices: list[StackedSlice], weights: Mapping[str, WeightInfo]) -> tuple[int, ...] | None:
    """``[n, rows, cols]`` of the parameter ``slices`` make up, or None when they do not tile one."""
    count = max(s.index for s in slices) + 1
    rows = max(s.stop for s in slices)
    cols = {weights[s.key].shape[1] for s in slices}
    per_index = [sorted((s.start, s.stop) for s in slices if s.index == i) for i in range(count)]
    if len(cols) != 1 or any(p != per_index[0] for p in per_index):
        return None
    return (count, rows, cols.pop())


def base_fields(base: Any) -> dict[str, str]:
    """The manifest's ``base_model`` fields a base gives, ``model_type`` and ``architecture``: a live model's
    ``config`` (the architecture its class name when the config lists none), a :class:`BaseModelInfo`'s, or a
    local folder's (read)."""
    if hasattr(base, "named_modules"):
        config = getattr(base, "config", None)
        archs = getattr(config, "architectures", None) or [type(base).__name__]
        fields = {"model_type": getattr(config, "model_type", None), "architecture": archs[0]}
    else:
        info = base if isinstance(base, BaseModelInfo) else read_base_model(base)
        fields = {"model_type": info.model_type, "architecture": info.architecture}
    return {k: v for k, v in fields.items() if isinstance(v, str) and v}


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


def fingerprint(shapes: Iterable[tuple[str, Iterable[int]]], parameters: Iterable[str] = ()) -> str:
    """sha256 over sorted ``<module>.weight:<d0>x<d1>...`` lines (docs/format.md, Fingerprint); a module of
    ``parameters`` (a ``parameter`` target) names the tensor itself: ``<path>:<d0>x...``."""
    named = set(parameters)
    lines = sorted(f"{module if module in named else module + '.weight'}:{'x'.join(str(int(d)) for d in shape)}\n"
                   for module, shape in shapes)
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def parameter_targets(targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The targets that name a parameter, not a module (:func:`weight_name` is the path itself)."""
    return [module for module, target in targets.items() if weight_name(module, target) == module]


def targets_fingerprint(targets: Mapping[str, Mapping[str, Any]]) -> str:
    """The fingerprint a base must have for these manifest targets."""
    return fingerprint(((module, target["shape"]) for module, target in targets.items()), parameter_targets(targets))
