"""Validation: every check ``adapterkit validate`` runs, collected into a report.

The checks never stop at the first problem: a user fixing a file wants the
whole list. :func:`check_native` also serves the native reader, which raises
the first error instead.
"""

from __future__ import annotations

from typing import Any

from adapterkit.core.errors import AdapterkitError, ManifestError, TensorFileError, UsageError
from adapterkit.core.format import manifest as manifest_mod, safetensors_io
from adapterkit.core.format.adapter import DTYPE_NAMES, Adapter
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.io import canonical_json
from adapterkit.core.plugin.registry import Registry


def manifest_errors(manifest: Manifest, registry: Registry | None = None, file: str | None = None) -> list[AdapterkitError]:
    """Every schema problem of an in-memory manifest, as if it were written: the manifest schema, then the
    method's config and target schemas. Readers use it on manifest facts a foreign file carries (a record
    an attacker can edit while the tensors stay intact) before trusting them."""
    from adapterkit.core.plugin.registry import default_registry

    try:
        document = manifest.to_dict()
        if not document.get("tensors"):  # tensors are listed on save; a placeholder keeps the schema whole
            document["tensors"] = {"adapter.safetensors": {"sha256": "0" * 64, "size": 8}}
        canonical_json(document)  # JSON has no NaN / Infinity (and jsonschema lets NaN through every bound)
        _, errors = manifest_mod.check(document, file)
    except AdapterkitError as exc:
        return [exc]
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        return [ManifestError(f"manifest cannot be checked: {type(exc).__name__}: {exc}", file=file, code="schema")]
    if errors:
        return list(errors)
    try:
        method = (registry or default_registry()).method(manifest.method)
    except AdapterkitError as exc:
        return [exc]
    return list(method_schema_errors(manifest, method, file))




def method_schema_errors(manifest: Manifest, method: Any, file: str | None) -> list[ManifestError]:
    """The method config and every target checked against the method plugin's schemas."""
    errors = manifest_mod.schema_errors(manifest.config, method.config_schema(), file, ["method", "config"])
    target_schema = method.target_schema()
    for module, target in manifest.targets.items():
        errors.extend(manifest_mod.schema_errors(target, target_schema, file, ["targets", module]))
    return errors




def check_tensors(adapter: Adapter, registry: Registry, report: ValidationReport, file: str | None = None) -> None:
    """Expected tensors present with the right shapes and dtype, nothing extra, all finite."""
    report.errors.extend(structure_errors(adapter, registry, file))
    for key, array in sorted(adapter.tensors.items()):
        bad = safetensors_io.non_finite_count(array)
        if bad:
            report.error(TensorFileError(f"tensor holds {bad} NaN or infinite values", file=file, location=key,
                                         hint="the training diverged; retrain or restore a checkpoint", code="non_finite"))
    report.checks.append("expected tensors, shapes, dtypes, finite values")


def structure_errors(adapter: Adapter, registry: Registry, file: str | None = None) -> list[AdapterkitError]:
    """What makes ``adapter`` inconsistent with its own manifest: each target's method check, the exact
    set of expected tensors with their shapes, and the manifest dtype (values are not looked at)."""
    errors: list[AdapterkitError] = []
    try:
        method = registry.method(adapter.method)
    except AdapterkitError as exc:
        return [exc]
    manifest = adapter.manifest
    expected: dict[str, tuple[int, ...]] = {}
    for module, target in manifest.targets.items():
        location = manifest_mod.json_path(["targets", module])
        for problem in method.check_target(module, target, manifest.config):
            errors.append(ManifestError(problem, file=file, location=location, code="target"))
        try:
            expected.update(method.expected_tensors(module, target, manifest.config))
        except (KeyError, TypeError, ValueError) as exc:
            errors.append(ManifestError(f"target cannot be interpreted: {exc}", file=file, location=location,
                                        code="target"))
    try:
        expected.update(method.shared_tensors(manifest.targets, manifest.config))
    except (KeyError, TypeError, ValueError) as exc:
        errors.append(ManifestError(f"shared tensors cannot be worked out: {exc}", file=file, location="$.targets",
                                    code="target"))
    want_dtype = DTYPE_NAMES.get(manifest.dtype)
    for key, shape in sorted(expected.items()):
        array = adapter.tensors.get(key)
        if any(int(d) == 0 for d in shape):
            errors.append(TensorFileError("the target makes this tensor empty (no adapter tensor is empty)", file=file,
                                          location=key, found=list(shape),
                                          hint="leave a module that adds nothing (rank 0) out of targets",
                                          code="empty_tensor"))
        elif array is None:
            errors.append(TensorFileError("expected tensor is missing", file=file, location=key, expected=list(shape),
                                          code="missing_tensor"))
        elif tuple(array.shape) != tuple(shape):
            errors.append(TensorFileError("tensor has the wrong shape", file=file, location=key,
                                          expected=list(shape), found=list(array.shape), code="shape"))
    for key in sorted(set(adapter.tensors) - set(expected)):
        errors.append(TensorFileError("unexpected tensor (no target needs it)", file=file, location=key,
                                      hint="remove it or add its module to targets", code="unexpected_tensor"))
    for key, array in sorted(adapter.tensors.items()):
        name = safetensors_io.dtype_name(array)
        if name in safetensors_io.FLOAT_DTYPES and want_dtype and name != want_dtype:
            errors.append(TensorFileError("tensor dtype differs from the manifest dtype", file=file, location=key,
                                          expected=want_dtype, found=name, code="dtype"))
    return errors


