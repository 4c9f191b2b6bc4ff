"""Atomic writes, canonical JSON, checksums and safe reads.

Outputs are written to a temporary sibling and renamed into place, so a crash
leaves either the old state or the complete new one, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AdapterkitError, ManifestError

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON: sorted keys, two-space indent, UTF-8, final newline."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``.

    On any exception the temporary folder is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if not dest.is_dir() or any(dest.iterdir()):
            raise AdapterkitError(
                "output already exists and is not empty",
                file=str(dest),
                hint="choose another output path or pass --overwrite",
                code="output_exists",
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file() and not child.is_symlink():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
            elif child.is_dir() and not child.is_symlink():
                _fsync_dir(child)
        _fsync_dir(tmp)  # the folder's own entries, before it is renamed into place
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json_bytes(data: bytes, file: str) -> Any:
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN/Infinity literals, at most MAX_JSON_DEPTH levels.

    The depth cap keeps every later step (copies, schema checks, writing the value back into a
    manifest) clear of Python's recursion limit: no adapter or model config nests beyond a few levels.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError("is not UTF-8 text", file=file, found=str(exc), code="not_utf8") from None
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ManifestError("JSON is nested too deeply", file=file, code="bad_json") from None
    except ValueError as exc:
        raise ManifestError(
            f"is not valid JSON: {exc}", file=file, hint="fix the syntax or regenerate the file", code="bad_json"
        ) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ManifestError("JSON is nested too deeply", file=file, expected=f"<= {MAX_JSON_DEPTH} levels",
                            found=json_depth(value), code="bad_json")
    return value


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file with a size cap and strict parsing."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("file not found", file=str(path), code="missing_file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ManifestError(
            "JSON file is too large", file=str(path), expected=f"<= {max_bytes} bytes", found=size, code="too_large"
        )
    return parse_json_bytes(path.read_bytes(), str(path))


def safe_child(folder: Path, name: str, file: str, location: str) -> Path:
    """Resolve ``name`` inside ``folder``; refuse absolute paths, ``..`` and links out of it."""
    if not name or os.path.isabs(name) or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ManifestError(
            "file reference must be a plain relative path inside the adapter folder",
            file=file, location=location, found=name, code="path_escape",
        )
    child = folder / name
    try:
        root = folder.resolve()
        child.resolve().relative_to(root)
    except ValueError:
        raise ManifestError(
            "file reference resolves outside the adapter folder (symlink?)",
            file=file, location=location, found=name, code="path_escape",
        ) from None
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13), a path too long
        raise ManifestError(
            f"file reference cannot be resolved: {exc}", file=file, location=location, found=name,
            hint="replace the symlink with the file itself", code="path_escape",
        ) from None
    return child
