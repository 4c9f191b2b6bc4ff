"""The built-in LoRA-family method plugin (entry point ``lora``): ``lora``, ``dora`` and ``qlora``.

One wrapper (``layer.LoraLayer``) serves the three methods; each adapter in it
belongs to one of them. Importing this package does not import torch:
``validate`` and ``inspect`` use only the torch-free part; the torch wrapper
(``layer``) and bitsandbytes (``quant``) are imported when a model is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.hookspecs import hookimpl

from .dora import DoraMethod
from .method import LoraMethod, lora_scale
from .qlora import QloraMethod, quantization_error

__all__ = ["DoraMethod", "LoraMethod", "QloraMethod", "adapterkit_register_methods", "lora_scale", "quantization_error"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``lora``, ``dora`` and ``qlora`` methods."""
    register(LoraMethod())
    register(DoraMethod())
    register(QloraMethod())
