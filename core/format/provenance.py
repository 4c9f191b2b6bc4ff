"""``provenance`` fields every writer of a new adapter records: who made it and when (one copy)."""

from __future__ import annotations

import datetime as _dt


def created_by(tool: str | None = None) -> str:
    """``adapterkit 0.2.0``, or ``adapterkit 0.2.0 (compose)`` for a named tool."""
    import adapterkit

    return f"adapterkit {adapterkit.__version__}" + (f" ({tool})" if tool else "")


def now_utc() -> str:
    """The current UTC time as RFC 3339 with seconds (``2026-12-04T15:28:19Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
