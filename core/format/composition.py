"""Runtime composition blocks: which injected adapters run together, and how (docs/compose.md).

Torch-free: a composition is a small tree whose leaves are adapter names (as
injected into a model, or as named in a composition folder) and whose nodes
are blocks, named as AdapterHub names them (``adapters/composition.py``)::

    Stack("a", "b")                              # a, then b on a's output (bottleneck)
    Average("a", "b", weights=[0.7, 0.3])        # AdapterHub's Average of the outputs
    WeightedSum("a", "b", weights=[1.0, 0.5])    # sum_i w_i * output_i (LoRA: of the updates)

The runtime (:mod:`adapterkit.core.runtime.composition`) hands a block to the members'
method (:meth:`adapterkit.Method.activate_composition`); the folder format is
:mod:`adapterkit.core.store.composition_folder`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from adapterkit.core.errors import UsageError

STACK, AVERAGE, WEIGHTED_SUM = "stack", "average", "weighted_sum"
KINDS = (STACK, AVERAGE, WEIGHTED_SUM)
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"  # an adapter name: no '.', usable as a folder name
# which blocks may sit inside which (AdapterHub's ALLOWED_NESTINGS, restricted to these three)
ALLOWED_CHILDREN = {STACK: (AVERAGE, WEIGHTED_SUM), AVERAGE: (STACK,), WEIGHTED_SUM: (STACK,)}

Child = Union[str, "Block"]


class Block:
    """A composition block: ``children`` are adapter names or nested blocks."""

    kind: str = ""

    def __init__(self, *children: Child | Sequence[Child]):
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        self.children: list[Child] = [_child(c) for c in children]  # type: ignore[arg-type]

    # ---- reading --------------------------------------------------------------------
    def members(self) -> list[str]:
        """Adapter names in first-use order, each once."""
        seen: dict[str, None] = {}
        for leaf in self.leaves():
            seen.setdefault(leaf)
        return list(seen)

    def leaves(self) -> Iterator[str]:
        for child in self.children:
            if isinstance(child, Block):
                yield from child.leaves()
            else:
                yield child

    def blocks(self) -> Iterator[Block]:
        """This block and every nested one, depth first."""
        yield self
        for child in self.children:
            if isinstance(child, Block):
                yield from child.blocks()

    def kinds(self) -> list[str]:
        return sorted({b.kind for b in self.blocks()})

    @property
    def nested(self) -> bool:
        return any(isinstance(c, Block) for c in self.children)

    def first(self) -> str:
        child = self.children[0]
        return child.first() if isinstance(child, Block) else child

    def last(self) -> str:
        child = self.children[-1]
        return child.last() if isinstance(child, Block) else child

    # ---- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "children": [c.to_dict() if isinstance(c, Block) else c for c in self.children]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(repr(c) for c in self.children)
        extra = "".join(f", {k}={v!r}" for k, v in self.to_dict().items() if k not in ("type", "children"))
        return f"{type(self).__name__}({args}{extra})"


class Stack(Block):
    """Adapters one after another, each on the previous one's output (AdapterHub ``Stack``)."""

    kind = STACK


class _Weighted(Block):
    def __init__(self, *children: Child | Sequence[Child], weights: Sequence[float] | None = None):
        super().__init__(*children)
        self.weights: list[float] | None = None if weights is None else [float(w) for w in weights]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.weights is not None:
            out["weights"] = list(self.weights)
        return out


class Average(_Weighted):
    """AdapterHub's ``Average``: ``torch.mean(stack(outputs) * w)``, i.e. ``sum_i (w_i / n) * output_i``.

    ``weights`` default to ``1/n`` each and are divided by their sum unless ``normalize_weights=False``
    (AdapterHub's rule; the weights are stored as given and normalised when the block runs).
    """

    kind = AVERAGE

    def __init__(self, *children: Child | Sequence[Child], weights: Sequence[float] | None = None,
                 normalize_weights: bool = True):
        super().__init__(*children, weights=weights)
        self.normalize_weights = bool(normalize_weights)

    def normalized_weights(self) -> list[float]:
        """``w`` as AdapterHub keeps it: ``1/n`` each by default, else divided by its sum unless told not to."""
        n = len(self.children)
        if self.weights is None:
            return [1.0 / n] * n
        if self.normalize_weights:
            total = sum(self.weights)
            return [w / total for w in self.weights]
        return list(self.weights)

    def coefficients(self) -> list[float]:
        """The factor on each child's output: ``w_i / n`` (AdapterHub takes the mean of ``w_i * output_i``)."""
        n = len(self.children)
        return [w / n for w in self.normalized_weights()]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.normalize_weights:
            out["normalize_weights"] = False
        return out


