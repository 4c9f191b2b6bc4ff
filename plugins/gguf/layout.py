"""Check a GGUF file's header against its real size before gguf-py's ``GGUFReader`` sees it.

``GGUFReader`` memory-maps the file and trusts every count in it: a huge ``kv_count`` or array
length past the end of the file makes it loop (a slice past the end is empty, so the offset stops
moving), a non-UTF-8 name raises ``UnicodeDecodeError``, a dimension product can wrap around. This
walker reads the same header (GGUF v2 / v3, little-endian) from a read-only mapping and refuses, with
a :class:`FormatError` naming the field, anything that does not fit in the file:

- counts, string lengths and array lengths bounded by the bytes left; no nested arrays; at most
  :data:`MAX_ARRAY_ITEMS` array elements in all (an adapter carries no vocabulary);
- keys, string values and tensor names valid UTF-8; keys and tensor names unique;
- ``general.alignment`` a UINT32 power of two;
- each tensor: 1 to 4 dimensions, a known GGML type whose block size divides the first dimension,
  an aligned offset, and data that lies inside the file without overlapping another tensor.

Nothing is allocated from a size the file claims: every size is compared with the file size first.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from adapterkit.core.errors import FormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_ITEMS = 1 << 16
DEFAULT_ALIGNMENT = 32
# value type -> fixed byte size (None: string 8, array 9)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, file: str):
        self.buf, self.file, self.pos, self.size = buf, file, 0, len(buf)
        self.array_items = 0

    def fail(self, message: str, location: str | None = None, **extra: object) -> FormatError:
        return FormatError(message, file=self.file, location=location, code="bad_file", **extra)  # type: ignore[arg-type]

    def need(self, n: int, what: str, location: str | None) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (truncated or corrupt GGUF)", location,
                            expected=f"<= {self.size - self.pos} bytes left", found=n)

    def unpack(self, fmt: str, what: str, location: str | None = None) -> int:
        width = struct.calcsize(fmt)
        self.need(width, what, location)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def string(self, what: str, location: str | None = None) -> str:
        length = self.unpack("<Q", f"{what} length", location)
        self.need(length, what, location)
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8", location, found=repr(raw[:40])) from None

    def value(self, kind: int, location: str, nested: bool = False) -> object:
        if kind in _SCALAR_SIZES:
            width = _SCALAR_SIZES[kind]
            self.need(width, "value", location)
            raw = self.buf[self.pos:self.pos + width]
            self.pos += width
            return int.from_bytes(raw, "little") if kind == _UINT32 else None
        if kind == _STRING:
            self.string("string value", location)
            return None
        if kind == _ARRAY:
            if nested:
                raise self.fail("nested GGUF arrays are not supported", location)
            item = self.unpack("<I", "array type", location)
            count = self.unpack("<Q", "array length", location)
            if item not in _SCALAR_SIZES and item != _STRING:
                raise self.fail("unknown GGUF array element type", location, found=item)
            least = _SCALAR_SIZES.get(item, 8)  # a string takes at least its 8-byte length
            if count * least > self.size - self.pos:
                raise self.fail("GGUF array is longer than the rest of the file", location,
                                expected=f"<= {(self.size - self.pos) // least} items", found=count)
            self.array_items += count
            if self.array_items > MAX_ARRAY_ITEMS:
                raise self.fail(f"GGUF metadata arrays hold more than {MAX_ARRAY_ITEMS} items; an adapter has no "
                                "vocabulary or other large arrays", location, found=self.array_items)
            if item == _STRING:
                for _ in range(count):
                    self.string("array string", location)
            else:
                self.need(count * least, "array", location)
                self.pos += count * least
            return None
        raise self.fail("unknown GGUF value type", location, found=kind)


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Raise FormatError unless the GGUF header at ``path`` is self-consistent and fits in the file."""
    file = str(path)
    size = Path(path).stat().st_size
    if size < 24:
        raise FormatError("file is too short to be GGUF", file=file, expected=">= 24 bytes", found=size, code="bad_file")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _check(_Walker(buf, file), size)


def check_gguf_bytes(data: bytes, file: str = "<bytes>") -> None:
    """:func:`check_gguf` on bytes in memory."""
    if len(data) < 24:
        raise FormatError("file is too short to be GGUF", file=file, expected=">= 24 bytes", found=len(data), code="bad_file")
    _check(_Walker(data, file), len(data))


def _check(w: _Walker, size: int) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(w.buf[:4]) != MAGIC:
        raise w.fail("not a GGUF file (bad magic)", expected=MAGIC.decode(), found=repr(bytes(w.buf[:4])))
    w.pos = 4
    version = w.unpack("<I", "version")
    if version & 0xFFFF == 0 and version:
        raise FormatError("big-endian GGUF files are not supported", file=w.file, code="unsupported")
    if version not in VERSIONS:
        raise FormatError("unsupported GGUF version", file=w.file, expected=list(VERSIONS), found=version, code="unsupported")
    n_tensors = w.unpack("<Q", "tensor count")
    n_kv = w.unpack("<Q", "metadata count")
    left = size - w.pos
    if n_kv * 13 > left:  # key length (8) + 1-byte key at least + type (4)
        raise w.fail("metadata count does not fit in the file", "kv_count", expected=f"<= {left // 13}", found=n_kv)
    if n_tensors * 24 > left:  # name length (8) + n_dims (4) + type (4) + offset (8)
        raise w.fail("tensor count does not fit in the file", "tensor_count", expected=f"<= {left // 24}", found=n_tensors)
    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for _ in range(n_kv):
        key = w.string("metadata key")
        if key in keys:
            raise w.fail("duplicate metadata key", key)
        keys.add(key)
        kind = w.unpack("<I", "value type", key)
        value = w.value(kind, key)
        if key == "general.alignment":
            if kind != _UINT32 or not value or value & (value - 1):
                raise w.fail("general.alignment must be a UINT32 power of two", key, found=value)
            alignment = int(value)  # type: ignore[arg-type]
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = w.string("tensor name")
        if name in names:
            raise w.fail("duplicate tensor name", name)
        names.add(name)
        n_dims = w.unpack("<I", "dimension count", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail("a tensor has 1 to 4 dimensions", name, found=n_dims)
        dims = [w.unpack("<Q", "dimension", name) for _ in range(n_dims)]
        raw_type = w.unpack("<I", "tensor type", name)
        offset = w.unpack("<Q", "tensor offset", name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise w.fail("unknown GGML tensor type", name, found=raw_type) from None
        if dims[0] % block:
            raise w.fail(f"first dimension is not a multiple of the {ggml_type.name} block size", name,
                         expected=f"a multiple of {block}", found=dims[0])
        elements = 1
        for d in dims:
            elements *= d  # Python ints: no wrap-around
        infos.append((name, offset, elements // block * type_size))
    data_start = w.pos + (-w.pos) % alignment
    end = data_start
    for name, offset, nbytes in sorted(infos, key=lambda t: t[1]):
        if offset % alignment:
            raise w.fail("tensor offset is not aligned", name, expected=f"a multiple of {alignment}", found=offset)
        if data_start + offset < end:
            raise w.fail("tensor data overlaps another tensor", name, found=offset)
        end = data_start + offset + nbytes
        if end > size:
            raise w.fail("tensor data runs past the end of the file (truncated or corrupt GGUF)", name,
                         expected=f"<= {size} bytes", found=end)
