"""adapterkit-vera: the VeRA method, and its codec for adapterkit's PEFT format, as an adapterkit plugin.

The entry point ``vera`` (group ``adapterkit``) names this module; adapterkit calls
its two hooks. Importing it never imports torch (``adapterkit_vera.layer`` does,
and is imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import VeraMethod
from .peft_codec import VeraPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "VeraMethod", "VeraPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``vera`` method."""
    register(VeraMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``VERA`` codec: ``adapterkit convert ... --to peft`` writes PEFT's VeRA folders."""
    register(VeraPeftCodec())
