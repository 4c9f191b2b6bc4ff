"""adapterkit-boft: BOFT (butterfly orthogonal fine-tuning) and its codec for adapterkit's PEFT format.

The entry point ``boft`` (group ``adapterkit``) names this module; adapterkit calls
its two hooks. Importing it never imports torch (``adapterkit_boft.layer`` does,
and is imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import BoftMethod
from .peft_codec import BoftPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "BoftMethod", "BoftPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``boft`` method."""
    register(BoftMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``BOFT`` codec: ``adapterkit convert ... --to peft`` writes PEFT's BOFT folders."""
    register(BoftPeftCodec())
