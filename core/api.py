"""The public, torch-free API: detect, load, save, validate, convert, inspect.

Every CLI command is a thin layer over one of these functions.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import AdapterkitError, FormatError, UsageError
from .io import atomic_directory
from .plugins import Registry, default_registry
from .validate import ValidationReport, check_base, check_native, check_tensors


def detect_format(path: str | Path, registry: Registry | None = None) -> str:
    """The name of the format whose detector recognises ``path``."""
    registry = registry or default_registry()
    path = Path(path)
    if not path.exists():
        raise FormatError("path not found", file=str(path), code="missing_file")
    matches = []
    for name, fmt in registry.formats.items():
        try:
            if fmt.detect(path):
                matches.append(name)
        except Exception:  # a detector must not break detection of the others
            continue
    if not matches:
        from .composition_folder import is_composition

        if is_composition(path):
            raise FormatError(
                "this is a runtime composition folder (composition.json), not an adapter", file=str(path),
                code="composition_not_adapter",
                hint="validate and inspect take it; adapterkit.apply_composition runs it on a model; to make "
                     "one adapter of its members, run adapterkit compose --strategy on the adapters it lists")
        hint = "pass --from FORMAT, or install the plugin for this format"
        if registry.failures:
            names = ", ".join(info.name for info in registry.failures)
            hint += f"; note that plugin(s) {names} failed to load (adapterkit plugins shows why)"
        raise FormatError(
            "no installed format recognises this path", file=str(path), expected=sorted(registry.formats),
            hint=hint, code="unknown_format",
        )
    if "adapterkit" in matches:
        return "adapterkit"
    if len(matches) > 1:
        raise FormatError("several formats recognise this path", file=str(path), found=matches,
                          hint="pass --from FORMAT to choose", code="ambiguous_format")
    return matches[0]


def load(path: str | Path, format: str | None = None, *, registry: Registry | None = None, **options: Any) -> Adapter:
    """Read an adapter in any installed format (auto-detected) into the canonical layout."""
    registry = registry or default_registry()
    path = Path(path)
    name = format or detect_format(path, registry)
    fmt = registry.format(name)
    if not fmt.can_read:
        raise FormatError(f"format {name!r} cannot be read", file=str(path), code="unsupported")
    adapter = fmt.read(path, registry=registry, **options)
    _check_read_targets(adapter, registry, path, name)
    adapter.source, adapter.source_format = path, name
    return adapter


def _check_read_targets(adapter: Adapter, registry: Registry, path: Path, format_name: str) -> None:
    """A safety net under every format reader, a third party's too: each target the reader produced
    passes its method's own check (a damaged file must not become an adapter that fails later)."""
    from .manifest import json_path

    method = registry.method(adapter.method)
    for module, target in adapter.manifest.targets.items():
        problems = method.check_target(module, target, adapter.manifest.config)
        if problems:
            raise FormatError(
                f"the {format_name} reader produced an invalid target: {problems[0]}", file=str(path),
                location=json_path(["targets", module]),
                hint="the file is damaged (save the adapter again), or the format plugin has a bug",
                code="bad_target")


def save(
    adapter: Adapter,
    out_dir: str | Path,
    format: str = "adapterkit",
    *,
    overwrite: bool = False,
    registry: Registry | None = None,
    **options: Any,
) -> Path:
    """Write ``adapter`` as a folder in ``format``, atomically (all or nothing)."""
    registry = registry or default_registry()
    fmt = registry.format(format)
    if not fmt.can_write:
        raise FormatError(f"format {format!r} cannot be written", file=str(out_dir), code="unsupported")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        try:
            fmt.write(adapter, tmp, registry=registry, **options)
        except AdapterkitError as exc:  # name the destination, not the temporary folder
            if exc.file and str(tmp) in exc.file:
                exc.file = exc.file.replace(str(tmp), str(out_dir))
            raise
    return out_dir


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    from_format: str | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    registry: Registry | None = None,
    **options: Any,
) -> Path:
    """Read ``src`` (any format) and write it to ``dst`` in format ``to``.

    Each option goes to the reader and / or the writer that declares it
    (``Format.read_options`` / ``write_options``); an option neither takes is an error.
    ``base`` (a local HF model folder) goes to whichever of the two takes a base, and is
    not needed when neither does.
    """
    registry = registry or default_registry()
    source = registry.format(from_format or detect_format(src, registry))
    target = registry.format(to)
    read_opts, write_opts = route_options(options, source, target)
    if base is not None:
        for declared, opts in ((source.read_options, read_opts), (target.write_options, write_opts)):
            if declared is None or "base" in declared:
                opts.setdefault("base", base)
    adapter = load(src, source.name, registry=registry, **read_opts)
    return save(adapter, dst, to, overwrite=overwrite, registry=registry, **write_opts)


