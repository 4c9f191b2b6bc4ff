"""Check a ``torch.save`` file's claims against its real size before ``torch.load`` allocates anything.

Readers open ``.bin`` / ``.pt`` files only with ``torch.load(weights_only=True)``, which runs no code.
It does trust sizes, though: a legacy (pre-1.6, non-zip) file makes torch allocate each storage from
the element count written in the pickle before it reads the data, and torch releases older than
2.5 did the same for zip files. :func:`check_torch_file` walks the pickle's opcodes with
:mod:`pickletools` (a parser: nothing is executed or imported) and refuses, with a
:class:`TensorFileError`, a file whose pickle holds an integer larger than the file itself (an
element count, a dimension, a stride or an offset that cannot be true), a zip whose records are
compressed or larger than the archive, or a file that is neither a zip nor a pickle.

:func:`read_torch_tensors` (public as ``adapterkit.read_torch_tensors``) is the one way a reader opens
such a file: the magic number, :func:`check_torch_file`, then ``torch.load(weights_only=True)`` and
a dict of name -> tensor, as numpy arrays.
"""

from __future__ import annotations

import io
import mmap
import os
import pickletools
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from adapterkit.core.errors import TensorFileError, UnsafeFileError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_LEGACY_PICKLES = 5  # magic number, protocol version, sys info, the object, the storage keys
_HINT = "save the adapter again (torch.save, or better safetensors)"
_UNSAFE_HINT = ("ask whoever made it for the adapter as safetensors; if you trust the file, convert its tensors to "
                "safetensors in a sandbox (a throwaway container without credentials or network) and read that instead")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (torch's messages span many), cut to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_torch_tensors(path: str | os.PathLike[str], hint: str | None = None) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save`` file holding a dict of name -> tensor, as numpy arrays (bfloat16 through
    ``ml_dtypes``; an empty tensor is returned as it is: :func:`adapterkit.check_tensor_dims` is the caller's).

    Nothing in the file runs: its sizes are checked first (:func:`check_torch_file`), then torch's
    weights-only unpickler reads it. Raises :class:`TensorFileError` (code ``bad_pickle`` / ``bad_dtype``)
    for a file that is not a torch file, is damaged or holds something else than a dict of tensors, and
    :class:`UnsafeFileError` (``unsafe_pickle``) for a pickle that needs more than tensors to load.

    :param hint: how to write the file again, for the errors (e.g. "save the adapter again with
        PeftModel.save_pretrained"); default: a generic one. Imports torch.
    """
    import pickle
    import warnings

    path = Path(path)
    file, hint = str(path), hint or _HINT
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise TensorFileError("not a torch.save file", file=file, expected="a zip archive or a binary pickle",
                              found=repr(magic), hint=hint, code="bad_pickle")

    import torch

    from adapterkit.core.format.torch_bridge import to_numpy

    check_torch_file(path)  # every size the pickle claims fits in the file, before torch allocates any

    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(handle, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), str(exc))
        raise UnsafeFileError("the pickle needs more than tensors to load (loading it fully could run code); refused",
                              file=file, found=detail[:300], hint=_UNSAFE_HINT, code="unsafe_pickle") from None
    except Exception as exc:
        raise TensorFileError(f"not a readable torch file: {one_line(exc)}", file=file, code="bad_pickle") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise TensorFileError("must hold a dict of tensor name -> tensor", file=file, found=type(data).__name__,
                              hint=hint, code="bad_pickle")
    try:
        return {key: to_numpy(value) for key, value in data.items()}
    except (TypeError, ValueError) as exc:
        raise TensorFileError(f"tensor dtype not supported: {exc}", file=file, code="bad_dtype") from None


def check_torch_file(path: str | os.PathLike[str]) -> None:
    """Raise TensorFileError unless every size the torch file at ``path`` claims fits in it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PK\x03\x04":
        _check_zip(path, size)
    elif magic[:1] == b"\x80":
        # a mapping, not a file object: a huge length in the pickle then reads what is there, never allocates it
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            _check_legacy(mapped, str(path), size)
    else:
        raise TensorFileError("not a torch.save file", file=str(path), expected="a zip archive or a binary pickle",
                              found=repr(magic), hint=_HINT, code="bad_pickle")


def _check_zip(path: Path, size: int) -> None:
    file = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise TensorFileError("a record of the zip is compressed; torch.save writes none", file=file,
                                          location=info.filename, hint=_HINT, code="bad_pickle")
                if max(info.file_size, info.compress_size) > size or info.header_offset + info.compress_size > size:
                    raise TensorFileError("a zip record claims more bytes than the file holds", file=file,
                                          location=info.filename, expected=f"<= {size}",
                                          found=max(info.file_size, info.compress_size),
                                          hint=_HINT, code="bad_pickle")
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pickles) != 1:
                raise TensorFileError("a torch zip holds exactly one data.pkl", file=file,
                                      found=[i.filename for i in pickles], hint=_HINT, code="bad_pickle")
            data = archive.read(pickles[0])
    except TensorFileError:
        raise
    except Exception as exc:  # zipfile on hostile bytes: BadZipFile, struct.error, UnicodeDecodeError, ...
        raise TensorFileError(f"not a readable torch zip: {type(exc).__name__}: {exc}", file=file, hint=_HINT,
                              code="bad_pickle") from None
    # torch reads data.pkl into memory (no larger than the file, checked above) and unpickles from there: a
    # damaged pickle is left to torch to report
    _check_ints(io.BytesIO(data), file, size)


def _check_legacy(handle: mmap.mmap, file: str, size: int) -> None:
    """torch's legacy layout is five pickles in a row, then the storages. torch unpickles them from the file
    itself, so a string or bytes length in them is read (and allocated) as claimed: each pickle must parse
    within the file. A stream that simply ends after fewer pickles is left to torch to report (a plain
    pickle is not a torch file; its globals, if any, make torch refuse it as unsafe)."""
    for index in range(_LEGACY_PICKLES):
        if handle.tell() >= len(handle):
            return
        # the magic number (a huge LONG), the protocol version and the sys info (1001 twice) may exceed a small file
        if not _check_ints(handle, file, size if index >= 3 else None):
            raise TensorFileError("not a readable pickle: an opcode claims more bytes than the file holds, or the "
                                  "pickle is damaged", file=file, location=f"pickle {index}", hint=_HINT,
                                  code="bad_pickle")


def _check_ints(stream: io.BytesIO | mmap.mmap, file: str, limit: int | None) -> bool:
    """Walk one pickle's opcodes, refusing an integer above ``limit`` (the file size); False when the pickle
    does not parse (pickletools reads a claimed length from the buffer, never allocating more than is there).
    Integers are checked as they come, so a claim before the point where parsing fails is still refused."""
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if limit is not None and opcode.name in _INT_OPS and isinstance(arg, int) and arg > limit:
                raise TensorFileError("the pickle claims a size larger than the file (truncated or hostile file)",
                                      file=file, expected=f"<= {limit}", found=arg, hint=_HINT, code="bad_pickle")
    except TensorFileError:
        raise
    except (ValueError, EOFError, OverflowError, MemoryError, UnicodeDecodeError):
        return False
    return True
