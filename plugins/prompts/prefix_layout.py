"""The prefix-tuning layout: targets, canonical keys and the per-layer plan. Torch-free.

Targets are the attention key and value projections of every layer (kind
``key_proj`` / ``value_proj``), or the fused projection (``qkv_proj``, e.g.
GPT-2's ``c_attn``). Tensors, ``n`` = num_virtual_tokens,
``kv_dim = heads * head_dim`` (key/value heads: grouped-query attention is
respected):

- ``<key projection>.prefix.key``     ``[n, kv_dim]``
- ``<value projection>.prefix.value`` ``[n, kv_dim]``
- a fused projection holds both.

A row is one virtual token's key (or value) for all heads, heads major, as the
projection's output is laid out; as a cache entry it is
``row.view(heads, head_dim)``. Prefix keys are cache entries: no rotary
embedding is applied to them (PEFT's convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterkit.core.errors import BaseModelError
from .prompt_layout import KEY_PROJ, QKV_PROJ, VALUE_PROJ, ModelDims, find_kv_projections

METHOD = "prefix"
KINDS = (KEY_PROJ, VALUE_PROJ, QKV_PROJ)
PARAMS = {KEY_PROJ: ("key",), VALUE_PROJ: ("value",), QKV_PROJ: ("key", "value")}


@dataclass(frozen=True)
class LayerPlan:
    """One cache layer: where its key and value prefixes are keyed, and their head layout."""

    layer: int
    key: str    # canonical key of the key prefix
    value: str  # canonical key of the value prefix
    heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.heads * self.head_dim


def tensor_key(module: str, param: str) -> str:
    return f"{module}.{METHOD}.{param}"


def prefix_targets(shapes: Mapping[str, Sequence[int]], dims: ModelDims) -> dict[str, dict[str, Any]]:
    """The targets of a model, from its weights (module path -> weight shape) and dimensions."""
    if not dims.num_layers or not dims.kv_heads or not dims.head_dim:
        raise BaseModelError(
            "the model config does not give the number of layers, key/value heads and head size",
            expected="num_hidden_layers, num_attention_heads (num_key_value_heads, head_dim)",
            hint="prefix tuning needs a transformers decoder model with a standard config", code="bad_model",
        )
    targets: dict[str, dict[str, Any]] = {}
    for index, kinds in find_kv_projections(shapes, dims.num_layers).items():
        for kind, path in kinds.items():
            targets[path] = {"kind": kind, "shape": [int(d) for d in shapes[path]], "layer": index,
                             "heads": dims.kv_heads, "head_dim": dims.head_dim}
    return targets


def layer_plans(targets: Mapping[str, Mapping[str, Any]]) -> list[LayerPlan]:
    """Per cache layer 0 .. L-1, the keys of its prefixes; checks every layer has one key and one value."""
    slots: dict[int, dict[str, tuple[str, int, int]]] = {}
    for module, target in targets.items():
        kind, layer = target.get("kind"), target.get("layer")
        if kind not in PARAMS or not isinstance(layer, int):
            raise BaseModelError(f"target {module} is not a prefix-tuning target", location=module,
                                 expected=f"kind in {list(KINDS)} and an integer layer", found=kind, code="bad_target")
        for param in PARAMS[kind]:
            if param in slots.setdefault(layer, {}):
                raise BaseModelError(f"layer {layer} has two {param} prefixes", location=module,
                                     found=[slots[layer][param][0], tensor_key(module, param)], code="bad_target")
            slots[layer][param] = (tensor_key(module, param), int(target["heads"]), int(target["head_dim"]))
    plans = []
    for layer in range(len(slots)):
        slot = slots.get(layer, {})
        if set(slot) != {"key", "value"}:
            raise BaseModelError(
                f"layer {layer} lacks a {'key' if 'key' not in slot else 'value'} prefix" if layer in slots
                else f"layer {layer} has no prefix (layers must run 0 .. {len(slots) - 1})",
                location="$.targets", hint="every layer needs a key and a value prefix", code="bad_target",
            )
        (key, heads, head_dim), (value, vheads, vhead_dim) = slot["key"], slot["value"]
        if (heads, head_dim) != (vheads, vhead_dim):
            raise BaseModelError(f"layer {layer}: key and value prefixes have different head layouts",
                                 found=[[heads, head_dim], [vheads, vhead_dim]], code="bad_target")
        plans.append(LayerPlan(layer, key, value, heads, head_dim))
    if len({p.kv_dim for p in plans}) > 1:
        raise BaseModelError("layers with different key/value widths are not supported",
                             found=sorted({p.kv_dim for p in plans}), code="unsupported")
    return plans


def expected(module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    count = int(config.get("num_virtual_tokens", 20))
    width = int(target["heads"]) * int(target["head_dim"])
    return {tensor_key(module, param): (count, width) for param in PARAMS[target["kind"]]}


def target_problems(target: Mapping[str, Any]) -> list[str]:
    problems = []
    kind, shape = target.get("kind"), target.get("shape")
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is not a prefix-tuning target; expected one of {list(KINDS)}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_positive(d) for d in shape)):
        problems.append(f"shape {shape!r} is not a 2-d weight shape")
    layer = target.get("layer")
    if not (isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0):
        problems.append(f"layer is {layer!r}; it must be an integer >= 0")
    for field in ("heads", "head_dim"):
        if not _positive(target.get(field)):
            problems.append(f"{field} is {target.get(field)!r}; it must be an integer >= 1")
    return problems


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
