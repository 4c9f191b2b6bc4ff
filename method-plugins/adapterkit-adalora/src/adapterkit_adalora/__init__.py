"""adapterkit-adalora: AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning") and its codec for adapterkit's PEFT format, as an adapterkit plugin.

The entry point ``adalora`` (group ``adapterkit``) names this module. Importing it never imports torch
(``adapterkit_adalora.layer`` does, and is imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import AdaLoraMethod
from .peft_codec import AdaLoraPeftCodec

__version__ = "0.2.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "2"

__all__ = ["ADAPTERKIT_PLUGIN_API", "AdaLoraMethod", "AdaLoraPeftCodec", "adapterkit_register_codecs",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``adalora`` method."""
    register(AdaLoraMethod())


@adapterkit.hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``ADALORA`` codec."""
    register(AdaLoraPeftCodec())
