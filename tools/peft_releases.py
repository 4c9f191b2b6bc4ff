"""Regenerate ``plugins/peft/releases.json``: what each PEFT release's configs know, read from the releases themselves.

For every release in :data:`RELEASES` the PEFT wheel from PyPI is parsed (``ast``, nothing is
imported, so every release is read by one interpreter) and the table records:

- per ``peft_type`` adapterkit writes (:data:`CONFIG_CLASSES`), the dataclass fields of its config
  class with their base classes' (``dataclasses.fields`` order) and each field's default
  (``field(default=...)``, ``default_factory=dict`` -> ``{}``; a default that is no literal is kept
  as ``{"expr": "<source>"}``);
- the string values ``init_lora_weights`` accepts: the ``Literal[...]`` of its annotation and the strings
  ``tuners/lora/*.py`` compares it with (``==``; ``startswith`` ones are also prefixes);
- the ``task_type`` values (the members of ``TaskType``);
- how ``rank_pattern`` / ``alpha_pattern`` keys are matched: the ``re.match`` template of the LoRA
  model (or of ``peft.utils.other.get_pattern_key``) and whether one lookup over both maps picks
  the key for both (``joint``, PEFT < 0.14) or each map is looked up alone (``separate``).

Usage (network: PyPI)::

    python tools/peft_releases.py                 # downloads the wheels into a temporary folder
    python tools/peft_releases.py --wheels DIR    # or reads peft-<version>-py3-none-any.whl from DIR

tests/test_peft_versions.py checks the table against the PEFT installed in the test environment.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

#: every PEFT release on PyPI from 0.3.0 (April 2023) on
RELEASES = (
    "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.6.1", "0.6.2", "0.7.0", "0.7.1", "0.8.0", "0.8.1", "0.8.2", "0.9.0",
    "0.10.0", "0.11.0", "0.11.1", "0.12.0", "0.13.0", "0.13.1", "0.13.2", "0.14.0", "0.15.0", "0.15.1", "0.15.2",
    "0.16.0", "0.17.0", "0.17.1", "0.18.0", "0.18.1", "0.19.0", "0.19.1", "0.20.0", "0.21.0", "0.21.1", "0.21.2",
)
#: peft_type -> its config class (the peft_types adapterkit's codecs write)
CONFIG_CLASSES = {"LORA": "LoraConfig", "IA3": "IA3Config", "PROMPT_TUNING": "PromptTuningConfig",
                  "PREFIX_TUNING": "PrefixTuningConfig", "LOHA": "LoHaConfig", "LOKR": "LoKrConfig",
                  "VERA": "VeraConfig", "ADALORA": "AdaLoraConfig", "OFT": "OFTConfig", "BOFT": "BOFTConfig"}
OUT = Path(__file__).resolve().parent.parent / "plugins" / "peft" / "releases.json"
_FACTORIES = {"dict": {}, "list": [], "set": [], "tuple": []}
_COMPARED = re.compile(r"""init_lora_weights\)?(?:\.lower\(\))?\s*[!=]=\s*["']([a-z_]+)["']""")
_PREFIX = re.compile(r"""init_lora_weights\)?(?:\.lower\(\))?\.startswith\(\s*["']([a-z_]+)["']""")
_MATCH = re.compile(r"""re\.match\(\s*r?f?["']([^"']*\{key\}[^"']*)["']""")


def wheel_sources(path: Path) -> dict[str, str]:
    """``peft/...py`` -> source text of one wheel; a module shadowed by a package of its name (0.6.2 ships a stale
    ``peft/tuners/lora.py`` beside ``peft/tuners/lora/``) is left out, as Python's import does."""
    with zipfile.ZipFile(path) as wheel:
        sources = {name: wheel.read(name).decode("utf-8") for name in wheel.namelist()
                   if name.startswith("peft/") and name.endswith(".py")}
    return {name: text for name, text in sources.items() if name[:-3] + "/__init__.py" not in sources}


def _default(value: ast.expr | None) -> Any:
    if value is None:
        return {"expr": "<no default>"}
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                return _default(keyword.value)
            if keyword.arg == "default_factory":
                name = getattr(keyword.value, "id", None)
                if name in _FACTORIES:
                    return _FACTORIES[name]
                return {"expr": ast.unparse(keyword.value)}
        return {"expr": "<no default>"}
    try:
        return ast.literal_eval(value)
    except ValueError:
        return {"expr": ast.unparse(value)}


def classes(sources: dict[str, str]) -> dict[str, tuple[list[str], list[tuple[str, str, Any]]]]:
    """Class name -> (base names, [(field, annotation, default)]) of every class whose body annotates fields."""
    out: dict[str, tuple[list[str], list[tuple[str, str, Any]]]] = {}
    for name in sorted(sources):
        for node in ast.walk(ast.parse(sources[name])):
            if not isinstance(node, ast.ClassDef) or node.name in out:
                continue
            fields = [(stmt.target.id, ast.unparse(stmt.annotation), _default(stmt.value)) for stmt in node.body
                      if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]
            out[node.name] = ([ast.unparse(b).split(".")[-1] for b in node.bases], fields)
    return out


def fields_of(name: str, table: dict[str, tuple[list[str], list[tuple[str, str, Any]]]]) -> list[tuple[str, str, Any]]:
    """A dataclass's fields as ``dataclasses.fields`` orders them: the bases' first, redefinitions in place."""
    if name not in table:
        return []
    bases, own = table[name]
    merged: dict[str, tuple[str, str, Any]] = {}
    for base in reversed(bases):
        for field in fields_of(base, table):
            merged[field[0]] = field
    for field in own:
        merged[field[0]] = field
    return list(merged.values())


def pattern_rule(sources: dict[str, str]) -> dict[str, Any]:
    """How the LoRA model matches rank_pattern / alpha_pattern keys to a module path."""
    model = next((text for name, text in sources.items() if name in ("peft/tuners/lora/model.py",
                                                                     "peft/tuners/lora.py")), "")
    if "rank_pattern" not in model:
        return {}
    joint = re.search(r"chain\(\s*lora_config\.rank_pattern\.keys\(\)\s*,\s*lora_config\.alpha_pattern\.keys\(\)",
                      model) is not None
    text = model if joint else sources.get("peft/utils/other.py", "")
    if not joint:
        start = text.find("def get_pattern_key")
        text = text[start:start + 1500] if start >= 0 else ""
    match = _MATCH.search(text)
    if match is None:
        raise SystemExit("cannot find the re.match template of the rank_pattern lookup")
    return {"pattern_lookup": "joint" if joint else "separate", "pattern_regex": match.group(1).replace("\\\\", "\\")}


def init_strings(sources: dict[str, str], annotation: str) -> tuple[list[str], list[str]]:
    """(values, prefixes) of init_lora_weights strings the release knows."""
    lora = "\n".join(text for name, text in sources.items()
                     if name.startswith("peft/tuners/lora/") or name == "peft/tuners/lora.py")
    prefixes = set(_PREFIX.findall(lora))
    values = set(re.findall(r"""['"]([^'"]+)['"]""", annotation)) | set(_COMPARED.findall(lora)) | prefixes
    return sorted(values), sorted(prefixes)


def task_types(sources: dict[str, str]) -> list[str]:
    """The values of ``TaskType`` (``class TaskType(str, enum.Enum)``: ``SEQ_CLS = "SEQ_CLS"``, ...)."""
    for name in sorted(sources):
        for node in ast.walk(ast.parse(sources[name])):
            if isinstance(node, ast.ClassDef) and node.name == "TaskType":
                return sorted(stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                              and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))
    raise SystemExit("no TaskType in the wheel")


