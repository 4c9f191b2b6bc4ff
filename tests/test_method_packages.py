"""The method plugin packages (method-plugins/*) are written as a third party would write them.

Each imports only the public ``adapterkit`` names (and ``adapterkit.testing`` in its tests), never
``adapterkit.core``, ``adapterkit.cli``, ``adapterkit.plugins`` or another plugin package, and
importing it does not import torch (``validate`` / ``inspect`` / ``convert`` run without torch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "method-plugins").glob("adapterkit-*") if (p / "pyproject.toml").is_file())
#: third-party libraries a package or its tests may import besides the standard library
LIBRARIES = {"numpy", "ml_dtypes", "torch", "transformers", "peft", "pytest", "safetensors", "tokenizers", "lycoris"}


def _module(package: Path) -> str:
    return package.name.replace("-", "_")


def _imports(file: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(file.read_text("utf-8"), str(file))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") if node.module == "adapterkit" else
                         (node.lineno, node.module) for alias in node.names)
    return found


def _public(name: str, in_tests: bool) -> bool:
    """``adapterkit.<public name>`` (``from adapterkit import X``), and ``adapterkit.testing`` in tests."""
    parts = name.split(".")
    if parts[0] != "adapterkit" or len(parts) < 2:
        return False
    if parts[1] == "testing":
        return in_tests
    return len(parts) == 2 and parts[1] not in {"core", "cli", "plugins", "schema"}


def test_the_six_packages_are_there():
    assert {p.name for p in PACKAGES} >= {f"adapterkit-{m}" for m in ("loha", "lokr", "vera", "adalora", "oft", "boft")}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_imports_only_the_public_api(package: Path):
    own = _module(package)
    test_modules = {f.stem for f in (package / "tests").glob("*.py")}  # a test's own helper modules
    problems = []
    for file in sorted(package.rglob("*.py")):
        in_tests = "tests" in file.relative_to(package).parts
        for line, name in _imports(file):
            root = name.split(".")[0]
            if root == own or root in sys.stdlib_module_names or root in LIBRARIES or (in_tests and root in test_modules):
                continue
            if name == "adapterkit" or _public(name, in_tests):
                continue
            problems.append(f"{file.relative_to(ROOT)}:{line} imports {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_importing_a_package_does_not_import_torch(package: Path):
    own = _module(package)
    code = (f"import sys, {own}, {own}.method\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_peft_codec_knows_exactly_the_fields_of_the_installed_peft_config(package: Path):
    """The field list each codec refuses others against is PEFT's own (a PEFT upgrade that adds a field fails here,
    so the list is reviewed rather than the new field refused in every user's folder)."""
    import dataclasses
    import importlib

    import peft

    codec = importlib.import_module(f"{_module(package)}.peft_codec")
    peft_type = next(c.key for c in vars(codec).values() if isinstance(c, type) and getattr(c, "format", None) == "peft")
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    common = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert set(codec.KNOWN_FIELDS) == {f.name for f in dataclasses.fields(config_class)} - common

    from adapterkit.plugins.peft.context import PeftReadContext

    assert PeftReadContext.COMMON_FIELDS == common
