"""Check an ``.onnx_adapter`` FlatBuffer in Python before ONNX Runtime's C++ reader sees it.

ONNX Runtime verifies the FlatBuffer, but releases before 1.2x built each parameter's tensor over its
``raw_data`` with the shape from ``dims`` without comparing the two, and dereferenced absent fields
(``dims``, ``raw_data``, ``parameters``): a hostile file could make it read out of bounds or crash the
process. This walker reads the same structure (ONNX Runtime's ``adapter_schema.fbs``: table
``Adapter {format_version, adapter_version, model_version, parameters:[Parameter]}``, table
``Parameter {name:string, dims:[int64], data_type:int32, raw_data:[uint8]}``, identifier ``TORT``)
and raises a :class:`FormatError` naming the problem unless every offset lies inside the file,
every field a reader dereferences is present, names are UTF-8, and each ``raw_data`` holds exactly
``prod(dims) * itemsize`` bytes. Nothing is allocated from a size the file claims.
"""

from __future__ import annotations

import numpy as np
from adapterkit.core.errors import UsageError
from collections.abc import Mapping
from dataclasses import dataclass

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from adapterkit.core.errors import FormatError

IDENTIFIER = b"TORT"
#: ONNX TensorDataType -> element size; STRING, COMPLEX and UNDEFINED are not adapter parameters
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}


