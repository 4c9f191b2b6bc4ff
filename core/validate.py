"""Validation: every check ``adapterkit validate`` runs, collected into a report.

The checks never stop at the first problem: a user fixing a file wants the
whole list. :func:`check_native` also serves the native reader, which raises
the first error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest as manifest_mod
from . import safetensors_io
from .adapter import DTYPE_NAMES, Adapter
from .base_model import read_base_model, targets_fingerprint
from .errors import AdapterkitError, BaseModelError, IntegrityError, ManifestError, TensorFileError
from .io import canonical_json, read_json, safe_child, sha256_file
from .manifest import MANIFEST_NAME, Manifest
from .plugins import Registry


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

    @property
    def valid(self) -> bool:
        return not self.errors

    def error(self, exc: AdapterkitError) -> None:
        self.errors.append(exc)

    def warn(self, exc: AdapterkitError) -> None:
        exc.code = exc.code if exc.code != "error" else "warning"
        self.warnings.append(exc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "method": self.method, "valid": self.valid,
            "errors": [e.to_dict() for e in self.errors], "warnings": [w.to_dict() for w in self.warnings],
            "checks": self.checks, "not_checked": self.not_checked,
        }


def check_native(path: Path, registry: Registry, report: ValidationReport | None = None) -> ValidationReport:
    """Check an adapterkit folder: manifest, method config, files, checksums, tensors."""
    report = report or ValidationReport(str(path), format="adapterkit")
    manifest_path = path / MANIFEST_NAME
    file = str(manifest_path)
    try:
        raw = read_json(manifest_path)
        data, errors = manifest_mod.check(raw, file)
    except AdapterkitError as exc:
        report.error(exc)
        return report
    report.checks.append("manifest schema")
    if errors:
        report.errors.extend(errors)
        return report
    manifest = Manifest.from_dict(data)
    report.method = manifest.method
    try:
        method = registry.method(manifest.method)
    except AdapterkitError as exc:
        exc.file, exc.location = file, "$.method.name"
        report.error(exc)
        return report
    if _version_tuple(manifest.method_version) > _version_tuple(method.version):
        report.error(ManifestError(
            f"method {manifest.method!r} version {manifest.method_version} is newer than the installed plugin's "
            f"{method.version}", file=file, location="$.method.version", expected=f"<= {method.version}",
            found=manifest.method_version, hint="upgrade the plugin that provides this method", code="new_method_version",
        ))
        return report
    report.errors.extend(method_schema_errors(manifest, method, file))
    report.checks.append(f"{manifest.method} config and targets")
    if report.errors:
        return report
    tensors = _read_tensor_files(path, manifest, file, report)
    if tensors is None:
        return report
    fp = manifest.base_model.get("fingerprint")
    if fp and fp != targets_fingerprint(manifest.targets):
        report.error(ManifestError(
            "base_model.fingerprint does not match the targets' shapes", file=file, location="$.base_model.fingerprint",
            expected=targets_fingerprint(manifest.targets), found=fp, hint="the manifest was edited by hand; regenerate it",
            code="fingerprint",
        ))
    adapter = Adapter(manifest, tensors, source=path, source_format="adapterkit")
    check_tensors(adapter, registry, report, file=str(path))
    report.adapter = adapter
    return report


def manifest_errors(manifest: Manifest, registry: Registry | None = None, file: str | None = None) -> list[AdapterkitError]:
    """Every schema problem of an in-memory manifest, as if it were written: the manifest schema, then the
    method's config and target schemas. Readers use it on manifest facts a foreign file carries (a record
    an attacker can edit while the tensors stay intact) before trusting them."""
    from .plugins import default_registry

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


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(version).split(".") if part.isdigit())


def method_schema_errors(manifest: Manifest, method: Any, file: str | None) -> list[ManifestError]:
    """The method config and every target checked against the method plugin's schemas."""
    errors = manifest_mod.schema_errors(manifest.config, method.config_schema(), file, ["method", "config"])
    target_schema = method.target_schema()
    for module, target in manifest.targets.items():
        errors.extend(manifest_mod.schema_errors(target, target_schema, file, ["targets", module]))
    return errors


