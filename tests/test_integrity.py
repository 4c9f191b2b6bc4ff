"""The sha256 and size in adapter.json are checked on load and on validate: a flipped byte anywhere is caught.

Hypothesis picks the byte (anywhere in the tensor file: the 8-byte length, the JSON header, the
padding, the tensor data) and the bit; the file keeps its size, so only the checksum can notice. Each
case must make ``adapterkit.load`` raise an :class:`IntegrityError` and ``adapterkit.validate``
report the ``checksum`` error; truncation, growth and a replaced file are caught by the size, and
the CLI says so in one line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import adapterkit
from adapterkit.core.errors import IntegrityError
from adapterkit.core.store.native import TENSOR_FILE
from fuzz_helpers import Recorder, fuzz_profile, fuzz_settings, put, run_case, write_report
from helpers import VENV_BIN, edit_manifest, write_adapter

FLIPS = 300 if fuzz_profile() == "ci" else 5_000
RECORDER = Recorder()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("integrity"))


@pytest.fixture(scope="module")
def original(folder: Path) -> bytes:
    return (folder / TENSOR_FILE).read_bytes()


def test_the_saved_adapter_is_valid(folder):
    assert adapterkit.validate(folder).valid
    adapterkit.load(folder)


def test_a_flipped_byte_anywhere_in_the_tensor_file_is_detected(folder, original):
    size = len(original)
    header_length = int.from_bytes(original[:8], "little")
    regions = {"length": (0, 8), "header": (8, 8 + header_length), "data": (8 + header_length, size)}
    seen = set()

    @fuzz_settings(FLIPS)
    @given(position=st.integers(0, size - 1), bit=st.integers(0, 7))
    def flip(position: int, bit: int) -> None:
        data = bytearray(original)
        data[position] ^= 1 << bit
        put(folder / TENSOR_FILE, bytes(data))
        try:
            outcome = run_case(lambda: adapterkit.load(folder))
            RECORDER.add("adapterkit", "bit flip", outcome)
            assert isinstance(outcome.error, IntegrityError) and outcome.error.code == "checksum", outcome.label
            report = adapterkit.validate(folder)
            assert [e.code for e in report.errors] == ["checksum"], [str(e) for e in report.errors]
        finally:
            put(folder / TENSOR_FILE, original)
        seen.update(name for name, (lo, hi) in regions.items() if lo <= position < hi)

    flip()
    assert seen == set(regions), f"flips landed only in {sorted(seen)}"
    write_report("integrity", {"bit_flips": RECORDER.to_dict(fuzz_profile())["readers"]["adapterkit"],
                               "regions": sorted(seen)})


@pytest.mark.parametrize("change", ["truncate", "append", "empty", "other_adapter"])
def test_a_resized_or_replaced_file_is_detected(folder, original, tmp_path, change):
    if change == "other_adapter":
        data = (write_adapter(tmp_path, seed=1) / TENSOR_FILE).read_bytes()  # same size, other content
        code = "checksum"
    else:
        data = {"truncate": original[:-1], "append": original + b"\0", "empty": b""}[change]
        code = "size_mismatch"
    put(folder / TENSOR_FILE, data)
    try:
        with pytest.raises(IntegrityError) as caught:
            adapterkit.load(folder)
        assert caught.value.code == code
        assert [e.code for e in adapterkit.validate(folder).errors] == [code]
    finally:
        put(folder / TENSOR_FILE, original)


def test_a_manifest_checksum_that_was_edited_is_detected(folder, original):
    def wrong(manifest: dict) -> None:
        manifest["tensors"][TENSOR_FILE]["sha256"] = hashlib.sha256(b"something else").hexdigest()

    saved = (folder / "adapter.json").read_bytes()
    edit_manifest(folder, wrong)
    try:
        with pytest.raises(IntegrityError, match="sha256 differs"):
            adapterkit.load(folder)
    finally:
        put(folder / "adapter.json", saved)


def test_the_cli_reports_a_flipped_byte_in_one_line(folder, original, tmp_path):
    data = bytearray(original)
    data[len(data) // 2] ^= 0x10
    put(folder / TENSOR_FILE, bytes(data))
    try:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        checked = subprocess.run([str(VENV_BIN / "adapterkit"), "validate", str(folder)], capture_output=True,
                                 text=True, timeout=120, env=env)
        loaded = subprocess.run([str(VENV_BIN / "adapterkit"), "convert", str(folder), str(tmp_path / "out"),
                                 "--to", "peft"], capture_output=True, text=True, timeout=120, env=env)
    finally:
        put(folder / TENSOR_FILE, original)
    assert checked.returncode == 1 and "sha256 differs from the manifest" in checked.stdout
    assert loaded.returncode == 1 and loaded.stderr.count("\n") == 1
    assert loaded.stderr.startswith("error: ") and "sha256 differs" in loaded.stderr and "Traceback" not in loaded.stderr
    assert not (tmp_path / "out").exists()
