"""The hook specifications a plugin implements (docs/plugins.md documents each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "adapterkit"
PLUGIN_API_VERSION = "1"

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
