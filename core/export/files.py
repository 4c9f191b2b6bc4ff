"""The files of an ONNX export folder: the model and its one external data file, the manifest, the check.

An export folder (docs/onnx.md) holds::

    model.onnx          the graph (weights are not in it)
    model.onnx.data     every initializer over 1 KiB, one after another, 64-byte aligned
                        (4 KiB for tensors of 1 MiB or more, so ONNX Runtime can map them)
    adapters/*.onnx_adapter   swappable mode: one ONNX Runtime adapter file per adapter
    export.json         what is inside (see :func:`check_export`)

Weights always go to the data file, so a model of any size (over protobuf's 2 GB
limit too) has the same layout. Torch-free: onnx and numpy; onnxruntime only for
the optional session check.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core.errors import AdapterkitError, FormatError

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
MANIFEST_NAME = "export.json"
ADAPTERS_DIR = "adapters"
EXPORT_FORMAT = "adapterkit-onnx-export"
EXPORT_FORMAT_VERSION = "1.0"
SIZE_THRESHOLD = 1024
_ALIGN, _PAGE_ALIGN, _PAGE_FROM = 64, 4096, 1024 * 1024
_COPY_CHUNK = 16 * 1024 * 1024


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every initializer of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def finalize_model(src: Path, dst_dir: Path, *, defaults: Mapping[str, np.ndarray] | None = None,
                   metadata: Mapping[str, str] | None = None) -> None:
    """Rewrite the exporter's output ``src`` as ``dst_dir/model.onnx`` + ``dst_dir/model.onnx.data``.

    Streams tensor by tensor: inline weights and weights in the exporter's external
    files alike are copied into the one data file, so memory stays at one tensor.
    ``defaults`` adds an initializer per graph input name (ONNX Runtime lets a feed or
    an active adapter override it); ``metadata`` goes to the model's metadata_props.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    input_names = {i.name for i in model.graph.input}
    for name, value in sorted((defaults or {}).items()):
        if name not in input_names:
            raise AdapterkitError(f"no graph input named {name!r} to give a default", code="export_failed")
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    offset = 0
    with open(dst_dir / DATA_NAME, "wb") as data:
        for tensor in _graph_tensors(model.graph):
            payload = _tensor_bytes(tensor, src.parent)
            if payload is None:
                continue
            align = _PAGE_ALIGN if _size(payload) >= _PAGE_FROM else _ALIGN
            pad = -offset % align
            if pad:
                data.write(b"\0" * pad)
                offset += pad
            length = _write_payload(data, payload)
            tensor.ClearField("raw_data")
            for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(typed)
            del tensor.external_data[:]
            for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += length
    model.metadata_props.clear()
    for key, value in sorted((metadata or {}).items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(dst_dir / MODEL_NAME))


def _tensor_bytes(tensor: Any, folder: Path) -> bytes | tuple[Path, int, int] | None:
    """What to move to the data file: inline bytes, an (external file, offset, length) range, or None."""
    import onnx
    from onnx import external_data_helper as edh, numpy_helper

    if edh.uses_external_data(tensor):
        info = edh.ExternalDataInfo(tensor)
        file = (folder / info.location).resolve()
        if folder.resolve() not in file.parents:
            raise AdapterkitError("the exporter wrote an external data path outside its folder", file=str(file),
                                  code="export_failed")
        length = info.length if info.length else file.stat().st_size - (info.offset or 0)
        return file, int(info.offset or 0), int(length)
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    return raw if len(raw) > SIZE_THRESHOLD else None


def _size(payload: bytes | tuple[Path, int, int]) -> int:
    return len(payload) if isinstance(payload, bytes) else payload[2]


def _write_payload(out: Any, payload: bytes | tuple[Path, int, int]) -> int:
    if isinstance(payload, bytes):
        out.write(payload)
        return len(payload)
    file, start, length = payload
    with open(file, "rb") as src:
        src.seek(start)
        left = length
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise AdapterkitError("the exporter's external data file is shorter than its tensors", file=str(file),
                                      code="export_failed")
            out.write(chunk)
            left -= len(chunk)
    return length


# ---- describing and checking ---------------------------------------------------------------

