"""adapterkit-ia3: the (IA)^3 method and the PEFT IA3 format as an adapterkit plugin.

The entry point ``ia3`` (group ``adapterkit``) names this module; adapterkit calls
its two hooks. Importing it never imports torch (``adapterkit_ia3.layer`` does,
and is imported only when a model is touched).
"""

from __future__ import annotations

from collections.abc import Callable

import adapterkit

from .method import Ia3Method
from .peft_format import PeftIa3Format

__version__ = "0.1.0"
#: the adapterkit plugin API this plugin targets (adapterkit.PLUGIN_API_VERSION)
ADAPTERKIT_PLUGIN_API = "1"

__all__ = ["ADAPTERKIT_PLUGIN_API", "Ia3Method", "PeftIa3Format", "adapterkit_register_formats",
           "adapterkit_register_methods"]


@adapterkit.hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``ia3`` method."""
    register(Ia3Method())


@adapterkit.hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    """Register the ``peft-ia3`` format."""
    register(PeftIa3Format())
