"""Which modules an adapter targets: the string rules, torch-free (PEFT's, restated).

- ``target_modules`` as a list: a module matches when its path equals an entry or
  ends with ``"." + entry`` (whole dotted components), so ``"self_attn.q_proj"`` and
  ``"q_proj"`` both work.
- ``target_modules`` as a string: a regex full-matched against the module path,
  except ``"all-linear"``: every supported linear module but the output head.
- a pattern map (``rank_pattern``, ``alpha_pattern``): key ``k`` matches path ``m``
  when ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.
- ``layers_to_transform``: the layer index of a module is the first all-digit
  component after a named one (``model.layers.3.mlp.up_proj`` -> 3), or after the
  ``layers_pattern`` component; it does not apply to a regex ``target_modules`` nor to a
  path named whole; ``exclude_modules`` (names or a regex) wins over everything
  (:func:`selects`, PEFT's ``check_target_module_exists``).

:func:`adapterkit.select_modules` applies them to a live model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

ALL_LINEAR = "all-linear"
#: last path components that name a task or output head, never selected by "all-linear"
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "embed_out", "output", "qa_outputs"})
LINEAR, CONV1D = "linear", "conv1d"
#: the kind of a target that names a model parameter itself (``<module>.<parameter>``, e.g. a fused
#: ``[experts, out, in]`` expert tensor), not a module whose ``weight`` is adapted
PARAMETER = "parameter"


def is_stacked(target: Mapping[str, Any]) -> bool:
    """Whether a target is a stacked ``parameter`` (``[n, d1, d2]``: one low-rank pair per index of its first
    axis, e.g. the experts of a mixture-of-experts layer)."""
    return target.get("kind") == PARAMETER and len(target.get("shape") or ()) == 3


def weight_name(path: str, target: Mapping[str, Any]) -> str:
    """The base tensor a target changes: ``path`` itself for a ``parameter`` target, else ``<path>.weight``."""
    return path if target.get("kind") == PARAMETER else f"{path}.weight"


def matches_target(path: str, target_modules: str | Sequence[str]) -> bool:
    """Whether ``path`` is selected by ``target_modules`` (``"all-linear"`` is the caller's to handle)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in target_modules)


def pattern_value(path: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """The value of the first key of ``patterns`` matching ``path`` (PEFT's rule), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer number PEFT reads from a module path, or None.

    Without ``layers_pattern``: the first all-digit component that follows a named one and is followed by
    another (``model.layers.3.mlp.up_proj`` -> 3; ``layers.3.fc`` -> None, as in PEFT). With it (a regex or a
    list of regexes naming the module list, e.g. ``"h"``): the number right after the first component it
    matches (``transformer.h.3.attn.c_attn`` -> 3).
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match["idx"]) if match else None


def excluded(path: str, exclude_modules: str | Sequence[str] | None) -> bool:
    """Whether ``exclude_modules`` (names or a full-match regex, PEFT's field) excludes ``path``."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, path) is not None
    return path in exclude_modules or any(path.endswith(f".{name}") for name in exclude_modules)


def in_layers(path: str, layers_to_transform: int | Sequence[int] | None,
              layers_pattern: str | Sequence[str] | None = None) -> bool:
    """Whether ``path`` is in ``layers_to_transform`` (None or an empty list: every layer)."""
    if layers_to_transform is None or (not isinstance(layers_to_transform, int) and len(layers_to_transform) == 0):
        return True
    index = layer_index(path, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def selects(path: str, target_modules: str | Sequence[str] | None, *,
            layers_to_transform: int | Sequence[int] | None = None, layers_pattern: str | Sequence[str] | None = None,
            exclude_modules: str | Sequence[str] | None = None) -> bool:
    """Whether PEFT adapts the module at ``path`` (``check_target_module_exists``): not excluded; a regex
    ``target_modules`` full-matches the path (the layer fields do not apply); a path named whole in the list
    is selected; else a name the path ends with, in ``layers_to_transform`` when given."""
    if excluded(path, exclude_modules) or target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    if path in target_modules:
        return True
    if not any(path.endswith(f".{name}") for name in target_modules):
        return False
    return in_layers(path, layers_to_transform, layers_pattern)


def in_out_features(kind: str, shape: Sequence[int]) -> tuple[int, int]:
    """(in, out) of a module from its kind and stored weight shape (a GPT-2 Conv1D stores ``[in, out]``)."""
    return (int(shape[0]), int(shape[1])) if kind == CONV1D else (int(shape[1]), int(shape[0]))


def is_head(path: str) -> bool:
    """Whether ``path`` names an output or task head by its last component."""
    return path.rsplit(".", 1)[-1] in HEAD_NAMES
