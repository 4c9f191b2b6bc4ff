"""Config fields a writer computes so that PEFT, applying its own rules, gets exactly the adapter back.

- :func:`selection`: ``target_modules`` (and friends) that select exactly the adapted modules;
- :func:`patterns`: a default and a ``rank_pattern``-style map that give each module its value.

Both prefer what the original PEFT config said when it still holds, so a round trip gives back the
same fields. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from adapterkit import pattern_value

from .rules import SELECTION_FIELDS, same, selects

_LAYER_FIELDS = ("layers_to_transform", "layers_pattern")


def selection(modules: Iterable[str], original: Mapping[str, Any], wanted: Any = None, layers: Any = None,
              universe: set[str] | None = None, layered: bool = True, portable: bool = False) -> dict[str, Any]:
    """``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern`` selecting exactly
    ``modules`` under PEFT's rules: the original config's when they do, else ``wanted`` (a method config's
    names or regex) with ``layers``, else the modules' last names, else an exact regex.

    :param universe: every module path of the base model; without it, names are trusted only when every
        repeated block is adapted alike (:func:`looks_complete`).
    :param layered: whether the peft_type's config has ``layers_to_transform`` / ``layers_pattern`` (LoRA's
        has, IA3's has not: then they are neither used nor written).
    :param portable: a selection every PEFT release reads alike (``--peft-version``): ``target_modules``
        only, a list of names or an exact regex (``re.fullmatch`` in every release). ``exclude_modules``
        came with 0.14, and how ``layers_to_transform`` finds a layer number changed over the releases;
        releases before 0.6 match a name as a plain suffix (``k.endswith(name)``), so with a base a list of
        names must select exactly the adapted modules under that rule too.
    """
    if not layered:
        if layers is not None:
            raise ValueError("layers needs a config with layers_to_transform (layered=True)")
        chosen = selection(modules, {k: v for k, v in original.items() if k not in _LAYER_FIELDS}, wanted, None,
                           universe, portable=portable)
        return {k: v for k, v in chosen.items() if k not in _LAYER_FIELDS}
    modules = set(modules)

    def exact(candidate: Mapping[str, Any]) -> bool:
        if portable and any(candidate.get(k) not in (None, [], "") for k in (*_LAYER_FIELDS, "exclude_modules")):
            return False
        if not all(selects(candidate, m) for m in modules):
            return False
        if universe is None:
            return True
        if {m for m in universe | modules if selects(candidate, m)} != modules:
            return False
        names = candidate.get("target_modules")
        return not (portable and isinstance(names, list)) or {
            m for m in universe | modules if any(m.endswith(name) for name in names)} == modules

    if original and exact(original):
        return {k: original[k] for k in SELECTION_FIELDS if k in original}
    if portable and layers is not None:
        wanted = None  # the layers go into the exact regex below
    if isinstance(wanted, (list, str)) and wanted != "all-linear":
        candidate = {"target_modules": wanted, "layers_to_transform": layers, "layers_pattern": None}
        if exact(candidate):
            return {**candidate, "exclude_modules": None}
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    candidate = {"target_modules": leaves, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
    if exact(candidate) and (universe is not None or looks_complete(modules)):
        return candidate
    return {**candidate, "target_modules": exact_regex(modules)}


def module_universe(base: Any) -> set[str] | None:
    """Module paths of the base model (from its weight names), or None without a base."""
    if base is None:
        return None
    from adapterkit.core.format.base_model import BaseModelInfo, read_base_model

    info = base if isinstance(base, BaseModelInfo) else read_base_model(base)
    return {key.rsplit(".", 1)[0] for key in info.weights if "." in key}


def _is_index(part: str) -> bool:
    """A block number as nn.ModuleList writes it (no sign, no leading zero)."""
    return part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0"))


def _template(module: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``model.layers.3.mlp`` -> (("model", "layers", "#", "mlp"), (3,))."""
    parts = module.split(".")
    return tuple("#" if _is_index(p) else p for p in parts), tuple(int(p) for p in parts if _is_index(p))


def looks_complete(modules: set[str]) -> bool:
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


# ---- per-module values -------------------------------------------------------------

def resolves(default: Any, pattern: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """Whether PEFT, reading ``default`` and ``pattern`` (in the order ``sort_keys`` writes it), gives every
    module of ``values`` its value."""
    ordered = dict(sorted(pattern.items()))
    return all(same(pattern_value(module, ordered, default), value) for module, value in values.items())


def patterns(values: Mapping[str, Any], keep: tuple[Any, Mapping[str, Any] | None] | None = None
             ) -> tuple[Any, dict[str, Any]]:
    """``(default, pattern map)`` giving each module of ``values`` its value under PEFT's pattern rule.

    ``keep`` (e.g. the original config's ``r`` and ``rank_pattern``) is returned when it resolves exactly;
    otherwise the most common value (ties: the smaller number) is the default and each other module gets
    an entry under its full path, escaped when a plain path would also match other modules.
    """
    if keep is not None and keep[0] is not None:
        default, pattern = keep[0], dict(keep[1] or {})
        if resolves(default, pattern, values):
            return default, pattern
    counts = Counter(values.values())
    default = max(counts, key=lambda v: (counts[v], _tie_break(v)))
    for escape in (False, True):
        pattern = {(re.escape(m) if escape else m): v for m, v in sorted(values.items()) if not same(v, default)}
        if resolves(default, pattern, values):
            return default, pattern
    raise AssertionError("escaped full-path patterns must resolve exactly")  # pragma: no cover


def _tie_break(value: Any) -> float:
    """Among equally common values, the smaller number wins (others keep their first-seen order)."""
    return -float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
