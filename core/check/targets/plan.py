"""A runtime's load plan: what a serving runtime does with each module of an adapter.

Every target module (``vllm.py``, ``sglang.py``, ...) restates one runtime's loader and returns a
:class:`Plan`: one :class:`PlanModule` per adapter module (the runtime module it becomes, and a
status), the runtime flags it needs, and refusals of the whole adapter. :func:`report_plan` turns
it into the report's errors and warnings and its ``plan`` entry.

Statuses:

- ``applied``: served as adapterkit applies it;
- ``dropped``: loads, and silently does nothing (a warning; an error when every module is dropped:
  the runtime would serve the base model as if it were the adapter);
- ``wrong``: loads, and computes something else (an error: the served model is wrong);
- ``unsupported``: the runtime refuses it, so the whole adapter fails to load (an error);
- ``unknown``: the rules here do not tell (the architecture's table is not known).

``coverage`` is the share of the adapter's parameters the runtime applies, in [0, 1]: 0 when it
refuses the adapter (an unsupported module, or a refusal of the whole adapter), else the applied
modules' parameters over all.

Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.format.report import ValidationReport

APPLIED, DROPPED, WRONG, UNSUPPORTED, UNKNOWN = "applied", "dropped", "wrong", "unsupported", "unknown"
STATUSES = (APPLIED, DROPPED, WRONG, UNSUPPORTED, UNKNOWN)
_SHOWN = 4


@dataclass
class PlanModule:
    """One adapter module in a runtime: the runtime module it becomes and what happens to it."""

    module: str
    runtime_module: str | None
    status: str
    parameters: int
    reason: str = ""
    code: str = ""  # the problem code when not applied (groups the report's errors)
    hint: str | None = None
    rank: int | None = None
    reported: bool = True  # False: the plan's refusal of the whole adapter already says why

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module, "runtime_module": self.runtime_module, "status": self.status,
                               "parameters": self.parameters}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Refusal:
    """A refusal of the whole adapter (a config field, the method): the runtime does not load it."""

    message: str
    code: str
    location: str | None = None
    found: Any = None
    hint: str | None = None


@dataclass
class Plan:
    runtime: str  # the target name, e.g. "vllm"
    label: str  # for messages, e.g. "vLLM 0.34.0"
    version: str
    rules: str  # where the rules were read
    reads: str  # the format the runtime loads ("peft", "gguf", ...)
    modules: list[PlanModule] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # commands that make what the runtime loads
    usage: str = ""
    refusals: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the rules could not tell (-> not_checked)
    warnings: list[Refusal] = field(default_factory=list)  # adapter-level warnings (a flag needed, ...)

    def count(self, status: str) -> int:
        return sum(1 for m in self.modules if m.status == status)

    @property
    def loads(self) -> bool:
        return not self.refusals and self.count(UNSUPPORTED) == 0

    @property
    def coverage(self) -> float:
        total = sum(m.parameters for m in self.modules)
        if not self.loads or total == 0:
            return 0.0
        return sum(m.parameters for m in self.modules if m.status == APPLIED) / total

    def refuse_all(self, reason: str, code: str, *, reported: bool = True) -> None:
        """Every module that would otherwise be applied is unsupported for ``reason`` (the method, ...);
        ``reported=False`` when a refusal of the whole adapter already reports it."""
        for item in self.modules:
            if item.status in (APPLIED, UNKNOWN):
                item.status, item.reason, item.code, item.reported = UNSUPPORTED, reason, code, reported

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime, "label": self.label, "version": self.version, "rules": self.rules,
            "reads": self.reads,
            "loads": self.loads, "coverage": round(self.coverage, 6),
            "parameters": {"total": sum(m.parameters for m in self.modules),
                           "applied": sum(m.parameters for m in self.modules if m.status == APPLIED)},
            "counts": {status: self.count(status) for status in STATUSES if self.count(status)},
            "flags": list(self.flags), "steps": list(self.steps), "usage": self.usage,
            "refusals": [r.message for r in self.refusals],
            "modules": [m.to_dict() for m in self.modules],
        }


def report_plan(report: ValidationReport, plan: Plan) -> None:
    """The plan's findings as errors / warnings of ``report``, and ``report.plan``."""
    for refusal in plan.refusals:
        report.error(AdapterkitError(refusal.message, file=report.path, location=refusal.location,
                                     found=refusal.found, hint=refusal.hint, code=refusal.code))
    for warning in plan.warnings:
        report.warn(AdapterkitError(warning.message, file=report.path, location=warning.location,
                                    found=warning.found, hint=warning.hint, code=warning.code))
    groups: dict[tuple[str, str, str], list[PlanModule]] = {}
    for item in plan.modules:
        if item.status in (DROPPED, WRONG, UNSUPPORTED) and item.reported:
            groups.setdefault((item.status, item.code, item.reason), []).append(item)
    all_dropped = bool(plan.modules) and plan.count(DROPPED) == len(plan.modules)
    for (status, code, reason), items in groups.items():
        names = [i.module for i in items]
        shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
        verb = {DROPPED: "drops", WRONG: "serves wrong", UNSUPPORTED: "refuses"}[status]
        problem = AdapterkitError(f"{plan.label} {verb} {len(items)} module(s): {reason}", file=report.path,
                                  location=names[0], found=shown, hint=items[0].hint,
                                  code=code or f"{plan.runtime.replace('.', '_')}_{status}")
        if status == DROPPED and not all_dropped:
            report.warn(problem)
        else:
            report.error(problem)
    report.not_checked.extend(f"{plan.runtime}: {note}" for note in plan.notes)
    report.plan = plan.to_dict()
    report.checks.append(f"{plan.runtime} load plan ({plan.label} rules)")


def parse_version(text: str, runtime: str) -> tuple[int, ...]:
    """``"0.31"``, ``"v0.32.1"`` -> ``(0, 31)``, ``(0, 32, 1)``; anything else is a usage error."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+){0,3})(?:[.+-].*)?", str(text).strip())
    if not match:
        raise UsageError(f"{text!r} is not a {runtime} release number", location="target_version",
                         expected="e.g. 0.31 or 0.34.0", found=text, code="bad_option")
    return tuple(int(p) for p in match.group(1).split("."))