def require_consistent(adapter: Adapter, registry: Registry | None = None, file: str | None = None,
                       reader: str | None = None) -> Adapter:
    """Return ``adapter`` if it is consistent with its manifest (:func:`structure_errors`), else raise the first
    problem. Every format reader ends with it, so no reader returns an adapter that fails later."""
    from adapterkit.core.plugin.registry import default_registry

    errors = structure_errors(adapter, registry or default_registry(), file)
    if errors:
        first = errors[0]
        if reader is not None:
            first.message = f"the {reader} reader produced an inconsistent adapter: {first.message}"
            first.hint = first.hint or "the file is damaged (save the adapter again), or the format plugin has a bug"
        raise first
    return adapter


def _name(adapter: Adapter, index: int) -> str:
    return str(adapter.source) if adapter.source else f"adapter #{index + 1}"


#: base_model fields that must agree between adapters used together (compose, a composition)
BASE_FIELDS = ("model_type", "architecture", "num_parameters")
#: base_model fields kept in a combined adapter's manifest when every input agrees on them
COMMON_BASE_FIELDS = ("name", "revision", *BASE_FIELDS)


def same_base(adapters: list[Adapter]) -> dict[str, Any]:
    """Check the adapters were made for one base (same base fields; same kind and shape for shared modules);
    returns the base fields they all agree on. Raises UsageError naming what differs."""
    out: dict[str, Any] = {}
    for field_name in COMMON_BASE_FIELDS:
        values = {a.manifest.base_model.get(field_name) for a in adapters} - {None}
        if len(values) > 1 and field_name in BASE_FIELDS:
            raise UsageError(f"the adapters were made for different base models (base_model.{field_name} differs)",
                             location=f"$.base_model.{field_name}", found=sorted(map(str, values)),
                             hint="compose only adapters trained on the same base model", code="different_bases")
        if len(values) == 1:
            out[field_name] = values.pop()
    seen: dict[str, tuple[str, Any, list[int]]] = {}
    for index, adapter in enumerate(adapters):
        for module, target in adapter.targets.items():
            entry = (_name(adapter, index), target.get("kind"), [int(d) for d in target["shape"]])
            first = seen.setdefault(module, entry)
            if first[1:] != entry[1:]:
                raise UsageError(
                    "the adapters were made for different base models: a module differs in kind or shape",
                    location=module, expected=f"{first[1]} {first[2]} (in {first[0]})",
                    found=f"{entry[1]} {entry[2]} (in {entry[0]})", code="different_bases")
    same_modules = [a for a in adapters if set(a.targets) == set(adapters[0].targets)]
    fingerprints = {a.manifest.base_model.get("fingerprint") for a in same_modules} - {None}
    if len(fingerprints) > 1:
        raise UsageError("the adapters adapt the same modules but record different base fingerprints",
                         location="$.base_model.fingerprint", found=sorted(fingerprints), code="different_bases")
    return out