class WeightedSum(_Weighted):
    """``sum_i w_i * output_i``, weights as given (default 1 each); for LoRA the outputs are the updates."""

    kind = WEIGHTED_SUM

    def coefficients(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.children)


BLOCKS: dict[str, type[Block]] = {STACK: Stack, AVERAGE: Average, WEIGHTED_SUM: WeightedSum}


def _child(value: Any) -> Child:
    if isinstance(value, (Block, str)):
        return value
    if isinstance(value, Mapping):
        return from_dict(value)
    raise UsageError("a composition child must be an adapter name or a block", found=repr(value)[:80],
                     code="bad_composition")


def from_dict(data: Mapping[str, Any]) -> Block:
    """A block from its JSON form (``{"type": ..., "children": [...], "weights": [...]}``), unchecked."""
    cls = BLOCKS.get(str(data.get("type")))
    if cls is None:
        raise UsageError("unknown composition block type", expected=list(KINDS), found=data.get("type"),
                         code="bad_composition")
    kwargs: dict[str, Any] = {}
    if cls is not Stack and data.get("weights") is not None:
        kwargs["weights"] = data["weights"]
    if cls is Average and "normalize_weights" in data:
        kwargs["normalize_weights"] = data["normalize_weights"]
    return cls(*data.get("children", []), **kwargs)


def parse(value: Any) -> Block:
    """A block from a block, a JSON dict, one adapter name (a one-adapter ``Stack``) or a list of names (a ``Stack``)."""
    if isinstance(value, Block):
        return value
    if isinstance(value, str):
        return Stack(value)
    if isinstance(value, (list, tuple)):
        return Stack(*value)
    if isinstance(value, Mapping):
        return from_dict(value)
    raise UsageError("a composition is a block (Stack, Average, WeightedSum), a dict, a name or a list of names",
                     found=type(value).__name__, code="bad_composition")


def problems(block: Block, location: str = "$") -> list[tuple[str, str]]:
    """(JSON path, message) of every structural problem: empty blocks, bad names, weights, nesting."""
    out: list[tuple[str, str]] = []
    _check(block, location, None, out)
    return out


def check(block: Block, location: str = "$", file: str | None = None) -> Block:
    """Raise UsageError (code ``bad_composition``) for the first structural problem."""
    found = problems(block, location)
    if found:
        path, message = found[0]
        raise UsageError(message, file=file, location=path, code="bad_composition")
    return block


def _check(block: Block, path: str, parent: str | None, out: list[tuple[str, str]]) -> None:
    if parent is not None and block.kind not in ALLOWED_CHILDREN[parent]:
        allowed = " or ".join(ALLOWED_CHILDREN[parent])
        out.append((path, f"a {block.kind} block cannot sit inside a {parent} block (only {allowed} can)"))
    if not block.children:
        out.append((f"{path}.children", "a block needs at least one child"))
    for index, child in enumerate(block.children):
        where = f"{path}.children[{index}]"
        if isinstance(child, Block):
            _check(child, where, block.kind, out)
        elif not re.fullmatch(NAME_PATTERN, child):
            out.append((where, f"{child!r} is not an adapter name (letters, digits, '_' and '-'; no '.')"))
    if isinstance(block, _Weighted) and block.weights is not None:
        if len(block.weights) != len(block.children):
            out.append((f"{path}.weights", f"{len(block.weights)} weights for {len(block.children)} children"))
        for index, weight in enumerate(block.weights):
            if not math.isfinite(weight):
                out.append((f"{path}.weights[{index}]", f"weight {weight} is not a finite number"))
        if isinstance(block, Average) and block.normalize_weights and block.weights and sum(block.weights) == 0:
            out.append((f"{path}.weights", "the weights sum to 0 and cannot be normalised "
                                           "(set normalize_weights to false)"))


COMPOSITION_NAME = "composition.json"


def is_composition(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding ``composition.json``."""
    path = Path(path)
    return path.is_dir() and (path / COMPOSITION_NAME).is_file()
