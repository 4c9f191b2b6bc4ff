"""Format plugin ``onnx-adapter``: LoRA adapters as ONNX Runtime ``.onnx_adapter`` files.

An ``.onnx_adapter`` file (ONNX Runtime's FlatBuffer, ``onnxruntime.AdapterFormat``)
holds named tensors and two integers (adapter and model version). adapterkit
follows Olive's layout (microsoft/Olive ``convert_adapters``), which is also the
layout of the swappable ONNX export's graph inputs:

- ``<module>.lora_A.weight``: float32 (or float16) ``[in, r]``, the canonical A transposed;
- ``<module>.lora_B.weight``: ``[r, out]``, the canonical B transposed **with the
  module's scale folded in**;

e.g. ``model.layers.0.self_attn.q_proj.lora_A.weight``. The file records no alpha
and no scale, so a file reads back as LoRA with ``alpha = r`` (scale 1): the same
update ``dW``, exact when the original scale is a power of two, else within one
float rounding of B. Nor does it record the module kind: GPT-2 style Conv1D
modules are recognised only with the ``base`` option (the base weight is stored
``[in, out]``); without it every module reads as ``nn.Linear``.

Writing takes the method's low-rank factors (``adapterkit.LowRank``), so any method with
low-rank additive update can be written; the others (DoRA's magnitude, bottleneck
adapters...) are refused with what would be lost.

Options: reading: ``base`` (local HF folder: module kinds and shapes). Writing:
``adapter_version`` and ``model_version`` (ints written into the file, default 1),
``dtype`` (``float32``, the default and what the swappable export takes, or
``float16``), ``filename`` (default ``adapter.onnx_adapter``; ``convert`` to a path ending in
``.onnx_adapter`` writes that file itself); ``base`` is accepted and unused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import check_tensor_dims, require_consistent
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.errors import BaseModelError, FormatError, LossyConversionError, UsageError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl

FILE_NAME = "adapter.onnx_adapter"
SUFFIX = ".onnx_adapter"
DTYPES = {"float32": np.float32, "float16": np.float16}
#: model types whose adapted projections are transformers ``Conv1D`` (weight stored ``[in, out]``)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
READ_OPTIONS = ("base",)
WRITE_OPTIONS = ("adapter_version", "model_version", "dtype", "base", "filename")


class OnnxAdapterFormat(Format):
    name = "onnx-adapter"
    description = "ONNX Runtime .onnx_adapter file (Olive layout: A [in, r], B [r, out] with the scale folded in)"
    read_options = READ_OPTIONS
    write_options = WRITE_OPTIONS
    file_suffix = SUFFIX

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_file():
            return path.name.endswith(SUFFIX)
        return path.is_dir() and not (path / "adapter.json").exists() and any(path.glob(f"*{SUFFIX}"))

    def read(self, path: Path, **options: Any) -> Adapter:
        adapter = read_onnx_adapter(Path(path), **self.options_for(options, "read"))
        return require_consistent(adapter, options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        registry = options.get("registry")
        write_onnx_adapter(adapter, Path(path), registry=registry, **self.options_for(options, "write"))

    def checks(self, path: Path) -> list[str]:
        return [
            "the file holds no scale: it reads as alpha = r (the update is the same)",
            "whether the names match a model's inputs (adapterkit export check does, on an export folder)",
            "the module kinds (linear or GPT-2 Conv1D) without --base: the file does not record them, so each module "
            "reads as linear",
        ]


# ---- writing ------------------------------------------------------------------------

def write_onnx_adapter(adapter: Adapter, folder: Path, *, registry: Any = None, base: Any = None,
                       adapter_version: int = 1, model_version: int = 1, dtype: str = "float32",
                       filename: str = FILE_NAME) -> Path:
    """Write ``folder/filename`` (default ``adapter.onnx_adapter``); returns its path."""
    from adapterkit import onnx_adapter_parameters
    from adapterkit.core.format.onnx_adapter_file import write_adapter_file

    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {list(DTYPES)}", location="dtype", found=dtype, code="bad_option")
    if not (isinstance(filename, str) and filename.endswith(SUFFIX) and len(filename) > len(SUFFIX)
            and Path(filename).name == filename and not filename.startswith(".")):
        raise UsageError(f"filename must be a plain *{SUFFIX} file name", location="filename", found=filename,
                         code="bad_option")
    for key, value in (("adapter_version", adapter_version), ("model_version", model_version)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise UsageError(f"{key} must be an integer >= 0", location=key, found=value, code="bad_option")
    try:
        params = onnx_adapter_parameters(adapter, registry)
    except UsageError as exc:
        if exc.code != "not_swappable":
            raise
        raise LossyConversionError(
            f"the onnx-adapter format holds low-rank factors only; method {adapter.method!r} gives none, "
            "so its update would be lost", location=exc.location, found=adapter.method,
            hint="keep the adapterkit format, or export a merged ONNX model (adapterkit export onnx --mode merged)",
            code="unsupported_method") from None
    if dtype != "float32":
        cast = {k: v.astype(DTYPES[dtype]) for k, v in params.items()}
        if not all(np.isfinite(v.astype(np.float32)).all() for v in cast.values()):
            raise LossyConversionError("a factor overflows float16 (the scale folded into B made it too large)",
                                       found=dtype, hint="write float32", code="fold_overflow")
        params = cast
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    write_adapter_file(params, path, adapter_version=adapter_version, model_version=model_version)
    return path


# ---- reading ------------------------------------------------------------------------

def locate(path: Path) -> Path:
    """The ``.onnx_adapter`` file: ``path`` itself, or the one file of that kind in the folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FormatError("path not found", file=str(path), code="missing_file")
    files = sorted(f for f in path.glob(f"*{SUFFIX}") if f.is_file())  # not a folder, FIFO or device
    if len(files) == 1:
        return files[0]
    if not files:
        raise FormatError(f"no *{SUFFIX} file in the folder", file=str(path), code="missing_file")
    raise FormatError(f"several *{SUFFIX} files in the folder", file=str(path), found=[f.name for f in files],
                      hint="pass the file itself", code="ambiguous_format")


