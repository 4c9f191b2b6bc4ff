"""What ``merge`` will write: the output tensors of every shard, decided from headers only.

:func:`plan_merge` checks the adapter against the base (module present, shape,
float dtype, not quantized), resolves tied output heads, and lists for each
output shard the tensors it will hold, each with its source and output dtype.
No tensor data is read here, so every refusal happens before a byte is written.

Tied weights: a head tied to the input embeddings (``tie_word_embeddings``)
is usually absent from the checkpoint. When an adapter changes it, the merged
model must no longer tie: the head is written as its own tensor (embedding +
delta, in the embedding's shard) and ``tie_word_embeddings`` is set to false,
so the input embeddings stay unchanged. An adapted head that is stored but
tied also gets ``tie_word_embeddings: false``. Changing a tied *input*
embedding is refused unless the head is stored separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.core.errors import BaseModelError, UsageError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import INDEX_NAME, BaseModelInfo, stacked_shape, weight_files
from adapterkit.core.format.module_index import EMBEDDING_NAMES, ModuleIndex, is_tied_head, last, may_tie, resolve_targets
from adapterkit.core.format.targeting import PARAMETER, weight_name

#: --dtype values: output dtype of every floating-point tensor ("auto" keeps each tensor's own)
DTYPE_CHOICES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
#: floating dtypes a weight may have to be merged into (float8 is a quantized format here)
MERGEABLE_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass
class OutTensor:
    """One tensor of an output shard."""

    key: str
    dtype: str  # safetensors dtype name of the output
    shape: tuple[int, ...]
    source: safetensors_io.TensorInfo  # where the base values are read from
    module: str | None = None  # the module whose weight this is, when the method changes it
    target: Mapping[str, Any] | None = None
    #: "update": an adapted module (merged_weight, or base + delta_weight);
    #: "base": a module the method rewrites without adapting it (base_weight; QLoRA's quantisation);
    #: "bias": an adapted module's bias, which the method rewrites too (merged_bias)
    how: str = "update"
    #: a stacked parameter stored as per-index matrices: ``(index, first row, stop row)`` of the
    #: parameter's update this tensor takes (``BaseModelInfo.stacked_slices``)
    part: tuple[int, int, int] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * safetensors_io.DTYPES[self.dtype].itemsize


@dataclass
class Shard:
    """One output file: same name as the base shard it is made from."""

    name: str
    source: Path
    metadata: dict[str, str]
    tensors: list[OutTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    shards: list[Shard]
    config_updates: dict[str, Any] = field(default_factory=dict)
    untie: bool = False
    has_index: bool = False
    added_parameters: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def output_dtype(dtype: str | None) -> str | None:
    """The safetensors dtype name for ``--dtype`` (None for ``auto`` / not given)."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown output dtype {dtype!r}", expected=[*DTYPE_CHOICES, "auto"], found=dtype,
                         code="bad_dtype")
    return DTYPE_CHOICES[dtype]


_may_tie, _last, _is_head = may_tie, last, is_tied_head


