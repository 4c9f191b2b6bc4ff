"""adapterkit-loha: LoHa (low-rank Hadamard product) and its codec for adapterkit's PEFT format, as an adapterkit plugin.

The entry point ``loha`` (group ``adapterkit``) names this module; adapterkit calls its two
hooks. Importing it never imports torch (``adapterkit_loha.layer`` does, and is imported only
when a model is touched). The numpy math is in :mod:`adapterkit_loha.math` (``loha_delta``), for
every codec of this package to share.
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .math import loha_delta, loha_scale
from .method import LohaMethod
from .kohya_codec import LohaKohyaCodec
from .peft_codec import LohaPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "LohaKohyaCodec", "LohaMethod", "LohaPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods", "loha_delta", "loha_scale"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``loha`` method."""
    register(LohaMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``LOHA`` codec: ``adapterkit convert ... --to peft`` writes PEFT's LoHa folders."""
    register(LohaPeftCodec())
    register(LohaKohyaCodec())  # kohya LOHA: LyCORIS files
