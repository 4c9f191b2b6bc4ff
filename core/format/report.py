"""What a check of an adapter found: errors, warnings, what was checked and what was not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.format.adapter import Adapter


@dataclass
class ValidationReport:
    """What validate found. ``valid`` is True when there are no errors."""

    path: str
    format: str | None = None
    method: str | None = None
    errors: list[AdapterkitError] = field(default_factory=list)
    warnings: list[AdapterkitError] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    adapter: Adapter | None = None
    #: per-module effect (``validate``: which modules change nothing), the probe's numbers
    #: (``--probe``) and the runtime's load plan (``--target``), when computed
    effect: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None

    @property
    def valid(self) -> bool:
        return not self.errors

    def error(self, exc: AdapterkitError) -> None:
        self.errors.append(exc)

    def warn(self, exc: AdapterkitError) -> None:
        exc.code = exc.code if exc.code != "error" else "warning"
        self.warnings.append(exc)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "path": self.path, "format": self.format, "method": self.method, "valid": self.valid,
            "errors": [e.to_dict() for e in self.errors], "warnings": [w.to_dict() for w in self.warnings],
            "checks": self.checks, "not_checked": self.not_checked,
        }
        for key in ("effect", "probe", "plan"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out
