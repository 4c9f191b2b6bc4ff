"""Installing and uninstalling adapterkit-ia3 for real, with pip, in a throwaway virtual environment.

The throwaway venv sees everything the test's own environment has installed (one
symlink per site-packages entry) except adapterkit-ia3; pip then installs the
example into it (a real wheel build, not editable) and uninstalls it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, perturb, run_cli

from ia3_helpers import CONFIGS

EXAMPLE = Path(__file__).resolve().parent.parent


def _ia3_entry(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return "adapterkit_ia3" in lowered


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ia3venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for entry in ours.iterdir():
        if not _ia3_entry(entry.name) and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry)
    return python


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=300)


def test_uninstalling_removes_ia3_from_every_command(venv, tmp_path):
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "ia3", CONFIGS["llama"])
    perturb(handle.parameters())
    adapter = adapterkit.save(handle.to_adapter(), tmp_path / "ia3-adapter")
    base = tmp_path / "base"
    TINY_MODELS["llama"](0).save_pretrained(base)
    peft_dir = adapterkit.save(handle.to_adapter(), tmp_path / "ia3-peft", format="peft")

    # before: the throwaway venv does not have it
    listed = json.loads(run_cli("plugins", "--json", python=str(venv)).stdout)
    assert "ia3" not in [e["name"] for e in listed] and "lora" in [e["name"] for e in listed]

    # install with pip (a real build of the example), and every command sees it
    result = pip(venv, "install", "--no-deps", "--no-build-isolation", "--no-index", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {e["name"]: e for e in json.loads(run_cli("plugins", "--json", python=str(venv)).stdout)}
    assert listed["ia3"]["distribution"] == "adapterkit-ia3" and listed["ia3"]["errors"] == []
    assert run_cli("validate", str(adapter), python=str(venv)).returncode == 0
    assert run_cli("validate", str(peft_dir), "--base", str(base), python=str(venv)).returncode == 0

    # uninstall with pip: gone from `plugins`, and an IA3 adapter gets one clear line naming the method
    result = pip(venv, "uninstall", "-y", "adapterkit-ia3")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = run_cli("plugins", python=str(venv))
    assert listed.returncode == 0 and "ia3" not in listed.stdout and "adapterkit-ia3" not in listed.stdout
    for args in (["inspect", str(adapter)], ["convert", str(adapter), str(tmp_path / "out"), "--to", "peft"],
                 ["merge", str(adapter), "--base", str(base), "-o", str(tmp_path / "merged")],
                 ["bench", str(adapter), "--base", str(base), "--repeats", "1"]):
        result = run_cli(*args, python=str(venv))
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "unknown method 'ia3'" in lines[0], (args, lines)
        assert "Traceback" not in result.stderr
    result = run_cli("validate", str(adapter), python=str(venv))
    assert result.returncode == 1 and "unknown method 'ia3'" in result.stdout
    result = run_cli("train", "--base", str(base), "--method", "ia3", "--data", str(adapter / "adapter.json"),
                     "-o", str(tmp_path / "t"), python=str(venv))
    assert result.returncode in (1, 2) and "ia3" in result.stdout + result.stderr and "Traceback" not in result.stderr
    result = run_cli("validate", str(peft_dir), python=str(venv))  # still a PEFT folder, but no codec reads IA3
    assert result.returncode == 1 and "no installed plugin reads PEFT IA3 adapters" in result.stdout, result.stdout
    assert "LORA" in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
