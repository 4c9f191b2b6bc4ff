"""The built-in prefix-tuning method plugin (entry point ``prefix``).

Importing this package does not import torch; ``module`` (torch) is imported
when a model is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.hookspecs import hookimpl

from .method import PrefixTuningMethod

__all__ = ["PrefixTuningMethod", "adapterkit_register_methods"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``prefix`` method."""
    register(PrefixTuningMethod())