def read_onnx_adapter(path: Path, *, base: Any = None) -> Adapter:
    """Read an ``.onnx_adapter`` file (or a folder with one) as a LoRA adapter with alpha = r."""
    from adapterkit.core.format.base_model import read_base_model, targets_fingerprint
    from adapterkit.core.format.manifest import Manifest
    from adapterkit.core.format.onnx_adapter_file import read_adapter_file, split_name

    file = locate(path)
    content = read_adapter_file(file)
    where = str(file)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in sorted(content.params.items()):
        parsed = split_name(name)
        if parsed is None:
            hint = ("quantised (int4) adapters are not supported; convert a float one"
                    if ".quant." in name else "the names must end in .lora_A.weight or .lora_B.weight")
            raise FormatError("parameter is not a LoRA factor", file=where, location=name, hint=hint,
                              code="unsupported_tensor")
        if value.dtype not in (np.float32, np.float16):
            raise FormatError("LoRA factors must be float32 or float16", file=where, location=name,
                              found=str(value.dtype), code="unsupported_dtype")
        if value.ndim != 2:
            raise FormatError("LoRA factor is not a matrix", file=where, location=name, found=list(value.shape),
                              code="tensor_shape")
        check_tensor_dims({name: value}, where)
        pairs.setdefault(parsed[0], {})[parsed[1]] = value
    if not pairs:
        raise FormatError("the file holds no parameters", file=where, code="empty_adapter")
    info = read_base_model(base) if base is not None else None
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{missing} of the module is missing", file=where, location=module, code="missing_tensor")
        a, b = pair["A"], pair["B"]
        if a.shape[1] != b.shape[0] or a.shape[1] < 1:
            raise FormatError("lora_A [in, r] and lora_B [r, out] disagree on the rank", file=where, location=module,
                              expected="the same r >= 1", found=[list(a.shape), list(b.shape)], code="tensor_shape")
        if a.dtype != b.dtype:
            raise FormatError("lora_A and lora_B have different dtypes", file=where, location=module,
                              found=[str(a.dtype), str(b.dtype)], code="mixed_dtype")
        dtypes.add(str(a.dtype))
        fan_in, r, fan_out = int(a.shape[0]), int(a.shape[1]), int(b.shape[1])
        kind = _kind(module, fan_in, fan_out, info, where)
        shape = [fan_in, fan_out] if kind == "conv1d" else [fan_out, fan_in]
        targets[module] = {"kind": kind, "shape": shape, "r": r, "alpha": r}
        tensors[f"{module}.lora.A"] = np.ascontiguousarray(a.T)
        tensors[f"{module}.lora.B"] = np.ascontiguousarray(b.T)
    if len(dtypes) != 1:
        raise FormatError("the factors mix float32 and float16", file=where, found=sorted(dtypes), code="mixed_dtype")
    rank = Counter(t["r"] for t in targets.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"target_modules": sorted(targets)}
    if rank != 8:
        config["r"] = config["alpha"] = rank
    base_model: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    if info is not None:
        for key, value in (("model_type", info.model_type), ("architecture", info.architecture)):
            if value:
                base_model[key] = value
    manifest = Manifest(
        method="lora", config=config, targets=targets, dtype=dtypes.pop(), base_model=base_model,
        provenance={"converted_from": {"format": "onnx-adapter", "config": {
            "format_version": content.format_version, "adapter_version": content.adapter_version,
            "model_version": content.model_version, "file": file.name}}},
    )
    return Adapter(manifest, tensors, source=file, source_format="onnx-adapter")


def _kind(module: str, fan_in: int, fan_out: int, info: Any, where: str) -> str:
    """``linear`` or ``conv1d``: from the base weight's stored shape when a base is given."""
    if info is None:
        return "linear"
    shape = info.weight_shape(module)
    if shape is None:
        raise BaseModelError("adapted module does not exist in the base model", file=where, location=module,
                             expected=f"{module}.weight in {info.path}",
                             hint="pass the base model the adapter was made for", code="wrong_base")
    shape = list(shape)
    linear, conv1d = [fan_out, fan_in], [fan_in, fan_out]
    if shape == linear and shape == conv1d:
        return "conv1d" if info.model_type in CONV1D_MODEL_TYPES else "linear"
    if shape == linear:
        return "linear"
    if shape == conv1d:
        return "conv1d"
    raise BaseModelError("base weight shape does not fit the factors", file=where, location=module,
                         expected=f"{linear} (linear) or {conv1d} (Conv1D)", found=shape,
                         hint="pass the base model the adapter was made for", code="wrong_base")


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(OnnxAdapterFormat())
