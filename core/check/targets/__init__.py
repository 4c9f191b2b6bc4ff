"""``validate --target``: a load plan per serving runtime, and what it would reject or serve wrong.

One module per runtime restates that runtime's loader (the release it was read from is in the
module and in every plan): :mod:`.vllm`, :mod:`.sglang`, :mod:`.llama_cpp`, :mod:`.mlx`,
:mod:`.onnxruntime`. Each returns a :class:`~.plan.Plan`: per adapter module the runtime module it
becomes (vLLM's packed ``qkv_proj``, llama.cpp's ``blk.N.attn_q``, ...) and its status (applied,
dropped, wrong, unsupported, unknown), the share of the adapter's parameters applied (``coverage``),
and the runtime flags it needs (``--max-lora-rank 32``). The plans work on any
:class:`~adapterkit.LowRank` method's factors; a method without them is refused by every runtime.

Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from adapterkit.core.errors import UsageError
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.plugin.registry import Registry

from . import llama_cpp, mlx, onnxruntime, sglang, vllm
from .common import Context
from .plan import Plan, parse_version, report_plan

RUNTIMES: dict[str, ModuleType] = {m.NAME: m for m in (vllm, sglang, llama_cpp, mlx, onnxruntime)}
TARGETS = tuple(RUNTIMES)


def load_plan(report: ValidationReport, target: str, registry: Registry, base: str | Path | None = None,
              version: str | None = None) -> Plan | None:
    """The plan of ``report.adapter`` in ``target`` (None when the adapter did not load)."""
    runtime = RUNTIMES.get(target)
    if runtime is None:
        raise UsageError(f"unknown runtime target {target!r}", location="target", expected=list(TARGETS),
                         found=target, code="bad_option")
    parsed = parse_version(version, target) if version is not None else None
    if report.adapter is None:
        return None
    ctx = Context(report, report.adapter, registry, Path(base) if base is not None else None, parsed)
    return runtime.plan(ctx)


def check_runtime(report: ValidationReport, target: str, registry: Registry, base: str | Path | None = None,
                  version: str | None = None) -> None:
    """Add ``target``'s load plan and findings to ``report`` (whose ``adapter`` is set when it loaded)."""
    plan = load_plan(report, target, registry, base, version)
    if plan is None:
        report.not_checked.append(f"{target} load plan (the adapter did not load)")
        return
    report_plan(report, plan)


__all__ = ["RUNTIMES", "TARGETS", "Plan", "check_runtime", "load_plan"]
