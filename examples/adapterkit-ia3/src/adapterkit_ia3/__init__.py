"""adapterkit-ia3: the (IA)^3 method, and its codec for adapterkit's PEFT format, as an adapterkit plugin.

The entry point ``ia3`` (group ``adapterkit``) names this module; adapterkit calls
its two hooks. Importing it never imports torch (``adapterkit_ia3.layer`` does,
and is imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import Ia3Method
from .peft_codec import Ia3PeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "Ia3Method", "Ia3PeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``ia3`` method."""
    register(Ia3Method())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``IA3`` codec: ``adapterkit convert ... --to peft`` writes PEFT's IA3 folders."""
    register(Ia3PeftCodec())
