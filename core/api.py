"""The core's facade: the torch-free functions every CLI command and notebook starts from.

``adapterkit.load / save / convert / detect_format / validate / inspect`` resolve here
(``import adapterkit`` resolves them lazily); the torch side (``apply``, ``inject``,
``AdapterPool``, ``train``, ``export_onnx``, ...) is named in ``adapterkit/__init__.py``
and imported only when used.
"""

from __future__ import annotations

from adapterkit.core.check.inspect import inspect, summarize
from adapterkit.core.check.validate import validate
from adapterkit.core.store.adapters import convert, detect_format, load, route_options, save

__all__ = ["convert", "detect_format", "inspect", "load", "route_options", "save", "summarize", "validate"]
