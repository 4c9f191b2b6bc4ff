"""core/io.py: atomic writes, canonical JSON, strict JSON reading, safe paths."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from adapterkit.core import io
from adapterkit.core.errors import AdapterkitError, ManifestError


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- atomic_directory -----------------------------------------------------------

def test_atomic_directory_success_moves_the_files_into_place(tmp_path):
    dest = tmp_path / "out"
    with io.atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not dest.exists()  # nothing visible before the block ends
    assert (dest / "a.txt").read_text() == "a"
    assert (dest / "sub" / "b.txt").read_text() == "b"
    assert listing(tmp_path) == ["out"]


def test_atomic_directory_leaves_nothing_on_exception(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_directory(dest) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_atomic_directory_keeps_the_old_folder_on_exception(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["out"]
    assert listing(dest) == ["old.txt"]


def test_atomic_directory_overwrite_replaces_and_cleans_up(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with io.atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(dest) == ["new.txt"]
    assert listing(tmp_path) == ["out"]  # no .old or .tmp siblings left


def test_atomic_directory_refuses_a_non_empty_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")
    with pytest.raises(AdapterkitError) as info:
        with io.atomic_directory(dest):
            pytest.fail("the block must not run")
    assert info.value.code == "output_exists"
    assert "already exists" in str(info.value) and str(dest) in str(info.value)
    assert listing(dest) == ["keep.txt"]
    assert listing(tmp_path) == ["out"]


def test_atomic_directory_refuses_an_existing_file(tmp_path):
    dest = tmp_path / "out"
    dest.write_text("a file")
    with pytest.raises(AdapterkitError, match="already exists"):
        with io.atomic_directory(dest):
            pass
    assert dest.read_text() == "a file"


def test_atomic_directory_accepts_an_empty_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with io.atomic_directory(dest) as tmp:
        (tmp / "x").write_text("x")
    assert listing(dest) == ["x"]


def test_atomic_directory_creates_missing_parents(tmp_path):
    dest = tmp_path / "a" / "b" / "out"
    with io.atomic_directory(dest) as tmp:
        (tmp / "x").write_text("x")
    assert (dest / "x").read_text() == "x"


# ---- atomic_write_bytes -----------------------------------------------------------

def test_atomic_write_bytes_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    io.atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    io.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert listing(target.parent) == ["f.bin"]


def test_atomic_write_bytes_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["f.bin"]


def test_atomic_write_bytes_failure_while_writing_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"

    def fail(fd):
        raise OSError("io error")

    monkeypatch.setattr(io.os, "fsync", fail)
    with pytest.raises(OSError, match="io error"):
        io.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert listing(tmp_path) == []


# ---- Ctrl-C at the edges of an atomic write ---------------------------------------------

def _write_with(writer: str, dest: Path, text: str) -> None:
    if writer == "bytes":
        io.atomic_write_bytes(dest, text.encode())
    elif writer == "directory":
        with io.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "x").write_text(text)
    else:
        with io.atomic_file(dest, overwrite=True) as tmp:
            (tmp / dest.name).write_text(text)


def _read(writer: str, dest: Path) -> str:
    return (dest / "x").read_text() if writer == "directory" else dest.read_text()


def _sigint_after(monkeypatch, module, name):
    """Make ``module.name`` send this process a SIGINT right after it has done its work."""
    real = getattr(module, name)

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("writer", ["bytes", "directory", "file"])
def test_ctrl_c_as_the_temporary_sibling_is_made_leaves_nothing(tmp_path, monkeypatch, writer):
    _write_with(writer, tmp_path / "out", "old")
    _sigint_after(monkeypatch, io.tempfile, "mkstemp" if writer == "bytes" else "mkdtemp")
    with pytest.raises(KeyboardInterrupt):
        _write_with(writer, tmp_path / "out", "new")
    monkeypatch.undo()
    assert listing(tmp_path) == ["out"]
    assert _read(writer, tmp_path / "out") == "old"


@pytest.mark.parametrize("writer", ["bytes", "directory", "file"])
def test_ctrl_c_during_the_rename_into_place_ends_with_the_output_complete(tmp_path, monkeypatch, writer):
    """The interruption still stops the write, but only after the commit: no half state, no stray folder."""
    _write_with(writer, tmp_path / "out", "old")
    _sigint_after(monkeypatch, io.os, "replace")
    with pytest.raises(KeyboardInterrupt):
        _write_with(writer, tmp_path / "out", "new")
    monkeypatch.undo()
    assert listing(tmp_path) == ["out"]
    assert _read(writer, tmp_path / "out") == "new"


def test_interrupts_deferred_restores_the_handler_and_raises_once(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with io.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("the rest of the block")
    assert ran == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is before
    with io.interrupts_deferred():  # nothing caught: nothing raised
        pass


# ---- canonical_json, sha256 -----------------------------------------------------------

def test_canonical_json_is_sorted_utf8_with_final_newline():
    data = {"b": 1, "a": {"z": "é", "y": [1, 2]}}
    out = io.canonical_json(data)
    assert out.endswith(b"}\n")
    assert out.decode("utf-8").index('"a"') < out.decode("utf-8").index('"b"')
    assert "é".encode() in out  # not \u00e9
    assert out == io.canonical_json(json.loads(out))  # a fixed point
    assert out == io.canonical_json({"a": {"y": [1, 2], "z": "é"}, "b": 1})


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        io.canonical_json({"x": float("nan")})


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert io.sha256_file(path, chunk=1 << 20) == hashlib.sha256(data).hexdigest()


# ---- read_json -----------------------------------------------------------

def write(tmp_path: Path, data: bytes, name: str = "x.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_read_json_reads_an_object(tmp_path):
    assert io.read_json(write(tmp_path, b'{"a": [1, 2.5, "\\u00e9"]}')) == {"a": [1, 2.5, "é"]}


@pytest.mark.parametrize(
    "text, needle",
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"outer": {"k": 1, "k": 1}}', "duplicate key 'k'"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": -Infinity}', "-Infinity"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
    ],
)
def test_read_json_rejects_invalid_json(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        io.read_json(path)
    assert info.value.code == "bad_json"
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_read_json_rejects_non_utf8(tmp_path):
    path = write(tmp_path, b'{"a": "\xff\xfe"}')
    with pytest.raises(ManifestError) as info:
        io.read_json(path)
    assert info.value.code == "not_utf8"
    assert "UTF-8" in str(info.value)


def test_read_json_rejects_huge_files_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.json"
    with open(path, "wb") as handle:  # sparse: cheap to create
        handle.truncate(io.MAX_JSON_BYTES + 1)

    def no_read(self):
        raise AssertionError("a huge file must be refused before it is read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    with pytest.raises(ManifestError) as info:
        io.read_json(path)
    assert info.value.code == "too_large"
    assert info.value.found == io.MAX_JSON_BYTES + 1


def test_read_json_size_cap_is_a_parameter(tmp_path):
    path = write(tmp_path, b'{"a": "' + b"x" * 100 + b'"}')
    with pytest.raises(ManifestError, match="too large"):
        io.read_json(path, max_bytes=50)
    assert io.read_json(path, max_bytes=200) == {"a": "x" * 100}


def test_read_json_rejects_deep_nesting(tmp_path):
    path = write(tmp_path, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ManifestError) as info:
        io.read_json(path)
    assert info.value.code == "bad_json"


@pytest.mark.parametrize("make", [lambda p: p / "missing.json", lambda p: p])
def test_read_json_missing_file_or_folder(tmp_path, make):
    with pytest.raises(ManifestError) as info:
        io.read_json(make(tmp_path))
    assert info.value.code == "missing_file"


# ---- safe_child -----------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    ["..", "../x.safetensors", "a/../../x.safetensors", "a/../b.safetensors", "/etc/passwd", "", ".", "./x",
     "a//b", "a\\..\\b", "a/", "sub/./x"],
)
def test_safe_child_rejects_escapes(tmp_path, name):
    with pytest.raises(ManifestError) as info:
        io.safe_child(tmp_path, name, "adapter.json", "$.tensors")
    assert info.value.code == "path_escape"
    assert info.value.location == "$.tensors"
    assert info.value.file == "adapter.json"


def test_safe_child_accepts_plain_relative_paths(tmp_path):
    assert io.safe_child(tmp_path, "x.safetensors", "f", "$") == tmp_path / "x.safetensors"
    assert io.safe_child(tmp_path, "sub/x.safetensors", "f", "$") == tmp_path / "sub" / "x.safetensors"


def test_safe_child_rejects_a_symlink_out_of_the_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (folder / "x.safetensors").symlink_to(outside)
    with pytest.raises(ManifestError) as info:
        io.safe_child(folder, "x.safetensors", "adapter.json", "$.tensors")
    assert info.value.code == "path_escape"
    assert "outside" in str(info.value)


def test_safe_child_rejects_a_symlinked_folder_out_of_the_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.safetensors").write_bytes(b"x")
    (folder / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ManifestError, match="outside"):
        io.safe_child(folder, "sub/x.safetensors", "f", "$")


def test_safe_child_accepts_a_symlink_inside_the_folder(tmp_path):
    (tmp_path / "real.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real.safetensors")
    assert io.safe_child(tmp_path, "link.safetensors", "f", "$") == tmp_path / "link.safetensors"


def test_safe_child_works_when_the_folder_itself_is_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.safetensors").write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert io.safe_child(tmp_path / "alias", "x.safetensors", "f", "$").read_bytes() == b"x"


# ---- permissions: atomic outputs honour the umask like an ordinary write ----------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_bytes_honours_the_umask(tmp_path, umask_022):
    """mkstemp creates 0600 files; an adapter must stay readable by e.g. a serving process of another user."""
    io.atomic_write_bytes(tmp_path / "f.bin", b"x")
    (tmp_path / "plain.bin").write_bytes(b"x")
    assert oct((tmp_path / "f.bin").stat().st_mode & 0o777) == oct((tmp_path / "plain.bin").stat().st_mode & 0o777)


def test_atomic_directory_honours_the_umask(tmp_path, umask_022):
    """mkdtemp creates 0700 folders; the renamed output must get the usual 0755."""
    with io.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    (tmp_path / "plain").mkdir()
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct((tmp_path / "plain").stat().st_mode & 0o777)