def plan_merge(adapter: Adapter, base: BaseModelInfo, dtype: str | None = None,
               rewritten: Mapping[str, Mapping[str, Any]] | None = None, biases: bool = False) -> MergePlan:
    """Check ``adapter`` against ``base`` and decide every output tensor (headers only).

    ``rewritten``: modules the method changes without adapting them (path -> ``{"kind", "shape"}``),
    written through the method's ``base_weight``. ``biases``: the method also rewrites each adapted
    module's stored bias (its ``merged_bias``; (IA)^3 scales a module's whole output).
    """
    config = base.config
    base_dir = str(base.path)
    if config.get("quantization_config"):
        raise BaseModelError(
            "the base model is quantized (config.json has quantization_config); a merge needs the full-precision base",
            file=str(base.path / "config.json"), location="quantization_config",
            hint="merge into the unquantized base model the adapter was trained on", code="quantized_base",
        )
    want_type = adapter.manifest.base_model.get("model_type")
    if want_type and base.model_type and want_type != base.model_type:
        raise BaseModelError("base model_type differs from the one the adapter was made for",
                             file=str(base.path / "config.json"), location="model_type", expected=want_type,
                             found=base.model_type, hint="pass the base model the adapter was trained on",
                             code="wrong_base")
    out_dtype = output_dtype(dtype)
    may_tie = _may_tie(config)
    headers = {f.name: safetensors_io.read_header(f) for f in weight_files(base.path)}
    adapted: dict[str, tuple[str, Mapping[str, Any], str]] = {}  # checkpoint key -> (module, target, how)
    parts: dict[str, tuple[int, int, int]] = {}  # checkpoint key -> slice of a stacked parameter's update
    added: dict[str, tuple[str, str, Mapping[str, Any]]] = {}  # new key -> (source key, module, target)
    untie = False
    index = ModuleIndex.from_base(base)
    modules = {m: t for m, t in adapter.targets.items() if t.get("kind") != PARAMETER}
    landings, problems = resolve_targets(modules, index)  # the resolution validate and apply use
    problem_of = {p.location.removesuffix(".weight"): p for p in problems if p.location}
    for module, target in sorted(adapter.targets.items()):
        shape = [int(d) for d in target["shape"]]
        if module not in modules:  # a parameter target: the tensor itself, stored whole or per expert
            key = base.resolve(weight_name(module, target))
            if key is None:
                _plan_stacked(base, module, target, shape, adapted, parts)
                continue
            if list(base.weights[key].shape) != shape:
                raise BaseModelError("base weight shape differs from the adapter's target", file=base_dir,
                                     location=key, expected=shape, found=list(base.weights[key].shape),
                                     hint="the adapter was made for another base model", code="wrong_base")
        else:
            landing = landings.get(module)
            if landing is None:
                if module not in index and may_tie and _is_head(module):
                    _tied_source(base, module, shape, may_tie)  # raises the precise error when the tie cannot be told
                raise problem_of.get(module) or problems[0]
            if landing.tied_to is not None:
                added[f"{module}.weight"] = (landing.tied_to, module, target)
                untie = True
                continue
            key = landing.key
            assert key is not None  # a checkpoint index lands every stored module on its key
        info = base.weights[key]
        if info.dtype not in MERGEABLE_DTYPES:
            raise BaseModelError(f"base weight is stored as {info.dtype}; only float weights can take a merge",
                                 file=base_dir, location=key, expected=sorted(MERGEABLE_DTYPES), found=info.dtype,
                                 hint="merge into the full-precision base model", code="quantized_base")
        if may_tie and (target.get("kind") == "embedding" or _last(module) in EMBEDDING_NAMES):
            if not any(_is_head(k.removesuffix(".weight")) for k in base.weights):
                raise BaseModelError(
                    "the adapter changes the input embeddings, which the base ties to its output head "
                    "(tie_word_embeddings); merging would change the head too", file=base_dir, location=key,
                    hint="set tie_word_embeddings to false and store the head's weight in the base first",
                    code="tied_weights")
            untie = True
        if may_tie and _is_head(module):
            untie = True  # stored but tied: from_pretrained would re-tie it and drop the merge
        adapted[key] = (module, target, "update")
        bias_key = key.removesuffix(".weight") + ".bias" if biases else None
        if bias_key is not None and bias_key in base.weights and base.weights[bias_key].dtype in MERGEABLE_DTYPES:
            adapted[bias_key] = (module, target, "bias")
    for module, target in sorted((rewritten or {}).items()):
        landing = index.land(module)
        key = landing.key if landing is not None else None
        if module in adapter.targets or key is None or key in adapted:
            continue
        info = base.weights[key]
        if list(info.shape) != [int(d) for d in target["shape"]] or info.dtype not in MERGEABLE_DTYPES:
            raise BaseModelError("the method rewrites a base weight whose shape or dtype differs from what it expects",
                                 file=base_dir, location=key, expected=list(target["shape"]),
                                 found=[list(info.shape), info.dtype], code="wrong_base")
        adapted[key] = (module, target, "base")

    shards = []
    for name, header in headers.items():
        tensors = []
        for key, info in header.tensors.items():
            module, target, how = adapted.get(key, (None, None, "update"))
            tensors.append(OutTensor(key, _out_dtype(info.dtype, out_dtype), info.shape, info, module, target, how,
                                     parts.get(key)))
        for new_key, (source, module, target) in added.items():
            if base.weights[source].file == name:
                info = header.tensors[source]
                tensors.append(OutTensor(new_key, _out_dtype(info.dtype, out_dtype), info.shape, info, module, target))
        tensors.sort(key=lambda t: t.key)
        shards.append(Shard(name, Path(header.path), dict(header.metadata), tensors))

    updates: dict[str, Any] = {}
    if out_dtype is not None:
        updates["dtype"] = next(k for k, v in DTYPE_CHOICES.items() if v == out_dtype)
    if untie:
        updates["tie_word_embeddings"] = False
    added_parameters = sum(math.prod(base.weights[s].shape) for s, _, _ in added.values())
    return MergePlan(shards, updates, untie, (base.path / INDEX_NAME).is_file(), added_parameters)