def _value_info(value: Any) -> dict[str, Any]:
    import onnx

    kind = value.type.tensor_type
    dims: list[int | str] = [d.dim_param or d.dim_value if (d.dim_param or d.HasField("dim_value")) else "?"
                             for d in kind.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name, "shape": dims}


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Inputs, outputs (name, dtype, shape with symbolic dims by name), opset and metadata of a model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_value_info(v) for v in model.graph.input]
    return {
        "inputs": [i for i in inputs if i["name"] not in initializers],
        "overridable": [i for i in inputs if i["name"] in initializers],
        "outputs": [_value_info(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


@dataclass
class ExportCheck:
    """The result of :func:`check_export`."""

    path: str
    manifest: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "mode": self.manifest.get("mode"), "errors": self.errors,
                "checks": self.checks, "inputs": self.model.get("inputs", []),
                "overridable": self.model.get("overridable", []), "outputs": self.model.get("outputs", []),
                "opset": self.model.get("opset"), "adapters": self.adapters}


def read_manifest(folder: Path) -> dict[str, Any]:
    from adapterkit.core.io import read_json

    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"no {MANIFEST_NAME} in the folder", file=str(folder),
                          hint="point at a folder written by adapterkit export onnx", code="missing_file")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise FormatError(f"{MANIFEST_NAME} is not an adapterkit ONNX export manifest", file=str(path),
                          location="$.format", expected=EXPORT_FORMAT,
                          found=manifest.get("format") if isinstance(manifest, dict) else None, code="bad_manifest")
    major = str(manifest.get("format_version", "")).split(".")[0]
    if major != EXPORT_FORMAT_VERSION.split(".")[0]:
        raise FormatError("unsupported export manifest version", file=str(path), location="$.format_version",
                          expected=EXPORT_FORMAT_VERSION, found=manifest.get("format_version"), code="bad_version")
    return manifest


def check_export(folder: str | os.PathLike[str], *, session: bool = False) -> ExportCheck:
    """Check an export folder: manifest, files and sizes, ``onnx.checker`` on the model path, the
    inputs / outputs against the manifest, and each adapter file against the graph's factor inputs.

    ``session=True`` also opens an ONNX Runtime session (CPU) on the model and loads every adapter.
    Problems are collected in ``errors`` (nothing raises for a bad folder).
    """
    import onnx

    from adapterkit.core.format.onnx_adapter_file import read_adapter_file, split_name

    folder = Path(folder)
    report = ExportCheck(str(folder))
    try:
        report.manifest = manifest = read_manifest(folder)
    except AdapterkitError as exc:
        report.errors.append(str(exc))
        return report
    for name, size in sorted((manifest.get("files") or {}).items()):
        file = folder / name
        if not file.is_file():
            report.errors.append(f"{name}: listed in {MANIFEST_NAME} but missing")
        elif file.stat().st_size != size:
            report.errors.append(f"{name}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {size}")
    report.checks.append("files listed in the manifest exist with their sizes")
    model_path = folder / manifest.get("model", MODEL_NAME)
    try:
        onnx.checker.check_model(str(model_path))
        report.checks.append("onnx.checker on the model path (external data included)")
        report.model = describe_model(model_path)
    except Exception as exc:  # onnx raises ValidationError, protobuf DecodeError, OSError...
        report.errors.append(f"{model_path.name}: {type(exc).__name__}: {exc}")
        return report
    for key in ("inputs", "outputs"):
        listed = [i["name"] for i in manifest.get(key, [])]
        found = [i["name"] for i in report.model[key]]
        if listed != found:
            report.errors.append(f"{key} of the model are {found}, {MANIFEST_NAME} says {listed}")
    factor_inputs = {i["name"]: i for i in report.model["overridable"] if split_name(i["name"])}
    if manifest.get("mode") == "swappable":
        if not factor_inputs:
            report.errors.append("a swappable model has no factor inputs with defaults")
        report.checks.append("adapter files: names are factor inputs, fixed dims and ranks match")
    for name, entry in sorted((manifest.get("adapters") or {}).items()):
        report.adapters[name] = _check_adapter(folder / entry["file"], factor_inputs, report.errors,
                                               read_adapter_file)
    if session and report.ok:
        _check_session(model_path, [folder / e["file"] for e in (manifest.get("adapters") or {}).values()], report)
    return report


def _check_adapter(path: Path, factor_inputs: Mapping[str, Mapping[str, Any]], errors: list[str],
                   read: Any) -> dict[str, Any]:
    from adapterkit.core.format.onnx_adapter_file import split_name

    try:
        content = read(path)
    except AdapterkitError as exc:
        errors.append(str(exc))
        return {"file": path.name, "ok": False}
    problems = []
    ranks: dict[str, dict[str, int]] = {}
    for name, value in sorted(content.params.items()):
        graph = factor_inputs.get(name)
        if graph is None:
            problems.append(f"{name} is not a factor input of the model")
            continue
        if value.dtype != np.dtype(graph["dtype"]):
            problems.append(f"{name} is {value.dtype}, the model takes {graph['dtype']}")
        if value.ndim != len(graph["shape"]) or any(
                isinstance(d, int) and d != n for d, n in zip(graph["shape"], value.shape)):
            problems.append(f"{name} has shape {list(value.shape)}, the model takes {graph['shape']}")
            continue
        module, param = split_name(name)  # type: ignore[misc]
        ranks.setdefault(module, {})[param] = int(value.shape[1] if param == "A" else value.shape[0])
    for module, found in sorted(ranks.items()):
        if len(found) != 2:
            problems.append(f"{module}: only lora_{next(iter(found))} is in the file")
        elif found["A"] != found["B"]:
            problems.append(f"{module}: lora_A has rank {found['A']}, lora_B {found['B']}")
    errors.extend(f"{path.name}: {p}" for p in problems)
    return {"file": path.name, "ok": not problems, "parameters": len(content.params),
            "modules": len(ranks), "ranks": sorted({r["A"] for r in ranks.values() if "A" in r}),
            "adapter_version": content.adapter_version, "model_version": content.model_version}


def _check_session(model_path: Path, adapter_files: list[Path], report: ExportCheck) -> None:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for file in adapter_files:
            ort.LoraAdapter().Load(str(file))
        report.checks.append("ONNX Runtime opens the model and loads every adapter file")
    except Exception as exc:
        report.errors.append(f"ONNX Runtime: {type(exc).__name__}: {exc}")


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    from adapterkit.core.io import canonical_json

    (folder / MANIFEST_NAME).write_bytes(canonical_json(dict(manifest)))


def file_sizes(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file under ``folder`` (the manifest excluded)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}
