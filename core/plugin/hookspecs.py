"""The hook specifications a plugin implements (docs/plugins.md documents each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "adapterkit"
#: "2": capabilities (adapterkit.LowRank, ...) replace Method's mergeable / compose / export hooks, and
#: codecs (adapterkit_register_codecs) open multi-method formats; docs/plugins.md, "From plugin API 1 to 2"
PLUGIN_API_VERSION = "2"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register PETL methods: call ``register(method)`` with a :class:`adapterkit.Method` per method."""


@hookspec
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    """Register foreign adapter formats: call ``register(fmt)`` with a :class:`adapterkit.Format` per format."""


@hookspec
def adapterkit_register_commands(cli: Any) -> None:
    """Add commands to the ``adapterkit`` click group ``cli`` (use ``@cli.command()``)."""


@hookspec
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register codecs (one method's layout inside a multi-method format): ``register(codec)`` with an :class:`adapterkit.Codec`."""
