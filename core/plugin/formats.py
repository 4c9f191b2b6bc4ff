"""The contract a foreign-format plugin implements (reader, writer, detector)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import UsageError
from adapterkit.core.plugin.hookspecs import PLUGIN_API_VERSION

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.core.format.adapter import Adapter


class Format(ABC):
    """One on-disk adapter format. Subclass it and register an instance from a plugin."""

    #: format id used by ``convert --from/--to`` and ``load(format=...)``
    name: str = ""
    #: one line for ``adapterkit plugins``
    description: str = ""
    #: plugin API version this format targets
    api_version: str = PLUGIN_API_VERSION
    #: whether the reader / writer exist
    can_read: bool = True
    can_write: bool = True
    #: option names ``read`` / ``write`` accept (``convert`` routes ``-O`` options by them);
    #: None means undeclared: every option is passed
    read_options: tuple[str, ...] | None = None
    write_options: tuple[str, ...] | None = None
    #: the extension of the one file a single-file format writes (``".gguf"``), or None for a folder format.
    #: ``save`` / ``convert`` to a path ending in it write that file itself (atomically), passing its
    #: name as the ``filename`` write option, which such a writer must take
    file_suffix: str | None = None

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """True when ``path`` (a file or folder) looks like this format. Must be cheap and never raise."""

    @abstractmethod
    def read(self, path: Path, **options: Any) -> Adapter:
        """Read ``path`` into an adapter in the canonical layout. Raise FormatError on bad input."""

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Write ``adapter`` into the folder ``path`` (created; the caller makes it atomic).

        Raise LossyConversionError when this format cannot express the adapter.
        """
        raise NotImplementedError(f"format {self.name!r} cannot be written")

    def options_for(self, options: Mapping[str, Any], side: str) -> dict[str, Any]:
        """The options of ``side`` (``"read"`` / ``"write"``) that are set, ``registry`` left out; an option
        this side does not declare (:attr:`read_options` / :attr:`write_options`) is a ``UsageError``."""
        known = tuple(self.read_options if side == "read" else self.write_options or ())
        extra = sorted(set(options) - set(known) - {"registry"})
        if extra:
            raise UsageError(f"unknown option {extra[0]!r} for the {self.name} {'reader' if side == 'read' else 'writer'}",
                             expected=list(known), found=extra, code="bad_option")
        return {k: options[k] for k in known if options.get(k) is not None}

    def module_names(self, adapter: Adapter, **options: Any) -> dict[str, str]:
        """Module path -> the name this format (and the runtime reading it) gives each adapted module, e.g.
        llama.cpp's ``blk.0.attn_q`` for ``model.layers.0.self_attn.q_proj``; a module it cannot name is left
        out. ``options`` are the writer's (``base``, ...). Default ``{}``: the names are the module paths.
        ``validate --target`` shows them in its load plan."""
        return {}

    def checks(self, path: Path) -> list[str]:
        """What ``validate`` cannot check for files of this format (for the report)."""
        return []
