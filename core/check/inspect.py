"""``adapterkit.inspect``: a summary of an adapter (method, targets, ranks, parameters, sizes)."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from adapterkit.core.format import composition as comp
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.composition import is_composition
from adapterkit.core.format.targeting import PARAMETER
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.store.adapters import load
from adapterkit.core.store.composition_folder import FORMAT, load_composition


def inspect(path: str | Path, base: str | Path | None = None, *, format: str | None = None,
            registry: Registry | None = None, **options: Any) -> dict[str, Any]:
    """A summary of an adapter: method, targets, ranks, parameters, sizes.

    ``base`` (a local HF model folder) goes to a reader that needs it (torchtune, PEFT prompt
    tuning, ...); ``options`` to the reader as ``-O`` options do.
    """
    registry = registry or default_registry()
    if format is None and is_composition(Path(path)):
        return inspect_composition(path, base, registry=registry)
    adapter = load(path, format, base=base, registry=registry, **options)
    return summarize(adapter)


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
    experts = _expert_parameters(adapter)
    if experts:
        summary["expert_parameters"] = experts
    base_params = manifest.base_model.get("num_parameters")
    if base_params:
        summary["base_parameters"] = base_params
        summary["parameters_relative_to_base"] = adapter.num_parameters / base_params
    if adapter.warnings:  # what the reader had to decide (e.g. how an old release's file is meant)
        summary["warnings"] = list(adapter.warnings)
    if manifest.provenance:
        summary["provenance"] = {k: v for k, v in manifest.provenance.items() if k != "converted_from"}
        if "converted_from" in manifest.provenance:
            summary["provenance"]["converted_from"] = manifest.provenance["converted_from"].get("format")
    return summary


def _expert_parameters(adapter: Adapter) -> dict[str, dict[str, Any]]:
    """Each stacked ``parameter`` target (``[experts, d1, d2]``): experts, shape, the adapter's parameters on it."""
    out = {}
    for name, target in sorted(adapter.manifest.targets.items()):
        shape = list(target.get("shape") or ())
        if target.get("kind") != PARAMETER or len(shape) != 3:
            continue
        own = {k: v for k, v in adapter.module_tensors(name).items() if "." not in k}  # shared tensors have a dot
        out[name] = {"experts": shape[0], "shape": shape, "parameters": int(sum(v.size for v in own.values())),
                     **{k: target[k] for k in ("r", "layout") if k in target}}
    return out


def _file_sizes(adapter: Adapter) -> dict[str, int]:
    source = adapter.source
    if source is None:
        return {}
    if source.is_file():
        return {source.name: source.stat().st_size}
    return {p.name: p.stat().st_size for p in sorted(source.iterdir()) if p.is_file()}


def inspect_composition(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                        registry: Registry | None = None) -> dict[str, Any]:
    """The summary ``adapterkit inspect`` gives a composition folder (members loaded and summarised)."""
    from adapterkit.core.check.inspect import summarize

    folder = load_composition(path, base, registry=registry)
    block = folder.composition
    weighted = [{"type": b.kind, "children": [c if isinstance(c, str) else c.kind for c in b.children],
                 "coefficients": b.coefficients()}
                for b in block.blocks() if isinstance(b, (comp.Average, comp.WeightedSum))]
    return {
        "path": str(folder.path),
        "format": FORMAT,
        "format_version": folder.document["format_version"],
        "composition": block.to_dict(),
        "kinds": block.kinds(),
        "coefficients": weighted,
        "method": next(iter({a.method for a in folder.adapters.values()})),
        "base_model": folder.document.get("base_model", {}),
        "members": {name: {"path": ref["path"], **{k: v for k, v in summarize(folder.adapters[name]).items()
                                                    if k in ("format", "method", "targets", "ranks", "parameters")}}
                    for name, ref in folder.references.items()},
        "parameters": sum(a.num_parameters for a in folder.adapters.values()),
    }