def _read_tensor_files(path: Path, manifest: Manifest, file: str, report: ValidationReport) -> dict[str, np.ndarray] | None:
    tensors: dict[str, np.ndarray] = {}
    ok = True
    for name, entry in sorted(manifest.tensors.items()):
        location = manifest_mod.json_path(["tensors", name])
        try:
            tensor_path = safe_child(path, name, file, location)
            if not tensor_path.is_file():
                raise TensorFileError("tensor file listed in the manifest is missing", file=str(tensor_path), code="missing_file")
            size = tensor_path.stat().st_size
            if size != entry["size"]:
                raise IntegrityError("file size differs from the manifest", file=str(tensor_path),
                                     expected=entry["size"], found=size, hint="the file is truncated or was replaced",
                                     code="size_mismatch")
            digest = sha256_file(tensor_path)
            if digest != entry["sha256"]:
                raise IntegrityError("sha256 differs from the manifest: the file is corrupt or was modified",
                                     file=str(tensor_path), expected=entry["sha256"], found=digest, code="checksum")
            loaded, _ = safetensors_io.load(tensor_path)
        except AdapterkitError as exc:
            report.error(exc)
            ok = False
            continue
        for key, array in loaded.items():
            if key in tensors:
                report.error(TensorFileError("tensor key appears in two files", file=str(path / name), location=key, code="duplicate_key"))
                ok = False
            tensors[key] = array
    report.checks.append("tensor files, sizes and sha256")
    return tensors if ok else None


def check_tensors(adapter: Adapter, registry: Registry, report: ValidationReport, file: str | None = None) -> None:
    """Expected tensors present with the right shapes and dtype, nothing extra, all finite."""
    try:
        method = registry.method(adapter.method)
    except AdapterkitError as exc:
        report.error(exc)
        return
    manifest = adapter.manifest
    expected: dict[str, tuple[int, ...]] = {}
    for module, target in manifest.targets.items():
        for problem in method.check_target(module, target, manifest.config):
            report.error(ManifestError(problem, file=file, location=manifest_mod.json_path(["targets", module]), code="target"))
        try:
            expected.update(method.expected_tensors(module, target, manifest.config))
        except (KeyError, TypeError, ValueError) as exc:
            report.error(ManifestError(f"target cannot be interpreted: {exc}", file=file,
                                       location=manifest_mod.json_path(["targets", module]), code="target"))
    want_dtype = DTYPE_NAMES.get(manifest.dtype)
    for key, shape in sorted(expected.items()):
        array = adapter.tensors.get(key)
        if array is None:
            report.error(TensorFileError("expected tensor is missing", file=file, location=key, expected=list(shape), code="missing_tensor"))
        elif tuple(array.shape) != tuple(shape):
            report.error(TensorFileError("tensor has the wrong shape", file=file, location=key,
                                         expected=list(shape), found=list(array.shape), code="shape"))
    for key in sorted(set(adapter.tensors) - set(expected)):
        report.error(TensorFileError("unexpected tensor (no target needs it)", file=file, location=key,
                                     hint="remove it or add its module to targets", code="unexpected_tensor"))
    for key, array in sorted(adapter.tensors.items()):
        name = safetensors_io.dtype_name(array)
        if name in safetensors_io.FLOAT_DTYPES and want_dtype and name != want_dtype:
            report.error(TensorFileError("tensor dtype differs from the manifest dtype", file=file, location=key,
                                         expected=want_dtype, found=name, code="dtype"))
        bad = safetensors_io.non_finite_count(array)
        if bad:
            report.error(TensorFileError(f"tensor holds {bad} NaN or infinite values", file=file, location=key,
                                         hint="the training diverged; retrain or restore a checkpoint", code="non_finite"))
    report.checks.append("expected tensors, shapes, dtypes, finite values")


def check_base(adapter: Adapter, base: str | Path, report: ValidationReport) -> None:
    """The base has every target with the recorded shape, read from headers only."""
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
    shapes = []
    for module, target in sorted(adapter.targets.items()):
        shape = info.weight_shape(module)
        if shape is None:
            report.error(BaseModelError("adapted module does not exist in the base model", file=str(base),
                                        location=f"{module}.weight", hint="is this the right base model?", code="wrong_base"))
            continue
        if list(shape) != list(target["shape"]):
            report.error(BaseModelError("base weight shape differs from the adapter's target", file=str(base),
                                        location=f"{module}.weight", expected=list(target["shape"]), found=list(shape),
                                        hint="the adapter was made for another base model", code="wrong_base"))
        shapes.append((module, shape))
    want_fp = meta.get("fingerprint")
    if want_fp and len(shapes) == len(adapter.targets):
        from .base_model import fingerprint

        if fingerprint(shapes) != want_fp:
            report.error(BaseModelError("base fingerprint differs", file=str(base), expected=want_fp,
                                        found=fingerprint(shapes), code="wrong_base"))
    report.checks.append("base model: modules, shapes, fingerprint (headers only)")
