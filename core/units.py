"""Human-readable sizes and counts, for the CLI and the bench report (decimal units, as file managers show)."""

from __future__ import annotations


def human_bytes(n: int | float | None) -> str:
    """``1.2 MB``-style text for a byte count ("-" for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int | None) -> str:
    """``2.44M``-style text for a parameter count ("-" for None)."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
