"""The built-in bottleneck-adapter method plugin (entry point ``bottleneck``).

Importing this package does not import torch: ``validate`` and ``inspect`` use
only the torch-free part; the torch side (``layer``) is imported when a model
is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.hookspecs import hookimpl

from .method import BottleneckMethod

__all__ = ["BottleneckMethod", "adapterkit_register_methods"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``bottleneck`` method."""
    register(BottleneckMethod())