def _plan_stacked(base: BaseModelInfo, module: str, target: Mapping[str, Any], shape: list[int],
                  adapted: dict[str, tuple[str, Mapping[str, Any], str]], parts: dict[str, tuple[int, int, int]]) -> None:
    """A parameter target the checkpoint stores as per-index matrices: each one takes its slice of the update."""
    base_dir = str(base.path)
    slices = base.stacked_slices(module)
    if not slices:
        raise BaseModelError("adapted parameter does not exist in the base model", file=base_dir, location=module,
                             hint="is this the right base model?", code="wrong_base")
    found = stacked_shape(slices, base.weights)
    if found is None or list(found) != shape:
        raise BaseModelError("base parameter shape differs from the adapter's target", file=base_dir, location=module,
                             expected=shape, found=list(found) if found else [s.key for s in slices[:3]],
                             hint="the adapter was made for another base model", code="wrong_base")
    for piece in slices:
        dtype = base.weights[piece.key].dtype
        if dtype not in MERGEABLE_DTYPES:
            raise BaseModelError(f"base weight is stored as {dtype}; only float weights can take a merge",
                                 file=base_dir, location=piece.key, expected=sorted(MERGEABLE_DTYPES), found=dtype,
                                 hint="merge into the full-precision base model", code="quantized_base")
        adapted[piece.key] = (module, target, "update")
        parts[piece.key] = (piece.index, piece.start, piece.stop)


def _out_dtype(stored: str, wanted: str | None) -> str:
    """Cast floats to ``wanted``; integers, bools and float8 (quantized data) keep their dtype."""
    return wanted if wanted is not None and stored in MERGEABLE_DTYPES else stored


def _tied_source(base: BaseModelInfo, module: str, shape: list[int], may_tie: bool) -> str:
    """The input-embedding key a missing (tied) head shares its weight with, or a clear refusal."""
    base_dir = str(base.path)
    if not (may_tie and _is_head(module)):
        raise BaseModelError("adapted module does not exist in the base model", file=base_dir,
                             location=f"{module}.weight", hint="is this the right base model?", code="wrong_base")
    candidates = [
        key for key, info in base.weights.items()
        if key.endswith(".weight") and _last(key.removesuffix(".weight")) in EMBEDDING_NAMES
        and list(info.shape) == shape and info.dtype in MERGEABLE_DTYPES
    ]
    if len(candidates) != 1:
        raise BaseModelError(
            f"{module}.weight is not stored in the base (a tied weight?) and its source cannot be told: "
            f"{len(candidates)} input embeddings of shape {shape} found",
            file=base_dir, location=f"{module}.weight", found=sorted(candidates),
            hint="store the weight explicitly in the base (untie it) and merge again", code="tied_weights",
        )
    return candidates[0]
