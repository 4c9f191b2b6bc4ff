"""Which modules an adapter targets: the string rules, torch-free (PEFT's, restated).

- ``target_modules`` as a list: a module matches when its path equals an entry or
  ends with ``"." + entry`` (whole dotted components), so ``"self_attn.q_proj"`` and
  ``"q_proj"`` both work.
- ``target_modules`` as a string: a regex full-matched against the module path,
  except ``"all-linear"``: every supported linear module but the output head.
- a pattern map (``rank_pattern``, ``alpha_pattern``): key ``k`` matches path ``m``
  when ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.
- ``layers_to_transform``: the layer index of a module is the first all-digit
  component of its path (``model.layers.3.mlp.up_proj`` -> 3).

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
    """The block index of ``path``: its first all-digit component, or None.

    With ``layers_pattern`` (a name or names of the module list, PEFT's field of that name), the
    number right after the first component equal to one of them (``"h"`` in ``transformer.h.3.attn``).
    """
    parts = path.split(".")
    if layers_pattern:
        names = {layers_pattern} if isinstance(layers_pattern, str) else set(layers_pattern)
        for part, after in zip(parts, parts[1:]):
            if part in names and after.isdigit():
                return int(after)
        return None
    for part in parts:
        if part.isdigit():
            return int(part)
    return None


def in_out_features(kind: str, shape: Sequence[int]) -> tuple[int, int]:
    """(in, out) of a module from its kind and stored weight shape (a GPT-2 Conv1D stores ``[in, out]``)."""
    return (int(shape[0]), int(shape[1])) if kind == CONV1D else (int(shape[1]), int(shape[0]))


def is_head(path: str) -> bool:
    """Whether ``path`` names an output or task head by its last component."""
    return path.rsplit(".", 1)[-1] in HEAD_NAMES
