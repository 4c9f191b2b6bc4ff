"""The built-in LoRA-family method plugin (entry point ``lora``): ``lora``, ``dora`` and ``qlora``.

One wrapper (``layer.LoraLayer``) serves the three methods; each adapter in it
belongs to one of them. Importing this package does not import torch:
``validate`` and ``inspect`` use only the torch-free part; the torch wrapper
(``layer``) and bitsandbytes (``quant``) are imported when a model is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.plugin.hookspecs import hookimpl

from .dora import DoraMethod
from .method import LoraMethod, lora_scale
from .qlora import QloraMethod, quantization_error
# For the formats that store one rank and one scale per file (mlx-lm, torchtune): docs in uniform.py
from .uniform import (
    CONFIG_MAX_BYTES, RECORD_KEY, Module, adapter_modules, alpha_for, base_info, build_adapter, check_base,
    common_scale, make_record, num_layers, number, plain_config, restore, split_block, tensor_digest, uniform,
)

__all__ = [
    "CONFIG_MAX_BYTES", "DoraMethod", "LoraMethod", "Module", "QloraMethod", "RECORD_KEY", "adapter_modules",
    "adapterkit_register_methods", "alpha_for", "base_info", "build_adapter", "check_base", "common_scale",
    "lora_scale", "make_record", "num_layers", "number", "plain_config", "quantization_error", "restore",
    "split_block", "tensor_digest", "uniform",
]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``lora``, ``dora`` and ``qlora`` methods."""
    register(LoraMethod())
    register(DoraMethod())
    register(QloraMethod())


@hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """Register the PEFT ``LORA`` codec (methods ``lora``, ``dora``, ``qlora``)."""
    from .peft_codec import LoraPeftCodec

    register(LoraPeftCodec())
