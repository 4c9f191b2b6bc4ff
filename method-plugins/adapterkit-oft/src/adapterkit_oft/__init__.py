"""adapterkit-oft: OFT (orthogonal fine-tuning) and its codec for adapterkit's PEFT format, as an adapterkit plugin.

The entry point ``oft`` (group ``adapterkit``) names this module; adapterkit calls its
two hooks. Importing it never imports torch (``adapterkit_oft.layer`` does, and is
imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import OftMethod
from .peft_codec import OftPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "OftMethod", "OftPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``oft`` method."""
    register(OftMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``OFT`` codec: ``adapterkit convert ... --to peft`` writes PEFT's OFT folders."""
    register(OftPeftCodec())
