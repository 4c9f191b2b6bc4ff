"""The built-in LoRA method plugin (entry point ``lora``).

Importing this package does not import torch: ``validate`` and ``inspect``
use only the torch-free part; the torch wrapper (``layer``) is imported when a
model is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.hookspecs import hookimpl

from .method import LoraMethod, lora_scale

__all__ = ["LoraMethod", "adapterkit_register_methods", "lora_scale"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``lora`` method."""
    register(LoraMethod())
