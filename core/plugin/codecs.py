"""The contract of a codec: one method's layout inside a foreign format that holds several methods.

PEFT folders tell their method by ``peft_type`` (``LORA``, ``IA3``, ``LOHA``, ...), LyCORIS /
kohya files by their tensor names (``lora_down``, ``hada_w1_a``, ``lokr_w1``, ...). The
format plugin owns the files (names, config parsing, safe tensor loading, atomic writes);
the method plugin that knows the math provides a :class:`Codec` for it through the
``adapterkit_register_codecs`` hook, so a third party's method converts to and from
the format without touching the format's plugin.

The format hands each call a *context*: an object of the format's own (documented with
the format in docs/plugins.md) holding the parsed input and the format's helpers, e.g.
PEFT's module-matching rules. A codec uses only that object and the public ``adapterkit``
API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from adapterkit.core.plugin.hookspecs import PLUGIN_API_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from adapterkit.core.format.adapter import Adapter


class Codec(ABC):
    """Reads and writes one method's adapters inside a multi-method format."""

    #: the format it serves (``"peft"``, ``"kohya"``)
    format: str = ""
    #: how the format names this layout (PEFT's ``peft_type``, e.g. ``"LORA"``)
    key: str = ""
    #: the adapterkit methods it writes (its reader may return any of them)
    methods: tuple[str, ...] = ()
    #: one line for ``adapterkit plugins``
    description: str = ""
    #: plugin API version this codec targets
    api_version: str = PLUGIN_API_VERSION

    @property
    def name(self) -> str:
        """``<format>:<key>``, the codec's id in the registry and ``adapterkit plugins``."""
        return f"{self.format}:{self.key}"

    @abstractmethod
    def read(self, context: Any) -> Adapter:
        """The adapter the context's parsed input holds (canonical layout). Raise ``FormatError`` /
        ``LossyConversionError`` for what the method cannot hold; never drop anything silently."""

    @abstractmethod
    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(config fields, tensors under the format's keys)`` for ``adapter``; the format adds its own
        fields and writes the files. Raise ``LossyConversionError`` for what the format cannot express."""

    def refusal(self, adapter: Adapter) -> str | None:
        """Why this codec cannot write ``adapter`` (checked before any file is touched), or None."""
        return None