class _Buffer:
    def __init__(self, buf: Any, file: str):
        self.buf, self.size, self.file = buf, len(buf), file

    def fail(self, message: str, location: str | None = None, **extra: Any) -> FormatError:
        return FormatError(message, file=self.file, location=location, code="bad_file",
                           hint="write it with onnxruntime.AdapterFormat (or adapterkit convert --to onnx-adapter)",
                           **extra)

    def read(self, fmt: str, pos: int, what: str) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > self.size:
            raise self.fail(f"{what} lies outside the file (truncated or corrupt .onnx_adapter)", found=pos)
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def table(self, pos: int, what: str) -> tuple[int, list[int]]:
        """(table position, field offsets) of the table at ``pos``."""
        vtable = pos - self.read("<i", pos, what)
        vsize = self.read("<H", vtable, f"{what} vtable")
        if vsize < 4 or vsize % 2 or vtable + vsize > self.size:
            raise self.fail(f"{what} vtable is malformed", found=vsize)
        tsize = self.read("<H", vtable + 2, f"{what} vtable")
        if pos + tsize > self.size:
            raise self.fail(f"{what} runs past the end of the file", found=tsize)
        fields = [self.read("<H", vtable + 4 + 2 * i, f"{what} vtable") for i in range((vsize - 4) // 2)]
        for offset in fields:
            if offset and (offset < 4 or offset + 4 > tsize):
                raise self.fail(f"{what} field lies outside its table", found=offset)
        return pos, fields

    def field(self, table: tuple[int, list[int]], index: int) -> int | None:
        pos, fields = table
        return pos + fields[index] if index < len(fields) and fields[index] else None

    def target(self, at: int, what: str) -> int:
        """The position an offset field at ``at`` points to."""
        return at + self.read("<I", at, what)

    def vector(self, at: int, width: int, what: str) -> tuple[int, int]:
        """(first element position, length) of the vector the offset field at ``at`` points to."""
        start = self.target(at, what)
        length = self.read("<I", start, f"{what} length")
        if start + 4 + length * width > self.size:
            raise self.fail(f"{what} runs past the end of the file", expected=f"<= {(self.size - start - 4) // width}",
                            found=length)
        return start + 4, length


def check_adapter_file(path: str | os.PathLike[str]) -> None:
    """Raise FormatError unless ``path`` is a structurally sound ``.onnx_adapter`` FlatBuffer."""
    file = str(path)
    size = Path(path).stat().st_size
    if size < 16:
        raise FormatError("file is too short to be an .onnx_adapter", file=file, expected=">= 16 bytes", found=size,
                          code="bad_file")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        check_adapter_bytes(buf, file)


def check_adapter_bytes(data: Any, file: str = "<bytes>") -> None:
    """:func:`check_adapter_file` on a buffer in memory."""
    b = _Buffer(data, file)
    if b.size < 16 or bytes(data[4:8]) != IDENTIFIER:
        raise FormatError("not an ONNX Runtime adapter file (no TORT identifier)", file=file,
                          expected=IDENTIFIER.decode(), found=repr(bytes(data[4:8])), code="bad_file")
    root = b.table(b.target(0, "root offset"), "Adapter")
    params_at = b.field(root, 3)
    if params_at is None:
        raise b.fail("the file has no parameters vector", "parameters")
    first, count = b.vector(params_at, 4, "parameters")
    for i in range(count):
        slot = first + 4 * i
        param = b.table(b.target(slot, f"parameter {i}"), f"parameter {i}")
        name_at = b.field(param, 0)
        if name_at is None:
            raise b.fail("a parameter has no name", f"parameters[{i}]")
        start, length = b.vector(name_at, 1, f"parameter {i} name")
        try:
            name = bytes(data[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise b.fail("a parameter name is not valid UTF-8", f"parameters[{i}]") from None
        dims_at, type_at, raw_at = b.field(param, 1), b.field(param, 2), b.field(param, 3)
        if dims_at is None or raw_at is None:
            raise b.fail("a parameter lacks its dims or its raw_data", name)
        dstart, ndims = b.vector(dims_at, 8, f"{name} dims")
        dims = [b.read("<q", dstart + 8 * k, f"{name} dims") for k in range(ndims)]
        if any(d < 0 for d in dims):
            raise b.fail("a parameter has a negative dimension", name, found=dims)
        if ndims > 32 or math.prod(d for d in dims if d) >= 2**60:  # numpy could not hold even an empty one
            raise b.fail("a parameter's shape is too large for an array", name, found=dims[:8])
        data_type = b.read("<i", type_at, f"{name} data_type") if type_at is not None else 0
        if data_type not in ITEMSIZE:
            raise b.fail("a parameter has a data type adapters do not use", name, found=data_type)
        _, nbytes = b.vector(raw_at, 1, f"{name} raw_data")
        want = math.prod(dims) * ITEMSIZE[data_type]  # Python ints: no wrap-around
        if nbytes != want:
            raise b.fail("a parameter's raw_data size disagrees with its dims and data type", name,
                         expected=want, found=nbytes)


A_SUFFIX = ".lora_A.weight"


B_SUFFIX = ".lora_B.weight"


FILE_SUFFIX = ".onnx_adapter"


def input_names(module: str) -> tuple[str, str]:
    """The graph input names of ``module``'s factors: (``<module>.lora_A.weight``, ``<module>.lora_B.weight``)."""
    return module + A_SUFFIX, module + B_SUFFIX


def split_name(name: str) -> tuple[str, str] | None:
    """(module, "A" or "B") of an input name, or None when it is not one."""
    for suffix, param in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], param
    return None


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(".onnx_adapter files are read and written through onnxruntime, which is not installed",
                         hint="pip install onnxruntime (1.20 or later)", code="missing_dependency") from None
    return onnxruntime


def write_adapter_file(params: Mapping[str, np.ndarray], path: str | os.PathLike[str], *,
                       adapter_version: int = 1, model_version: int = 1) -> None:
    """Write ``params`` (name -> float array) as an ONNX Runtime ``.onnx_adapter`` file."""
    ort = _onnxruntime()

    if not params:
        raise UsageError("an .onnx_adapter file needs at least one parameter", code="empty_adapter")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    # OrtValues view the arrays' memory: keep the contiguous copies alive until the file is written
    arrays = {name: np.ascontiguousarray(value) for name, value in sorted(params.items())}
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()})
    fmt.export_adapter(str(path))


@dataclass
class AdapterFile:
    """The content of an ``.onnx_adapter`` file."""

    params: dict[str, np.ndarray]
    format_version: int
    adapter_version: int
    model_version: int


def read_adapter_file(path: str | os.PathLike[str]) -> AdapterFile:
    """Read an ``.onnx_adapter`` file (copies the tensors out of ONNX Runtime's mapping)."""
    ort = _onnxruntime()


    path = Path(path)
    check_adapter_file(path)  # offsets, sizes and fields checked in Python before ONNX Runtime's C++ reader runs
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}
        versions = fmt.get_format_version(), fmt.get_adapter_version(), fmt.get_model_version()
    except Exception as exc:  # onnxruntime raises plain RuntimeError / Fail for a bad file
        raise FormatError(f"not a readable ONNX Runtime adapter file ({type(exc).__name__}: {exc})", file=str(path),
                          hint="write it with onnxruntime.AdapterFormat (or adapterkit convert --to onnx-adapter)",
                          code="bad_file") from None
    return AdapterFile(params, *(int(v) for v in versions))
