"""Checks of the config fields methods share, torch-free: one rule and one message per field shape.

Each ``check_*`` returns the value normalised or raises :class:`~adapterkit.UsageError` at
``$.method.config.<key>`` with what was found and how to fix it (code ``bad_config``), so a method's
``resolve_config`` is a list of calls. The selection fields follow PEFT (:mod:`.targeting`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from adapterkit.core.errors import UsageError

from .targeting import ALL_LINEAR


def config_error(key: str, message: str, found: Any, hint: str | None = None) -> UsageError:
    """The error of a bad config field ``key`` (location ``$.method.config.<key>``, code ``bad_config``)."""
    return UsageError(message, location=f"$.method.config.{key}", found=found, hint=hint, code="bad_config")


def is_int(value: Any) -> bool:
    """An integer as JSON Schema sees it: 2 and 2.0 are, True and 2.5 are not."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_regex(key: str, pattern: str) -> str:
    """``pattern`` if it compiles as a regular expression."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise config_error(key, f"{pattern!r} is not a valid regular expression ({exc})", pattern,
                           "escape special characters or use a list of module names") from None
    return pattern


def check_selection(key: str, value: Any, *, nullable: bool = False) -> str | list[str] | None:
    """A module selection (``target_modules``, ``exclude_modules``): a non-empty list of module names (a set is
    sorted), a regex full-matched against module paths, or ``"all-linear"``; None too when ``nullable``."""
    if value is None and nullable:
        return None
    if isinstance(value, str) and value:
        return value if value == ALL_LINEAR else check_regex(key, value)
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise config_error(key, f'{key} must be a non-empty list of module names, a regex, or "all-linear"'
                       + (", or null" if nullable else ""), value, 'e.g. ["q_proj", "v_proj"]')


def check_layers(layers_to_transform: Any, layers_pattern: Any) -> tuple[list[int] | None, str | list[str] | None]:
    """``layers_to_transform`` (an index >= 0 or a non-empty list of them, as a list; or None) and
    ``layers_pattern`` (a regex naming the module list, or a list of them; or None, and only with layers)."""
    layers = [layers_to_transform] if is_int(layers_to_transform) else layers_to_transform
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or not all(is_int(i) and i >= 0 for i in layers):
            raise config_error("layers_to_transform", "layers_to_transform must be a layer index >= 0, a non-empty "
                               "list of them, or null", layers_to_transform, "e.g. layers_to_transform=[0, 1]")
        layers = [int(i) for i in layers]
    pattern = layers_pattern
    if pattern is not None:
        names = [pattern] if isinstance(pattern, str) else pattern
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(p, str) and p for p in names):
            raise config_error("layers_pattern", "layers_pattern must be a name, a list of names, or null", pattern,
                               'e.g. layers_pattern="layers"')
        for name in names:
            check_regex("layers_pattern", name)
        pattern = pattern if isinstance(pattern, str) else list(pattern)
        if layers is None:
            raise config_error("layers_pattern", "layers_pattern needs layers_to_transform (PEFT refuses it alone "
                               "too)", pattern, "set layers_to_transform, or remove layers_pattern")
    return layers, pattern


def check_pattern_map(key: str, value: Any, *, integer: bool, positive: bool = True) -> dict[str, Any]:
    """A per-module map (``rank_pattern``, ``alpha_pattern``): module names or regexes -> an integer >= 1
    (``integer``), a number > 0, or (``positive=False``) any finite number; None is an empty map."""
    what = "an integer >= 1" if integer else "a number > 0" if positive else "a finite number"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise config_error(key, f"{key} must map module names or regexes to {what}", value, f'e.g. {key}={{"q_proj": 4}}')
    out = {}
    for pattern, number in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise config_error(key, "keys must be non-empty module names or regexes", pattern,
                               'use strings such as "q_proj"')
        check_regex(key, pattern)
        if integer:
            ok = is_int(number) and number >= 1
        else:
            ok = is_number(number) and (number > 0 or not positive)
        if not ok:
            raise config_error(key, f"value of {pattern!r} must be {what}", number,
                               f"fix the {key} entry for {pattern!r}")
        out[pattern] = int(number) if integer else number
    return out


__all__ = ["check_layers", "check_pattern_map", "check_regex", "check_selection", "config_error", "is_int",
           "is_number"]