def route_options(options: dict[str, Any], source: Any, target: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split options between a reader and a writer by the names each declares."""

    def accepts(declared: tuple[str, ...] | None, key: str) -> bool:
        return declared is None or key in declared

    read_opts = {k: v for k, v in options.items() if accepts(source.read_options, k)}
    write_opts = {k: v for k, v in options.items() if accepts(target.write_options, k)}
    unused = sorted(set(options) - set(read_opts) - set(write_opts))
    if unused:
        known = sorted({*(source.read_options or ()), *(target.write_options or ())})
        raise UsageError(
            f"option {unused[0]!r} is taken by neither the {source.name} reader nor the {target.name} writer",
            expected=known, found=unused, hint="check the spelling (docs/cli.md, Conventions, lists each format's options)",
            code="bad_option",
        )
    return read_opts, write_opts


def validate(
    path: str | Path,
    base: str | Path | None = None,
    *,
    format: str | None = None,
    target: str | None = None,
    registry: Registry | None = None,
    **options: Any,
) -> ValidationReport:
    """Check an adapter (any format) and optionally its fit to a local base model.

    ``base`` and ``options`` also reach a foreign format's reader (some need the base's config).
    ``target`` (``"vllm"``, ``"llama.cpp"``, ``"onnxruntime"``) adds what that runtime would
    reject (:mod:`adapterkit.core.runtime_targets`).
    """
    registry = registry or default_registry()
    if target is not None:
        from .runtime_targets import TARGETS

        if target not in TARGETS:
            raise UsageError(f"unknown runtime target {target!r}", location="target", expected=list(TARGETS),
                             found=target, code="bad_option")
    path = Path(path)
    if format is None and _is_composition(path):  # a composition folder is no adapter format (docs/compose.md)
        from .composition_folder import validate_composition

        report = validate_composition(path, base, registry=registry)
        if target is not None:
            report.not_checked.append(f"{target} serving checks (they apply to adapters; validate each member)")
        return report
    report = ValidationReport(str(path))
    try:
        report.format = format or detect_format(path, registry)
    except AdapterkitError as exc:
        report.error(exc)
        return report
    if report.format == "adapterkit":
        check_native(path, registry, report)
    else:
        try:
            fmt = registry.format(report.format)
            read_options = dict(options)
            if base is not None and (fmt.read_options is None or "base" in fmt.read_options):
                read_options["base"] = base  # the reader may need the base's config
            adapter = fmt.read(path, registry=registry, **read_options)
        except AdapterkitError as exc:
            report.error(exc)
            return report
        report.method = adapter.method
        report.checks.append(f"{report.format} files and config")
        report.not_checked.extend(fmt.checks(path))
        for warning in adapter.warnings:
            report.warn(AdapterkitError(warning, file=str(path)))
        check_tensors(adapter, registry, report, file=str(path))
        report.adapter = adapter
    if base is not None and report.adapter is not None:
        check_base(report.adapter, base, report)
    elif base is None:
        report.not_checked.append("fit to a base model (pass --base)")
    if target is not None:
        from .runtime_targets import check_runtime

        check_runtime(report, target, registry, base)
    return report


def inspect(path: str | Path, *, format: str | None = None, registry: Registry | None = None) -> dict[str, Any]:
    """A summary of an adapter: method, targets, ranks, parameters, sizes."""
    registry = registry or default_registry()
    if format is None and _is_composition(Path(path)):
        from .composition_folder import inspect_composition

        return inspect_composition(path, registry=registry)
    adapter = load(path, format, registry=registry)
    return summarize(adapter)


def _is_composition(path: Path) -> bool:
    from .composition_folder import is_composition

    return is_composition(path)


def summarize(adapter: Adapter) -> dict[str, Any]:
    manifest = adapter.manifest
    kinds = collections.Counter(t.get("kind") for t in manifest.targets.values())
    ranks = collections.Counter(t["r"] for t in manifest.targets.values() if "r" in t)
    alphas = collections.Counter(t["alpha"] for t in manifest.targets.values() if "alpha" in t)
    files = _file_sizes(adapter)
    summary: dict[str, Any] = {
        "path": str(adapter.source) if adapter.source else None,
        "format": adapter.source_format,
        "method": manifest.method,
        "config": manifest.config,
        "dtype": manifest.dtype,
        "task": manifest.task,
        "base_model": manifest.base_model,
        "targets": len(manifest.targets),
        "target_kinds": dict(sorted(kinds.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "modules": sorted({m.rsplit(".", 1)[-1] for m in manifest.targets}),
        "parameters": adapter.num_parameters,
        "tensor_bytes": adapter.nbytes,
        "file_bytes": sum(files.values()) if files else None,
    }
    base_params = manifest.base_model.get("num_parameters")
    if base_params:
        summary["base_parameters"] = base_params
        summary["parameters_relative_to_base"] = adapter.num_parameters / base_params
    if manifest.provenance:
        summary["provenance"] = {k: v for k, v in manifest.provenance.items() if k != "converted_from"}
        if "converted_from" in manifest.provenance:
            summary["provenance"]["converted_from"] = manifest.provenance["converted_from"].get("format")
    return summary


def _file_sizes(adapter: Adapter) -> dict[str, int]:
    source = adapter.source
    if source is None:
        return {}
    if source.is_file():
        return {source.name: source.stat().st_size}
    return {p.name: p.stat().st_size for p in sorted(source.iterdir()) if p.is_file()}