def release_table(sources: dict[str, str]) -> dict[str, Any]:
    table = classes(sources)
    configs: dict[str, Any] = {}
    init_values: tuple[list[str], list[str]] = ([], [])
    for peft_type, cls in CONFIG_CLASSES.items():
        fields = fields_of(cls, table)
        if not fields:
            continue
        configs[peft_type] = {name: default for name, _, default in fields}
        if peft_type == "LORA":
            annotation = next((a for n, a, _ in fields if n == "init_lora_weights"), "")
            init_values = init_strings(sources, annotation)
    return {"configs": configs, "init_lora_weights": init_values[0], "init_lora_weights_prefixes": init_values[1],
            "task_types": task_types(sources), **pattern_rule(sources)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="folder with peft-<version>-py3-none-any.whl (default: download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.wheels or Path(tmp)
        releases: dict[str, Any] = {}
        for version in RELEASES:
            wheel = folder / f"peft-{version}-py3-none-any.whl"
            if not wheel.is_file():
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"peft=={version}",
                                "-d", str(folder)], check=True)
            releases[version] = release_table(wheel_sources(wheel))
    data = {"generated_by": "tools/peft_releases.py", "config_classes": CONFIG_CLASSES, "releases": releases}
    lines = ["{"]
    lines.append(f'  "generated_by": {json.dumps(data["generated_by"])},')
    lines.append(f'  "config_classes": {json.dumps(CONFIG_CLASSES, sort_keys=True)},')
    lines.append('  "releases": {')
    for i, (version, entry) in enumerate(releases.items()):
        lines.append(f'    {json.dumps(version)}: {{')
        parts = [f'      "configs": {{']
        for j, (peft_type, fields) in enumerate(entry["configs"].items()):
            comma = "," if j < len(entry["configs"]) - 1 else ""
            parts.append(f'        {json.dumps(peft_type)}: {json.dumps(fields)}{comma}')
        parts.append("      },")
        rest = {k: v for k, v in entry.items() if k != "configs"}
        parts.append("      " + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in rest.items()))
        lines.extend(parts)
        lines.append("    }" + ("," if i < len(releases) - 1 else ""))
    lines.append("  }")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == data
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(releases)} releases)")


if __name__ == "__main__":
    main()
