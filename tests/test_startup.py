"""Start-up cost: --help, validate, inspect (and the other torch-free commands) never import torch or transformers.

Each command runs in a fresh interpreter through ``python -m adapterkit``
(runpy), and the interpreter reports which heavy modules ended up imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.core.format import safetensors_io
from adapterkit.core.plugin.registry import default_registry
from helpers import edit_manifest, llama_targets, lora_tensors, write_adapter

HEAVY = ("torch", "transformers", "peft", "accelerate")

PROBE = """
import json, runpy, sys
sys.argv = ["adapterkit", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("adapterkit", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print("@@PROBE@@" + json.dumps({"exit": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def probe(args: list, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERKIT_PLUGINS", "PYTHONPATH", "PYTHONSTARTUP")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )
    marker = [line for line in result.stdout.splitlines() if line.startswith("@@PROBE@@")]
    assert marker, f"probe did not finish: {result.stderr[-2000:]}"
    out = json.loads(marker[-1][len("@@PROBE@@"):])
    out["stdout"], out["stderr"] = result.stdout, result.stderr
    return out


def make_peft_folder(folder: Path) -> Path:
    """A PEFT LoRA folder as PEFT writes it (adapter_config.json + adapter_model.safetensors), built by hand."""
    targets = llama_targets()
    tensors = {}
    for key, array in lora_tensors(targets).items():
        module, param = key.rsplit(".lora.", 1)
        tensors[f"base_model.model.{module}.lora_{param}.weight"] = array
    folder.mkdir(parents=True)
    safetensors_io.save(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "inference_mode": True, "base_model_name_or_path": "tiny-llama", "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startup")
    good = write_adapter(root, "good")
    bad = write_adapter(root, "bad")
    edit_manifest(bad, lambda d: d["method"]["config"].update(r=0))
    return {"root": root, "good": good, "bad": bad, "peft": make_peft_folder(root / "peft")}


CASES = {
    "--help": (["--help"], 0),
    "command help": (["validate", "--help"], 0),
    "validate": (["validate", "{good}"], 0),
    "validate --json": (["validate", "--json", "{good}"], 0),
    "validate invalid": (["validate", "{bad}"], 1),
    "inspect": (["inspect", "{good}"], 0),
    "inspect --json": (["inspect", "--json", "{good}"], 0),
    "schema": (["schema"], 0),
    "plugins": (["plugins", "--json"], 0),
    "convert adapterkit": (["convert", "{good}", "{root}/converted", "--to", "adapterkit"], 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_command_does_not_import_torch(folders, name):
    args, want = CASES[name]
    args = [a.format(**folders) for a in args]
    out = probe(args, folders["root"])
    assert out["exit"] == want, out["stdout"] + out["stderr"]
    assert out["heavy"] == [], f"adapterkit {' '.join(args)} imported {out['heavy']}"


def test_validate_with_base_does_not_import_torch(folders, tiny_base_dirs):
    out = probe(["validate", folders["good"], "--base", tiny_base_dirs["llama"]], folders["root"])
    assert out["exit"] == 0, out["stdout"] + out["stderr"]
    assert out["heavy"] == []


def test_import_adapterkit_and_api_do_not_import_torch(folders):
    code = (
        "import sys, adapterkit\n"
        f"a = adapterkit.load({str(folders['good'])!r})\n"
        f"r = adapterkit.validate({str(folders['good'])!r})\n"
        "assert r.valid and a.method == 'lora'\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=folders["root"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_probe_detects_a_torch_import(folders):
    """The probe itself works: a command that imports torch is caught."""
    code = PROBE.replace("code = 0\n", "code = 0\nimport types\nsys.modules['torch'] = types.ModuleType('torch')\n")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(["--help"])], capture_output=True, text=True,
                            timeout=120, cwd=folders["root"])
    assert '"heavy": ["torch"' in result.stdout


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_peft_folder_does_not_import_torch(folders, command):
    assert "peft" in default_registry().formats
    out = probe([command, folders["peft"]], folders["root"])
    assert out["exit"] == 0, out["stdout"] + out["stderr"]
    assert "peft" in out["stdout"]
    assert out["heavy"] == []
