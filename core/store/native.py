"""Reading and writing the native adapterkit folder: adapter.json + adapter.safetensors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from adapterkit.core.errors import AdapterkitError, IntegrityError, ManifestError, TensorFileError
from adapterkit.core.format import manifest as manifest_mod, safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.format.manifest import MANIFEST_NAME, Manifest
from adapterkit.core.format.report import ValidationReport
from adapterkit.core.io import atomic_write_bytes, canonical_json, read_json, safe_child, sha256_file
from adapterkit.core.plugin.registry import Registry
from adapterkit.core.store.consistency import check_tensors, method_schema_errors

TENSOR_FILE = "adapter.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}


def read_native(path: Path, registry: Registry) -> Adapter:
    """Load and fully verify an adapterkit folder; raise the first problem found."""
    report = check_native(path, registry)
    if report.errors:
        raise report.errors[0]
    assert report.adapter is not None
    return report.adapter


def write_native(adapter: Adapter, folder: Path, registry: Registry) -> None:
    """Write ``adapter`` into ``folder``: deterministic bytes, manifest last."""
    problems = ValidationReport(str(folder))
    check_tensors(adapter, registry, problems, file="(adapter to save)")
    manifest = copy.deepcopy(adapter.manifest)
    data = safetensors_io.serialize(adapter.tensors, SAFETENSORS_METADATA)
    manifest.tensors = {TENSOR_FILE: {"sha256": _sha256(data), "size": len(data)}}
    document = manifest.to_dict()
    _, schema_problems = manifest_mod.check(copy.deepcopy(document), "(adapter to save)")
    method_problems = method_schema_errors(manifest, registry.method(manifest.method), "(adapter to save)")
    errors = [*schema_problems, *method_problems, *problems.errors]
    if errors:
        first: AdapterkitError = errors[0]
        raise ManifestError(
            f"refusing to save an invalid adapter ({len(errors)} problem(s)); first: {first}",
            file=str(folder / MANIFEST_NAME), code="invalid_adapter",
        )
    atomic_write_bytes(folder / TENSOR_FILE, data)
    atomic_write_bytes(folder / MANIFEST_NAME, canonical_json(document))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


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


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(version).split(".") if part.isdigit())


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
