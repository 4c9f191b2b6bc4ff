"""Checkpoint folders of ``adapterkit train``: ``OUT/checkpoints/step-N``, written atomically, found again.

A checkpoint is a folder of plain files (safetensors for tensors, JSON for the
rest: no pickle) and an index, ``checkpoint.json``, that lists every other file
with its size and sha256 and is written last. It is built as
``checkpoints/.tmp-step-N`` (each file fsynced, then the folder), renamed to
``step-N`` and the parent fsynced: a folder named ``step-N`` is complete, so a
SIGKILL (or a power cut after the fsyncs) at any moment leaves the earlier
checkpoints as they were and at most a ``.tmp-*`` folder, which nothing reads
and the next writer removes. :func:`latest` returns the newest folder whose
files match its index.

Only rank 0 writes. The last ``keep`` checkpoints are kept; older ones are
removed after the new one is in place.

Test hook (for the crash tests, never for users): with
``ADAPTERKIT_TEST_CHECKPOINT_PAUSE=N`` the writer of step N stops after its first
file, drops ``PAUSED`` (holding its pid) into the temporary folder and sleeps,
so a test can SIGKILL the run at a known point of the write.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.io import canonical_json, read_json, sha256_file

FOLDER = "checkpoints"
INDEX = "checkpoint.json"
FORMAT = "adapterkit-checkpoint"
FORMAT_VERSION = 1
PAUSE_ENV = "ADAPTERKIT_TEST_CHECKPOINT_PAUSE"
PAUSE_MARKER = "PAUSED"
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(AdapterkitError):
    """A checkpoint could not be written, or one to resume from is missing or does not fit the run."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def steps(root: Path) -> list[int]:
    """The step numbers of the ``step-N`` folders under ``root`` (complete or not), ascending."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(root)) if m)


def folder(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` is not complete and intact, or None when it is."""
    index_path = path / INDEX
    if not index_path.is_file():
        return f"{INDEX} is missing"
    try:
        index = read_json(index_path)
    except AdapterkitError as exc:
        return str(exc)
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
        return f"{INDEX} is not an {FORMAT} index"
    if index.get("format_version") != FORMAT_VERSION:
        return f"{INDEX} has format_version {index.get('format_version')!r}; this adapterkit reads {FORMAT_VERSION}"
    for name, entry in sorted(index["files"].items()):
        file = path / name
        if "/" in name or name.startswith(".") or not file.is_file():
            return f"{name} is missing"
        if not isinstance(entry, dict) or file.stat().st_size != entry.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the index says {entry.get('size')}"
        if sha256_file(file) != entry.get("sha256"):
            return f"{name}: sha256 differs from the index"
    return None


def latest(root: Path) -> Path | None:
    """The newest complete, intact ``step-N`` folder under ``root`` (``.tmp-*`` folders are never read)."""
    for step in reversed(steps(root)):
        if problem(folder(root, step)) is None:
            return folder(root, step)
    return None


def write(root: Path, step: int, files: Mapping[str, bytes], keep: int | None) -> Path:
    """Write ``files`` as ``root/step-N`` atomically (see the module docstring); keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()
    pause = _pause_seconds(step)
    entries: dict[str, dict[str, Any]] = {}
    for i, (name, data) in enumerate(files.items()):
        _write(tmp / name, data)
        entries[name] = {"size": len(data), "sha256": sha256_file(tmp / name)}
        if i == 0 and pause:
            _write(tmp / PAUSE_MARKER, str(os.getpid()).encode())
            time.sleep(pause)  # the test SIGKILLs the run here
    _write(tmp / INDEX, canonical_json({"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                                         "files": entries}))
    _fsync_dir(tmp)
    final = folder(root, step)
    old = None
    if final.exists():  # the same step written again (a resumed run redoing it): swap the new one in
        old = root / f".tmp-old-step-{step}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep:
        for older in steps(root)[:-keep]:  # the newest `keep` stay, this one among them
            if older < step:
                _remove(root, older)
    return final


def _pause_seconds(step: int) -> float:
    value = os.environ.get(PAUSE_ENV, "")
    if not value:
        return 0.0
    at, _, seconds = value.partition(":")
    return float(seconds or 300) if at.strip() == str(step) else 0.0


def remove_temporaries(root: Path) -> None:
    """Remove what crashed writers left (``.tmp-*``) under ``root``."""
    if root.is_dir():
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(root / name, ignore_errors=True)


def discard_after(root: Path, step: int) -> list[int]:
    """Remove the ``step-N`` folders after ``step`` (broken ones: :func:`latest` passed them over)."""
    dropped = [s for s in steps(root) if s > step]
    for s in dropped:
        _remove(root, s)
    return dropped


def _remove(root: Path, step: int) -> None:
    """Delete ``step-N``: renamed to a ``.tmp-`` name first, so no half-deleted ``step-N`` is ever visible."""
    doomed = root / f".tmp-removed-step-{step}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder(root, step), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_adapter_beside(adapter: Any, out: Path, registry: Any) -> Path:
    """Write ``adapter`` into ``out``, which holds ``checkpoints/`` (kept): the manifest is the commit point.

    ``adapterkit.save`` replaces a whole folder, which would take the checkpoints with it. Here the old
    manifest goes first (from then on ``out`` is no adapter at all, never a mix of two), then the tensor file
    and the new manifest are written, each atomically: a crash leaves the old adapter, no adapter (a resumed
    run writes it), or the new one.
    """
    from adapterkit.core.format.manifest import MANIFEST_NAME
    from adapterkit.core.store.native import write_native

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    old_files: set[str] = set()
    if manifest.is_file():
        with contextlib.suppress(AdapterkitError, AttributeError):
            old_files = set(read_json(manifest).get("tensors", {}))
        manifest.unlink()
        _fsync_dir(out)
    write_native(adapter, out, registry)
    new_files = set(read_json(manifest).get("tensors", {}))
    for name in sorted(old_files - new_files):  # tensor files only the old manifest listed
        if "/" not in name and not name.startswith("."):
            with contextlib.suppress(OSError):
                (out / name).unlink()
    return out
