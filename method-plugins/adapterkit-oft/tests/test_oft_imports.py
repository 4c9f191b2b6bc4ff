"""The package imports only what plugins may (adapterkit's public names, stdlib, numpy, torch), and
importing it (and its method) does not import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "adapterkit_oft"
ALLOWED = {"adapterkit", "numpy", "torch", "ml_dtypes", "transformers", "__future__"}


def test_imports_are_public_only():
    stdlib = set(sys.stdlib_module_names)
    for file in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED | stdlib, f"{file.name} imports {name}"
                assert not name.startswith("adapterkit.") , f"{file.name} imports {name} (not the public API)"


def test_import_is_torch_free():
    code = "import adapterkit_oft, adapterkit_oft.method, adapterkit_oft.peft_codec, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
