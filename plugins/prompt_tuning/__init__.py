"""The built-in prompt-tuning method plugin (entry point ``prompt``).

Importing this package does not import torch: ``validate`` and ``inspect``
use only the torch-free part; ``module`` (torch) is imported when a model is
touched. ``layout`` and ``virtual`` are shared with the prefix-tuning plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.hookspecs import hookimpl

from .method import PromptTuningMethod

__all__ = ["PromptTuningMethod", "adapterkit_register_methods"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``prompt`` method."""
    register(PromptTuningMethod())
