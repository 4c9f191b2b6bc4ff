"""The adapter manifest (adapter.json): model, versioning, schema checks, migrations.

Version policy (docs/format.md): a reader accepts any 1.x. Fields unknown to
this release are an error in a file of a minor this release knows, and are
ignored in a file of a newer minor. A newer major is refused. Older versions
are upgraded by explicit migration functions registered in ``MIGRATIONS``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from adapterkit.core.errors import ManifestError, VersionError

FORMAT = "adapterkit"
FORMAT_VERSION = "1.0"
CURRENT_MAJOR, CURRENT_MINOR = 1, 0
MANIFEST_NAME = "adapter.json"

Migration = Callable[[dict[str, Any]], dict[str, Any]]
# source "MAJOR.MINOR" -> function returning a manifest of a later version.
MIGRATIONS: dict[str, Migration] = {}


def register_migration(source_version: str) -> Callable[[Migration], Migration]:
    """Register ``fn`` to upgrade manifests of ``source_version`` (a pre-1.0 or older 1.x)."""

    def decorator(fn: Migration) -> Migration:
        MIGRATIONS[source_version] = fn
        return fn

    return decorator


@functools.cache
def packaged_schema(name: str, major: int) -> dict[str, Any]:
    """The JSON Schema ``<name>-<major>.json`` shipped in adapterkit/schema (``manifest``, ``composition``)."""
    folder = resources.files("adapterkit.schema")
    try:
        text = folder.joinpath(f"{name}-{major}.json").read_text("utf-8")
    except FileNotFoundError:
        shipped = sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{name}-"))
        raise VersionError(f"no {name} schema for major version {major}", expected=shipped) from None
    return json.loads(text)


@functools.cache
def relaxed_schema(name: str, major: int) -> dict[str, Any]:
    """The schema without ``additionalProperties: false``, for documents of a newer minor version."""
    return _relax(packaged_schema(name, major))


def _relax(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _relax(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(node, list):
        return [_relax(v) for v in node]
    return node


def schema(major: int = CURRENT_MAJOR) -> dict[str, Any]:
    """The manifest JSON Schema of a major version (shipped in adapterkit/schema)."""
    return packaged_schema("manifest", major)


def parse_version(value: Any, file: str | None = None) -> tuple[int, int]:
    match = re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", value) if isinstance(value, str) else None
    if not match:
        raise ManifestError(
            "format_version must be a string MAJOR.MINOR", file=file, location="$.format_version",
            expected='"1.0"', found=value, code="bad_version",
        )
    return int(match.group(1)), int(match.group(2))


def json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def schema_errors(instance: Any, schema_doc: dict[str, Any], file: str | None, prefix: Iterable[Any] = ()) -> list[ManifestError]:
    """Every JSON Schema violation as a ManifestError naming its JSON path."""
    import jsonschema  # imported here: only validation needs it

    validator = jsonschema.Draft202012Validator(schema_doc, format_checker=_format_checker())
    errors = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        errors.append(
            ManifestError(
                _schema_message(error), file=file, location=json_path([*prefix, *error.absolute_path]), code="schema"
            )
        )
    return errors


@functools.cache
def _format_checker() -> Any:
    """jsonschema's checker, with date-time checked even without optional packages."""
    import datetime

    import jsonschema

    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value):
            raise ValueError("not an RFC 3339 date-time (e.g. 2026-11-28T18:45:00Z)")
        datetime.datetime.fromisoformat(value.replace("z", "Z"))
        return True

    return checker


def _schema_message(error: Any) -> str:
    if error.validator == "additionalProperties" and error.validator_value is False:
        return error.message + "; remove the field or check its spelling"
    return error.message


def upgrade(data: dict[str, Any], file: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Bring a manifest to the current major through registered migrations.

    Returns the upgraded manifest and the versions it passed through.
    """
    steps: list[str] = []
    version = data.get("format_version")
    major, minor = parse_version(version, file)
    while major < CURRENT_MAJOR:
        key = f"{major}.{minor}"
        if key not in MIGRATIONS:
            raise VersionError(
                f"format_version {key} is older than this release reads and no migration exists for it",
                file=file, location="$.format_version", expected=f"{CURRENT_MAJOR}.x", found=version,
                hint="convert it with the adapterkit release that wrote it", code="old_version",
            )
        data = MIGRATIONS[key](copy.deepcopy(data))
        steps.append(key)
        version = data.get("format_version")
        new = parse_version(version, file)
        if new <= (major, minor):
            raise VersionError(f"migration from {key} did not advance the version", file=file, code="bad_migration")
        major, minor = new
    if major > CURRENT_MAJOR:
        raise VersionError(
            f"format_version {version} is a newer major version than this release reads",
            file=file, location="$.format_version", expected=f"{CURRENT_MAJOR}.x", found=version,
            hint="upgrade adapterkit (pip install -U adapterkit)", code="new_major",
        )
    return data, steps


def check(data: Any, file: str | None = None) -> tuple[dict[str, Any], list[ManifestError]]:
    """Migrate and schema-check a parsed manifest. Returns (manifest, errors)."""
    if not isinstance(data, dict):
        return {}, [ManifestError("manifest must be a JSON object", file=file, location="$", found=type(data).__name__, code="schema")]
    if data.get("format") != FORMAT:
        return data, [
            ManifestError(
                "not an adapterkit manifest", file=file, location="$.format", expected=FORMAT,
                found=data.get("format"), code="schema",
            )
        ]
    data, _ = upgrade(data, file)
    major, minor = parse_version(data["format_version"], file)
    newer_minor = minor > CURRENT_MINOR
    doc = relaxed_schema("manifest", major) if newer_minor else schema(major)
    errors = schema_errors(data, doc, file)
    if newer_minor and not errors:
        data = _drop_unknown(data, schema(major))
    return data, errors


def _drop_unknown(node: Any, doc: dict[str, Any]) -> Any:
    """Remove the fields a newer minor added, so code sees only what it knows."""
    if not isinstance(node, dict) or doc.get("type") != "object":
        return node
    props = doc.get("properties", {})
    extra = doc.get("additionalProperties")
    out = {}
    for key, value in node.items():
        if key in props:
            out[key] = _drop_unknown(value, props[key])
        elif isinstance(extra, dict):
            out[key] = _drop_unknown(value, extra)
        elif extra is not False:
            out[key] = value
    return out


@dataclass
class Manifest:
    """The in-memory manifest. ``targets`` maps module path -> per-module fields."""

    method: str
    config: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    dtype: str
    method_version: str = "1"
    base_model: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    task: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        method = data["method"]
        return cls(
            method=method["name"],
            method_version=method.get("version", "1"),
            config=dict(method.get("config", {})),
            targets={k: dict(v) for k, v in data["targets"].items()},
            dtype=data["dtype"],
            base_model=dict(data.get("base_model", {})),
            tensors={k: dict(v) for k, v in data.get("tensors", {}).items()},
            task=data.get("task"),
            provenance=dict(data.get("provenance", {})),
            annotations=dict(data.get("annotations", {})),
            format_version=data.get("format_version", FORMAT_VERSION),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest as written: current version, defaults and empty fields left out."""
        method: dict[str, Any] = {"name": self.method, "config": self.config}
        if self.method_version != "1":
            method["version"] = self.method_version
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method,
            "base_model": {k: v for k, v in self.base_model.items() if v is not None},
            "targets": self.targets,
            "dtype": self.dtype,
            "tensors": self.tensors,
        }
        for key in ("task", "provenance", "annotations"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out
