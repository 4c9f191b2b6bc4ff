"""Reading and writing the native adapterkit folder: adapter.json + adapter.safetensors."""

from __future__ import annotations

import copy
from pathlib import Path

from . import manifest as manifest_mod
from . import safetensors_io
from .adapter import Adapter
from .errors import AdapterkitError, ManifestError
from .io import atomic_write_bytes, canonical_json
from .manifest import MANIFEST_NAME
from .plugins import Registry
from .validate import ValidationReport, check_native, check_tensors, method_schema_errors

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
