"""The user-facing error taxonomy.

Every error a user can cause (a bad file, a wrong base, an unknown format) is an
:class:`AdapterkitError`. The CLI prints it as one clean message and exits 1;
anything else is a bug and keeps its traceback.

A message names the culprit (file, JSON path or tensor key), says what was
expected and what was found, and how to fix it::

    adapter.json $.method.config.r: 0 is less than the minimum of 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AdapterkitError(Exception):
    """Base class of every error caused by the user's input."""

    message: str
    file: str | None = None
    location: str | None = None  # a JSON path ($.a.b) or a tensor key
    expected: Any = None
    found: Any = None
    hint: str | None = None
    code: str = field(default="error")

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        head = " ".join(p for p in (self.file, self.location) if p)
        text = f"{head}: {self.message}" if head else self.message
        parts = [f"{label} {_short(value)}" for label, value in (("expected", self.expected), ("found", self.found))
                 if value is not None]
        if parts:
            text += f" ({', '.join(parts)})"
        if self.hint:
            text += f". {self.hint}"
        return printable(text)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        for key in ("file", "location", "expected", "found", "hint"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def printable(text: str) -> str:
    """``text`` on one line with no terminal control: names from hostile files may hold newlines or escapes."""
    return text.translate(_CONTROL)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


class ManifestError(AdapterkitError):
    """adapter.json is missing, not JSON, or does not follow the schema."""


class VersionError(AdapterkitError):
    """A format or plugin API version this release cannot read."""


class TensorFileError(AdapterkitError):
    """A tensor file is missing, malformed, or does not match the manifest."""


class IntegrityError(TensorFileError):
    """A checksum or byte size does not match the manifest."""


class BaseModelError(AdapterkitError):
    """The base model is missing, unreadable, or not the one the adapter expects."""


class FormatError(AdapterkitError):
    """A foreign adapter folder cannot be read or written in the asked format."""


class LossyConversionError(FormatError):
    """The target format cannot express part of the adapter."""


class UnsafeFileError(AdapterkitError):
    """A file would run code when loaded (a pickle that needs more than tensors)."""


class PluginError(AdapterkitError):
    """A plugin is missing, broken, or registered something invalid."""


class UsageError(AdapterkitError):
    """An API call or option combination that cannot work."""
