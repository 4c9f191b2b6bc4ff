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
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, ManifestError, UsageError

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


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) while a step that must not be cut in half runs, then deliver it.

    Creating a temporary sibling and recording it for clean-up, or renaming a finished output into
    place (with the old one moved aside and removed), are such steps: cut between their halves, they
    would leave a stray temporary folder, or a stray old one. A SIGINT that arrives inside the block is
    raised, as the restored handler would, the moment the block ends: the command still stops, and
    its output is either absent or complete. Signal handlers live in the main thread only; elsewhere
    (and where the SIGINT handler was not set from Python) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        with interrupts_deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with interrupts_deferred():
            os.replace(tmp, path)
            tmp = None
    except BaseException:
        if tmp is not None:
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
    tmp: Path | None = None
    try:
        with interrupts_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file() and not child.is_symlink():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
            elif child.is_dir() and not child.is_symlink():
                _fsync_dir(child)
        _fsync_dir(tmp)  # the folder's own entries, before it is renamed into place
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        with interrupts_deferred():  # the commit: once begun, it ends with dest complete
            _replace_into_place(tmp, dest, dest.exists())
            tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_into_place(made: Path, dest: Path, displace: bool) -> None:
    """Rename ``made`` to ``dest``; with ``displace``, an existing ``dest`` is moved aside first and removed after."""
    old = None
    if displace:
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
    os.replace(made, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest`` in which the caller writes the one file ``dest.name``;
    on success that file replaces ``dest`` (a file, or with ``overwrite`` an old folder of that name).

    On any exception the temporary folder is removed and ``dest`` is untouched. Writing any other
    file, or none, is an error: a single-file output is exactly one file.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
        raise AdapterkitError("output already exists", file=str(dest),
                              hint="choose another output path or pass --overwrite", code="output_exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with interrupts_deferred():
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        yield tmp
        written = sorted(p.name for p in tmp.iterdir())
        if written != [dest.name]:
            raise AdapterkitError("the writer did not write exactly the one output file", file=str(dest),
                                  expected=[dest.name], found=written, code="output_files",
                                  hint="write to a folder instead (a path without the format's file extension)")
        made = tmp / dest.name
        if made.is_symlink() or not made.is_file():
            raise AdapterkitError("the writer's output is not a regular file", file=str(dest), code="output_files")
        with open(made, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(made, 0o666 & ~_umask())
        with interrupts_deferred():  # the commit: once begun, it ends with dest complete
            _replace_into_place(made, dest, dest.is_dir())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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


def parse_pairs(pairs: Iterable[str], option: str = "--config", example: str = "dropout=0.05") -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--config``, ``-O``); VALUE is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{option} must be KEY=VALUE", found=pair, hint=f"e.g. {option} {example}",
                             code="bad_option")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
