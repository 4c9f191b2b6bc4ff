"""The composition folder: ``composition.json`` + member adapters (or relative references to them).

Torch-free. ``adapterkit validate`` and ``inspect`` recognise a folder holding
``composition.json`` before format detection (a composition is not an adapter,
so it is no format plugin); docs/compose.md, "Runtime composition", is the spec::

    my-mix/
      composition.json        {"format": "adapterkit-composition", "format_version": "1.0",
                               "composition": {"type": "weighted_sum", "children": ["a", "b"], "weights": [1, 0.5]},
                               "adapters": {"a": {"path": "adapters/a", "method": "lora"},
                                            "b": {"path": "../b-lora", "method": "lora"}}}
      adapters/a/             an adapterkit adapter folder (copied in)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, ManifestError, UsageError, VersionError
from adapterkit.core.format import composition as comp
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.composition import COMPOSITION_NAME
from adapterkit.core.format.manifest import json_path, packaged_schema, parse_version, relaxed_schema, schema_errors
from adapterkit.core.io import atomic_directory, atomic_write_bytes, canonical_json, read_json
from adapterkit.core.plugin.capabilities import composition_refusal
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.store.consistency import same_base

FORMAT = "adapterkit-composition"
FORMAT_VERSION = "1.0"
CURRENT_MAJOR, CURRENT_MINOR = 1, 0
MEMBERS_DIR = "adapters"


def schema(major: int = CURRENT_MAJOR) -> dict[str, Any]:
    """The composition manifest JSON Schema of a major version (shipped in adapterkit/schema)."""
    return packaged_schema("composition", major)




@dataclass
class CompositionFolder:
    """A read composition folder: the block, the member references, and (when loaded) the member adapters."""

    path: Path
    composition: comp.Block
    references: dict[str, dict[str, Any]]
    document: dict[str, Any]
    adapters: dict[str, Adapter] = field(default_factory=dict)

    def member_path(self, name: str) -> Path:
        return self.path / self.references[name]["path"]


# ---- reading ----------------------------------------------------------------------------

def check_document(data: Any, file: str | None = None) -> list[AdapterkitError]:
    """Every problem of a parsed ``composition.json`` on its own: version, schema, block structure, names."""
    if not isinstance(data, dict):
        return [ManifestError("composition.json must hold a JSON object", file=file, location="$",
                              found=type(data).__name__, code="schema")]
    if data.get("format") != FORMAT:
        return [ManifestError("not an adapterkit composition manifest", file=file, location="$.format",
                              expected=FORMAT, found=data.get("format"), code="schema")]
    try:
        major, minor = parse_version(data.get("format_version"), file)
    except AdapterkitError as exc:
        return [exc]
    if major != CURRENT_MAJOR:
        return [VersionError(f"composition format {major}.{minor} is not readable by this release",
                             file=file, location="$.format_version", expected=f"{CURRENT_MAJOR}.x",
                             found=data["format_version"], hint="upgrade adapterkit", code="unsupported_version")]
    doc = schema(major) if minor <= CURRENT_MINOR else relaxed_schema("composition", major)
    errors: list[AdapterkitError] = list(schema_errors(data, doc, file))
    if errors:
        return errors
    block = comp.from_dict(data["composition"])
    errors.extend(ManifestError(message, file=file, location=where, code="bad_composition")
                  for where, message in comp.problems(block, "$.composition"))
    references = data["adapters"]
    for name in block.members():
        if name not in references:
            errors.append(ManifestError(f"the composition uses adapter {name!r}, which $.adapters does not define",
                                        file=file, location=_leaf_path(block, name), expected=sorted(references),
                                        code="unknown_adapter"))
    return errors


def _leaf_path(block: comp.Block, name: str, path: str = "$.composition") -> str:
    for index, child in enumerate(block.children):
        where = f"{path}.children[{index}]"
        if child == name:
            return where
        if isinstance(child, comp.Block) and name in child.members():
            return _leaf_path(child, name, where)
    return path


def read_composition(path: str | os.PathLike[str]) -> CompositionFolder:
    """Read and check ``composition.json`` (members not loaded); raise the first problem."""
    path = Path(path)
    file = str(path / COMPOSITION_NAME)
    data = read_json(file)
    errors = check_document(data, file)
    if errors:
        raise errors[0]
    return CompositionFolder(path, comp.from_dict(data["composition"]), dict(data["adapters"]), data)


def load_composition(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                     registry: Registry | None = None) -> CompositionFolder:
    """Read a composition folder and load every member adapter (any format) into ``folder.adapters``;
    ``base`` goes to the members' readers that need one."""
    from adapterkit.core.store.adapters import load

    registry = registry or default_registry()
    folder = read_composition(path)
    file = str(folder.path / COMPOSITION_NAME)
    for name, ref in folder.references.items():
        where = f"$.adapters{member_key(name)}"
        member = member_path(folder.path, ref["path"], file, f"{where}.path")
        adapter = load(member, ref.get("format"), base=base, registry=registry)
        if ref.get("method") and ref["method"] != adapter.method:
            raise ManifestError(f"member {name!r} is a {adapter.method} adapter, not the recorded {ref['method']}",
                                file=file, location=f"{where}.method", expected=ref["method"], found=adapter.method,
                                code="member_mismatch")
        folder.adapters[name] = adapter
    return folder


