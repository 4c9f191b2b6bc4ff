"""Pickles (``.bin`` / ``.pt``) are opened only with ``torch.load(weights_only=True)``: nothing they hold ever runs.

For every reader that accepts a torch file (PEFT ``adapter_model.bin``, torchtune ``adapter_model.pt``,
AdapterHub ``pytorch_adapter.bin``, PEFT prompt tuning through the PEFT reader) a pickle whose loading
would run code is planted, as a legacy pickle and inside a ``torch.save`` zip, and the test checks that
the reader refuses it with an :class:`UnsafeFileError` saying why and how to convert the file safely,
and that nothing ran (the marker file the payload would create is absent). The CLI is checked the same
way (exit 1, one ``error:`` line, no traceback, no output written), and the sources are scanned so that
no ``torch.load`` call without ``weights_only=True`` slips in.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import torch

from adapterkit.core.errors import AdapterkitError, TensorFileError, UnsafeFileError
from adapterkit.core.format.torch_files import check_torch_file
from fuzz_helpers import _long1, _zip_entries, _zip_rebuild, build_samples, registry, write_report
from helpers import REPO, VENV_BIN

#: sample key -> the torch file in it
TORCH_SAMPLES = {"peft/lora-bin": "adapter_model.bin", "torchtune/lora": "adapter_model.pt",
                 "adapterhub/lora-bin": "pytorch_adapter.bin"}


class RunsShell:
    """Unpickling calls ``os.system`` (what a hostile model file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    """Unpickling calls ``exec`` with Python that writes the marker (no shell needed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class NeedsImport:
    """Unpickling imports a module of the payload's choosing (here a harmless one, by full name)."""

    def __reduce__(self) -> tuple[Any, ...]:
        import importlib

        return importlib.import_module, ("json",)


def hostile_pickle(kind: str, marker: Path) -> bytes:
    payload = {"shell": RunsShell(marker), "python": RunsPython(marker), "import": NeedsImport()}[kind]
    # the payload sits where a tensor would be, in a state dict like the real one
    return pickle.dumps({"base_model.model.x.lora_A.weight": payload}, protocol=2)


def as_torch_zip(valid: bytes, pickled: bytes) -> bytes:
    """A real torch.save zip whose data.pkl is replaced (CRCs and sizes stay consistent)."""
    entries = _zip_entries(valid)
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = pickled
    return _zip_rebuild(entries)


PLANTED: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    samples, base = build_samples(tmp_path_factory.mktemp("pickles") / "samples")
    yield {"samples": samples, "base": base, "registry": registry()}
    if PLANTED:
        write_report("pickles", {
            "cases": len(PLANTED), "readers": sorted({p["reader"] for p in PLANTED}),
            "payloads": sorted({p["payload"] for p in PLANTED}), "containers": sorted({p["container"] for p in PLANTED}),
            "refused": sum(p["refused"] for p in PLANTED), "ran": sum(p["ran"] for p in PLANTED)})


def read(world: dict[str, Any], key: str) -> Any:
    sample = world["samples"][key]
    reg = world["registry"]
    return reg.format(sample.reader).read(sample.path, registry=reg, **sample.options)


@pytest.mark.parametrize("key", sorted(TORCH_SAMPLES))
@pytest.mark.parametrize("container", ["legacy", "zip"])
@pytest.mark.parametrize("kind", ["shell", "python", "import"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(world, tmp_path, key, container, kind):
    sample = world["samples"][key]
    rel = TORCH_SAMPLES[key]
    marker = tmp_path / "marker"
    pickled = hostile_pickle(kind, marker)
    data = pickled if container == "legacy" else as_torch_zip(sample.originals[rel], pickled)
    try:
        (sample.folder / rel).write_bytes(data)
        with pytest.raises(UnsafeFileError) as caught:
            read(world, key)
    finally:
        sample.restore()
        PLANTED.append({"reader": sample.reader, "payload": kind, "container": container, "ran": marker.exists(),
                        "refused": isinstance(sys.exc_info()[1], type(None))})
    assert not marker.exists(), "the pickle's code ran"
    message = str(caught.value)
    assert "needs more than tensors" in message and "refused" in message  # why
    assert "safetensors" in message and "sandbox" in message  # how to convert it safely
    assert caught.value.code == "unsafe_pickle"
    read(world, key)  # the restored sample reads again


def test_the_prompt_tuning_reader_refuses_a_hostile_bin(world, tmp_path):
    """PEFT prompt tuning reads adapter_model.bin through the same weights-only loader (the peft format's)."""
    sample = world["samples"]["peft/prompt"]
    marker = tmp_path / "marker"
    (sample.folder / "adapter_model.safetensors").unlink()
    try:
        (sample.folder / "adapter_model.bin").write_bytes(hostile_pickle("shell", marker))
        with pytest.raises(UnsafeFileError):
            read(world, "peft/prompt")
    finally:
        sample.restore()
    assert not marker.exists()


@pytest.mark.parametrize("key", sorted(TORCH_SAMPLES))
def test_the_readers_call_torch_load_only_with_weights_only(world, monkeypatch, key):
    calls = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        assert kwargs.get("weights_only") is True, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    read(world, key)
    assert calls and all(c.get("weights_only") is True for c in calls)


def torch_load_calls(path: Path) -> list[ast.Call]:
    """Every ``torch.load(...)`` call in a source file (docstrings and messages that mention it do not count)."""
    tree = ast.parse(path.read_text("utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_no_source_calls_torch_load_without_weights_only():
    """A static guard: every torch.load call in the package passes weights_only=True."""
    offenders = [f"{path.relative_to(REPO)}:{call.lineno}"
                 for folder in ("core", "plugins", "cli") for path in sorted((REPO / folder).rglob("*.py"))
                 for call in torch_load_calls(path) if not weights_only(call)]
    assert not offenders, offenders


def test_a_legacy_pickle_claiming_a_huge_storage_is_refused_before_torch_allocates(tmp_path, monkeypatch):
    """torch's legacy loader allocates each storage from the element count in the pickle: checked first."""
    import pickletools

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4, 4)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    # the fourth pickle is the object; its BININT1 16 is the storage's element count
    pos = 0
    for _ in range(3):
        pos += list(pickletools.genops(data[pos:]))[-1][2] + 1
    ops = list(pickletools.genops(data[pos:]))
    at = next(p for op, arg, p in ops if op.name == "BININT1" and arg == 16) + pos
    hostile = data[:at] + b"\x8a" + _long1(2**40) + data[at + 2:]
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(hostile)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a file whose sizes are false"))
    with pytest.raises(TensorFileError, match="claims a size larger than the file"):
        check_torch_file(path)
    path.write_bytes(data)
    check_torch_file(path)  # the true file passes


@pytest.mark.parametrize("data", [b"\x80\x02" + b"\xff" * 40, b"\x80" + b"\x00" * 3, b"PK\x03\x04" + b"\x00" * 60,
                                  b"\x80\x02K\x01.", os.urandom(64), b""])
def test_garbage_torch_files_end_in_a_clean_error(world, data):
    sample = world["samples"]["peft/lora-bin"]
    try:
        (sample.folder / "adapter_model.bin").write_bytes(data)
        with pytest.raises(AdapterkitError) as caught:
            read(world, "peft/lora-bin")
    finally:
        sample.restore()
    assert isinstance(caught.value, (UnsafeFileError, TensorFileError)) or caught.value.code in ("bad_pickle",)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "adapterkit"), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("key", sorted(TORCH_SAMPLES))
def test_the_cli_refuses_a_hostile_pickle_cleanly(world, tmp_path, key):
    sample = world["samples"][key]
    rel = TORCH_SAMPLES[key]
    marker = tmp_path / "marker"
    base = ["--base", str(world["base"])] if sample.reader == "torchtune" else []
    try:
        (sample.folder / rel).write_bytes(as_torch_zip(sample.originals[rel], hostile_pickle("shell", marker)))
        checked = run_cli("validate", str(sample.path), *base, cwd=tmp_path)
        converted = run_cli("convert", str(sample.path), str(tmp_path / "out"), "--to", "adapterkit", *base, cwd=tmp_path)
    finally:
        sample.restore()
    assert not marker.exists()
    assert checked.returncode == 1, checked.stderr
    assert "needs more than tensors" in checked.stdout and "Traceback" not in checked.stdout + checked.stderr
    assert converted.returncode == 1
    lines = converted.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs more than tensors" in lines[0], converted.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_a_checked_torch_file_is_the_only_way_in():
    """Every weights-only load runs the size check first (a guard against a copy without it). The one loader is
    core/format/torch_files.py's read_torch_tensors (adapterkit.read_torch_tensors); a module that still has its
    own torch.load must check the file first too."""
    loaders = {str(path.relative_to(REPO)): path for folder in ("core", "plugins", "cli")
               for path in sorted((REPO / folder).rglob("*.py")) if torch_load_calls(path)}
    assert "core/format/torch_files.py" in loaders, sorted(loaders)
    for name, path in loaders.items():
        calls = torch_load_calls(path)
        assert len(calls) == 1 and weights_only(calls[0]), name
        checks = [node for node in ast.walk(ast.parse(path.read_text("utf-8")))
                  if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_torch_file"]
        assert len(checks) == 1 and checks[0].lineno < calls[0].lineno, name
