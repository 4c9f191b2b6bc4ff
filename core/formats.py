"""The contract a foreign-format plugin implements (reader, writer, detector)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter


class Format(ABC):
    """One on-disk adapter format. Subclass it and register an instance from a plugin."""

    #: format id used by ``convert --from/--to`` and ``load(format=...)``
    name: str = ""
    #: one line for ``adapterkit plugins``
    description: str = ""
    #: plugin API version this format targets
    api_version: str = "1"
    #: whether the reader / writer exist
    can_read: bool = True
    can_write: bool = True
    #: option names ``read`` / ``write`` accept (``convert`` routes ``-O`` options by them);
    #: None means undeclared: every option is passed
    read_options: tuple[str, ...] | None = None
    write_options: tuple[str, ...] | None = None

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

    def checks(self, path: Path) -> list[str]:
        """What ``validate`` cannot check for files of this format (for the report)."""
        return []