def member_key(name: str) -> str:
    return json_path([name])[1:]


def member_path(root: Path, reference: str, file: str, location: str) -> Path:
    if os.path.isabs(reference) or "\\" in reference:
        raise ManifestError("a member path must be relative to the composition folder and '/'-separated",
                            file=file, location=location, found=reference, code="path_escape")
    member = root / reference
    if not member.exists():
        raise ManifestError("member adapter not found", file=file, location=location, found=str(member),
                            hint="copy the member in (save_composition with an Adapter) or fix the relative path",
                            code="missing_file")
    return member


# ---- writing ----------------------------------------------------------------------------

def save_composition(
    out_dir: str | os.PathLike[str],
    composition: Any,
    adapters: Mapping[str, Adapter | str | os.PathLike[str]],
    *,
    overwrite: bool = False,
    annotations: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> Path:
    """Write a composition folder atomically.

    ``adapters`` maps each member name to an :class:`Adapter` (written as an adapterkit folder
    under ``adapters/<name>``) or to a path (recorded relative to ``out_dir``, not copied).
    """
    from adapterkit.core.store.adapters import detect_format, load as load_adapter

    registry = registry or default_registry()
    block = comp.check(comp.parse(composition))
    members = block.members()
    missing, extra = [n for n in members if n not in adapters], sorted(set(adapters) - set(members))
    if missing or extra:
        raise UsageError("the adapters must be exactly the composition's members", expected=members,
                         found=sorted(adapters), hint=f"missing {missing}, unused {extra}", code="bad_composition")
    out_dir = Path(out_dir)
    loaded = {n: a if isinstance(a, Adapter) else load_adapter(a, registry=registry) for n, a in adapters.items()}
    check_members(block, loaded, registry)
    references: dict[str, dict[str, Any]] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for name in members:
            source = adapters[name]
            if isinstance(source, Adapter):
                fmt = registry.format("adapterkit")
                (tmp / MEMBERS_DIR / name).mkdir(parents=True)
                fmt.write(source, tmp / MEMBERS_DIR / name, registry=registry)
                references[name] = {"path": f"{MEMBERS_DIR}/{name}", "method": source.method}
            else:
                target = Path(source).resolve()
                rel = Path(os.path.relpath(target, out_dir.resolve())).as_posix()
                ref = {"path": rel, "method": loaded[name].method}
                fmt_name = detect_format(target, registry)
                if fmt_name != "adapterkit":
                    ref["format"] = fmt_name
                references[name] = ref
        document: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "composition": block.to_dict(), "adapters": references,
        }
        base = {k: v for k, v in same_base(list(loaded.values())).items() if k != "revision"}
        if base:
            document["base_model"] = base
        if annotations:
            document["annotations"] = dict(annotations)
        errors = check_document(json.loads(canonical_json(document)), str(out_dir / COMPOSITION_NAME))
        if errors:
            raise errors[0]
        atomic_write_bytes(tmp / COMPOSITION_NAME, canonical_json(document))
    return out_dir


def check_members(block: comp.Block, adapters: Mapping[str, Adapter], registry: Registry) -> Any:
    """One method that can run ``block``, one base: raise UsageError naming the problem."""
    methods = sorted({a.method for a in adapters.values()})
    if len(methods) > 1:
        raise UsageError("a composition's members must be of one method", found=methods,
                         hint="compose adapters of each method separately", code="mixed_methods")
    method = registry.method(methods[0])
    refusal = composition_refusal(method, block)
    if refusal:
        raise UsageError(refusal, code="composition_unsupported")
    same_base(list(adapters.values()))
    return method


# ---- validate / inspect ------------------------------------------------------------------





