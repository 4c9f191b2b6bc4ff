"""``adapterkit.validate``: every check of an adapter (any format), collected into a report.

The checks never stop at the first problem: a user fixing a file wants the whole list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, BaseModelError, ManifestError, UsageError
from adapterkit.core.format import composition as comp
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import read_base_model
from adapterkit.core.format.composition import COMPOSITION_NAME, is_composition
from adapterkit.core.format.module_index import ModuleIndex, resolve_targets
from adapterkit.core.format.targeting import PARAMETER, weight_name
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.io import read_json
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.store.adapters import detect_format
from adapterkit.core.store.composition_folder import FORMAT, check_document, check_members, member_key, member_path
from adapterkit.core.store.consistency import check_tensors
from adapterkit.core.store.native import check_native


def validate(
    path: str | Path,
    base: str | Path | None = None,
    *,
    format: str | None = None,
    target: str | None = None,
    target_version: str | None = None,
    strict: bool = False,
    probe: bool = False,
    probe_threshold: float | None = None,
    registry: Registry | None = None,
    **options: Any,
) -> ValidationReport:
    """Check an adapter (any format) and optionally its fit to a local base model.

    ``base`` and ``options`` also reach a foreign format's reader (some need the base's config).
    Every module's update is checked for zero (:mod:`adapterkit.core.check.effect`): an adapter
    that changes nothing, or some of its modules, is a warning, an error with ``strict``.
    ``probe`` (needs ``base``, torch): apply the adapter to the loaded base and measure how far
    the outputs move on a small input; below ``probe_threshold`` (relative to the largest base
    output, default :data:`~adapterkit.core.check.probe.DEFAULT_THRESHOLD`) a warning, an error
    with ``strict``. ``target`` (:data:`~adapterkit.core.check.targets.TARGETS`) adds that
    runtime's load plan and what it would reject or serve wrong (``target_version``: the
    runtime's release, default the one the rules were read from).
    """
    registry = registry or default_registry()
    if target is not None:
        from adapterkit.core.check.targets import TARGETS

        if target not in TARGETS:
            raise UsageError(f"unknown runtime target {target!r}", location="target", expected=list(TARGETS),
                             found=target, code="bad_option")
    elif target_version is not None:
        raise UsageError("target_version needs a target (--target RUNTIME)", location="target_version",
                         found=target_version, code="bad_option")
    if probe and base is None:
        raise UsageError("--probe runs the base model with the adapter: pass --base BASE", location="probe",
                         code="bad_option")
    if probe_threshold is not None and not (isinstance(probe_threshold, (int, float)) and probe_threshold >= 0):
        raise UsageError("probe_threshold must be a number >= 0", location="probe_threshold", found=probe_threshold,
                         code="bad_option")
    path = Path(path)
    if format is None and is_composition(path):  # a composition folder is no adapter format (docs/compose.md)
        report = validate_composition(path, base, registry=registry)
        if target is not None:
            report.not_checked.append(f"{target} serving checks (they apply to adapters; validate each member)")
        return report
    report = ValidationReport(str(path))
    try:
        report.format = format or detect_format(path, registry)
    except AdapterkitError as exc:
        report.error(exc)
        return _unread(report, target, probe)
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
            return _unread(report, target, probe)
        report.method = adapter.method
        report.checks.append(f"{report.format} files and config")
        report.not_checked.extend(fmt.checks(path))
        for warning in adapter.warnings:  # one that names its own file (a config inside the folder) keeps it alone
            report.warn(AdapterkitError(warning, file=None if warning.startswith(str(path)) else str(path)))
        check_tensors(adapter, registry, report, file=str(path))
        report.adapter = adapter
    if base is not None and report.adapter is not None:
        check_base(report.adapter, base, report)
    elif base is None:
        report.not_checked.append("fit to a base model (pass --base)")
    if report.adapter is not None and report.valid:
        from adapterkit.core.check.effect import check_effect

        effects = check_effect(report, report.adapter, registry, base, strict=strict)
        report.effect = effects.to_dict() if effects is not None else None
        if probe:
            from adapterkit.core.check.probe import DEFAULT_THRESHOLD, check_probe

            assert base is not None
            threshold = DEFAULT_THRESHOLD if probe_threshold is None else float(probe_threshold)
            check_probe(report, report.adapter, base, registry, threshold=threshold, strict=strict)
    elif probe:
        report.not_checked.append("probe (the adapter has errors)")
    if target is not None:
        from adapterkit.core.check.targets import check_runtime

        check_runtime(report, target, registry, base, version=target_version)
    return report


def _unread(report: ValidationReport, target: str | None, probe: bool) -> ValidationReport:
    """The report of an adapter that did not load: say which requested checks did not run."""
    if probe:
        report.not_checked.append("probe (the adapter did not load)")
    if target is not None:
        report.not_checked.append(f"{target} load plan (the adapter did not load)")
    return report


def check_base(adapter: Adapter, base: str | Path, report: ValidationReport) -> None:
    """The base has every target with the recorded shape, read from headers only.

    Targets resolve to modules exactly as :func:`adapterkit.apply` resolves them in the loaded base
    (:func:`~adapterkit.core.format.module_index.resolve_targets`): a module the base lacks is an error
    naming the closest path it has.
    """
    try:
        info = read_base_model(base)
    except AdapterkitError as exc:
        report.error(exc)
        return
    meta = adapter.manifest.base_model
    for key, found in (("model_type", info.model_type), ("architecture", info.architecture)):
        want = meta.get(key)
        if want and found and want != found:
            problem = BaseModelError(f"base model {key} differs from the one the adapter was made for",
                                     file=str(Path(base) / "config.json"), location=key, expected=want, found=found,
                                     code="wrong_base")
            (report.error if key == "model_type" else report.warn)(problem)
    # module targets resolve as apply resolves them; a parameter target names the tensor (stored whole or per expert)
    modules = {m: t for m, t in adapter.targets.items() if t.get("kind") != PARAMETER}
    landings, problems = resolve_targets(modules, ModuleIndex.from_base(info))
    shapes = [(module, landing.shape) for module, landing in landings.items() if landing.shape is not None]
    for module, target in sorted(adapter.targets.items()):
        if module in modules:
            continue
        shape, name = info.target_shape(module, target), weight_name(module, target)
        if shape is None:
            problems.append(BaseModelError("adapted parameter does not exist in the base model", file=str(base),
                                           location=name, hint="is this the right base model?", code="wrong_base"))
        elif list(shape) != list(target["shape"]):
            problems.append(BaseModelError("base weight shape differs from the adapter's target", file=str(base),
                                           location=name, expected=list(target["shape"]), found=list(shape),
                                           hint="the adapter was made for another base model", code="wrong_base"))
        else:
            shapes.append((module, shape))
    for problem in problems:
        report.error(problem)
    want_fp = meta.get("fingerprint")
    if want_fp and not problems and len(shapes) == len(adapter.targets):
        from adapterkit.core.format.base_model import fingerprint, parameter_targets

        found_fp = fingerprint(shapes, parameter_targets(adapter.targets))
        if found_fp != want_fp:
            report.error(BaseModelError("base fingerprint differs", file=str(base), expected=want_fp,
                                        found=found_fp, code="wrong_base"))
    report.checks.append("base model: every target resolves to a module as apply resolves it, shapes, fingerprint "
                         "(headers only)")


def validate_composition(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                         registry: Registry | None = None) -> ValidationReport:
    """Every problem of a composition folder: manifest, members (each validated), methods, one base, weights."""
    from adapterkit.core.check.validate import validate

    registry = registry or default_registry()
    path = Path(path)
    file = str(path / COMPOSITION_NAME)
    report = ValidationReport(str(path), format=FORMAT)
    try:
        data = read_json(file)
    except AdapterkitError as exc:
        report.error(exc)
        return report
    errors = check_document(data, file)
    report.checks.append("composition manifest schema")
    if errors:
        report.errors.extend(errors)
        return report
    block = comp.from_dict(data["composition"])
    report.checks.append("composition structure and weights")
    unused = sorted(set(data["adapters"]) - set(block.members()))
    for name in unused:
        report.warn(AdapterkitError(f"adapter {name!r} is not used by the composition", file=file,
                                    location=f"$.adapters{member_key(name)}", code="unused_adapter"))
    adapters: dict[str, Adapter] = {}
    for name in block.members():
        ref, where = data["adapters"][name], f"$.adapters{member_key(name)}"
        try:
            member = member_path(path, ref["path"], file, f"{where}.path")
        except AdapterkitError as exc:
            report.error(exc)
            continue
        sub = validate(member, base, format=ref.get("format"), registry=registry)
        for exc in sub.errors:
            report.error(_prefixed(exc, name, where))
        for exc in sub.warnings:
            report.warn(_prefixed(exc, name, where))
        if sub.adapter is None or sub.errors:
            continue
        if ref.get("method") and ref["method"] != sub.adapter.method:
            report.error(ManifestError(f"member {name!r} is a {sub.adapter.method} adapter, not the recorded "
                                       f"{ref['method']}", file=file, location=f"{where}.method",
                                       expected=ref["method"], found=sub.adapter.method, code="member_mismatch"))
            continue
        adapters[name] = sub.adapter
    report.checks.append("member adapters" + (" and their fit to the base" if base is not None else ""))
    if base is None:
        report.not_checked.append("fit of the members to a base model (pass --base)")
    if len(adapters) == len(block.members()):
        methods = sorted({a.method for a in adapters.values()})
        report.method = methods[0] if len(methods) == 1 else None
        try:
            check_members(block, adapters, registry)
        except AdapterkitError as exc:
            exc.file = exc.file or file
            exc.location = exc.location or "$.composition"
            report.error(exc)
        report.checks.append("members share one method that runs the composition, and one base")
    else:
        report.not_checked.append("one method and one base across the members (a member did not load)")
    return report


def _prefixed(exc: AdapterkitError, name: str, where: str) -> AdapterkitError:
    exc.message = f"member {name!r} ({where}): {exc.message}"
    return exc
