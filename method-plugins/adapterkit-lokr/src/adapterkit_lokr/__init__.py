"""adapterkit-lokr: the LoKr method (Kronecker-product updates) and its codec for adapterkit's PEFT format,
as an adapterkit plugin.

The entry point ``lokr`` (group ``adapterkit``) names this module; adapterkit calls its two hooks.
Importing it never imports torch (``adapterkit_lokr.layer`` does, only when a model is touched).
The numpy math (factorisation, layout, delta) is in :mod:`adapterkit_lokr.math` for other codecs.
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .kohya_codec import LokrKohyaCodec
from .method import LokrMethod
from .peft_codec import LokrPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "LokrKohyaCodec", "LokrMethod", "LokrPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``lokr`` method."""
    register(LokrMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``LOKR`` codec: ``adapterkit convert ... --to peft`` writes PEFT's LoKr folders."""
    register(LokrPeftCodec())
    register(LokrKohyaCodec())  # kohya LOKR: LyCORIS files
