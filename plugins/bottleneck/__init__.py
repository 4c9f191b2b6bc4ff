"""The built-in bottleneck-adapter method plugin (entry point ``bottleneck``).

Importing this package does not import torch: ``validate`` and ``inspect`` use
only the torch-free part; the torch side (``layer``) is imported when a model
is touched.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.plugin.hookspecs import hookimpl

from .config import minimal, validate_config
from .method import BottleneckMethod

# minimal and validate_config: for the AdapterHub format, which reads and writes bottleneck adapters
__all__ = ["BottleneckMethod", "adapterkit_register_methods", "minimal", "validate_config"]


@hookimpl
def adapterkit_register_methods(register: Callable[..., None]) -> None:
    """Register the ``bottleneck`` method."""
    register(BottleneckMethod())
