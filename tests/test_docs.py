"""The docs stay true to the code.

- every hook spec has a section in docs/plugins.md whose heading is its signature;
- every ```python block of docs/plugins.md and docs/api.md runs as-is
  (```python no-run blocks are skipped);
- every built-in command has a ``## adapterkit <name>`` section in docs/cli.md
  that names all of its options, and whose synopsis names no option it lacks;
- every manifest example in docs/format.md validates against the schema and the code;
- every public name and every core module is documented.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_DOCS = ("plugins.md", "api.md")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def read_doc(name: str) -> str:
    path = DOCS / name
    assert path.is_file(), f"docs/{name} is missing"
    return path.read_text("utf-8")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, code) of every fenced block."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


def headings(text: str, level: int = 2) -> list[str]:
    marker = "#" * level + " "
    return [line[len(marker):].strip() for line in text.splitlines() if line.startswith(marker)]


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading ("" when absent)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("## ") and line[3:].strip() == heading)
    except StopIteration:
        return ""
    body = []
    in_fence = False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            in_fence = not in_fence
        if line.startswith("## ") and not in_fence:
            break
        body.append(line)
    return "\n".join(body)


# ---- hooks ---------------------------------------------------------------------

def hookspecs() -> dict[str, object]:
    from adapterkit.core.plugin import hookspecs as mod

    marker = f"{mod.PROJECT}_spec"
    return {name: fn for name, fn in vars(mod).items() if inspect.isfunction(fn) and hasattr(fn, marker)}


def signature_heading(name: str, fn: object) -> str:
    return f"{name}({', '.join(inspect.signature(fn).parameters)})"


def test_there_are_hookspecs():
    assert hookspecs(), "core/plugin/hookspecs.py defines no hook specs (the marker lookup is broken?)"


@pytest.mark.parametrize("name", sorted(hookspecs()))
def test_every_hook_has_a_section_headed_by_its_signature(name):
    heading = signature_heading(name, hookspecs()[name])
    assert heading in headings(read_doc("plugins.md")), f"docs/plugins.md has no section '## {heading}'"


@pytest.mark.parametrize("name", sorted(hookspecs()))
def test_every_hook_section_has_a_runnable_example(name):
    body = section(read_doc("plugins.md"), signature_heading(name, hookspecs()[name]))
    runnable = [info for _, info, _ in fenced_blocks(body) if info == "python"]
    assert runnable, f"the section of {name} in docs/plugins.md has no runnable ```python example"


def test_no_section_for_a_hook_that_does_not_exist():
    documented = {h for h in headings(read_doc("plugins.md")) if re.match(r"adapterkit_\w+\(", h)}
    real = {signature_heading(name, fn) for name, fn in hookspecs().items()}
    assert documented <= real, f"docs/plugins.md documents hooks that core/plugin/hookspecs.py lacks: {sorted(documented - real)}"


# ---- runnable examples -----------------------------------------------------------

def python_blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for name in RUN_DOCS:
        path = DOCS / name
        if path.is_file():
            out += [(name, line, info, code) for line, info, code in fenced_blocks(path.read_text("utf-8"))
                    if info.split()[:1] == ["python"]]
    return out


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_docs_have_runnable_examples(doc):
    runnable = [b for b in python_blocks() if b[0] == doc and b[2] == "python"]
    assert runnable, f"docs/{doc} has no runnable ```python block"
    unknown = [b[1] for b in python_blocks() if b[0] == doc and b[2] not in ("python", "python no-run")]
    assert not unknown, f"docs/{doc}: unknown info string on the python blocks at lines {unknown}"


@pytest.mark.parametrize(
    "doc,line,info,code",
    [pytest.param(*b, id=f"{b[0]}:{b[1]}") for b in python_blocks() if b[2] == "python"],
)
def test_python_example_runs(doc, line, info, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERKIT_PLUGINS", raising=False)
    namespace = {"__name__": "__docs_example__"}
    exec(compile(code, f"docs/{doc}:{line}", "exec"), namespace)  # noqa: S102 - our own docs


# ---- CLI reference ---------------------------------------------------------------

def builtin_command(name: str) -> click.Command:
    from adapterkit.cli.main import COMMANDS

    return importlib.import_module(COMMANDS[name][0]).command


def command_params(command: click.Command) -> list[click.Parameter]:
    """The parameters of a command, and of every subcommand of a group (``export onnx``, ``export check``)."""
    params = list(command.params)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            params += command_params(sub)
    return params


def test_there_are_commands():
    from adapterkit.cli.main import COMMANDS

    assert COMMANDS


@pytest.mark.parametrize("name", sorted(importlib.import_module("adapterkit.cli.main").COMMANDS))
def test_every_command_has_a_section(name):
    assert f"adapterkit {name}" in headings(read_doc("cli.md")), f"docs/cli.md has no section '## adapterkit {name}'"


@pytest.mark.parametrize("name", sorted(importlib.import_module("adapterkit.cli.main").COMMANDS))
def test_every_option_and_argument_is_documented(name):
    command = builtin_command(name)
    body = section(read_doc("cli.md"), f"adapterkit {name}")
    assert body, f"docs/cli.md has no section '## adapterkit {name}'"
    for param in command_params(command):
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                assert re.search(re.escape(opt) + r"(?![\w-])", body), f"docs/cli.md, adapterkit {name}: option {opt} is not documented"
        else:
            metavar = param.human_readable_name
            assert re.search(rf"\b{re.escape(metavar)}\b", body), f"docs/cli.md, adapterkit {name}: argument {metavar} is not documented"


@pytest.mark.parametrize("name", sorted(importlib.import_module("adapterkit.cli.main").COMMANDS))
def test_synopsis_names_only_real_options(name):
    command = builtin_command(name)
    body = section(read_doc("cli.md"), f"adapterkit {name}")
    blocks = fenced_blocks(body)
    assert blocks, f"docs/cli.md, adapterkit {name}: the section has no synopsis block"
    synopsis = blocks[0][2]
    assert synopsis.lstrip().startswith(f"adapterkit {name}"), f"docs/cli.md, adapterkit {name}: the first block is not the synopsis"
    real = {"--help", "-h"}
    for param in command_params(command):
        if isinstance(param, click.Option):
            real.update(param.opts, param.secondary_opts)
    named = set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", synopsis))
    assert named <= real, f"docs/cli.md, adapterkit {name}: synopsis names options the command lacks: {sorted(named - real)}"


# ---- format examples -------------------------------------------------------------

def manifest_examples() -> list[tuple[int, dict]]:
    out = []
    for line, info, code in fenced_blocks(read_doc("format.md")):
        if info == "json" and '"format": "adapterkit"' in code:
            out.append((line, json.loads(code)))
    return out


def test_format_spec_has_complete_manifest_examples():
    assert len(manifest_examples()) >= 2, "docs/format.md needs at least two complete adapter.json examples"


def test_manifest_examples_validate():
    import jsonschema

    from adapterkit.core.format import manifest as manifest_mod
    from adapterkit.core.format.base_model import targets_fingerprint
    from adapterkit.core.plugin.registry import default_registry

    schema = json.loads((ROOT / "schema" / "manifest-1.json").read_text("utf-8"))
    registry = default_registry()
    for line, document in manifest_examples():
        where = f"docs/format.md:{line}"
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(document))
        assert not errors, f"{where}: {errors[0].message}"
        data, problems = manifest_mod.check(document, where)
        assert not problems, f"{where}: {problems[0]}"
        method = registry.method(data["method"]["name"])
        assert not manifest_mod.schema_errors(data["method"]["config"], method.config_schema(), where)
        for module, target in data["targets"].items():
            assert not manifest_mod.schema_errors(target, method.target_schema(), where), module
            assert not method.check_target(module, target, data["method"]["config"]), module
        fingerprint = data["base_model"].get("fingerprint")
        if fingerprint:
            assert fingerprint == targets_fingerprint(data["targets"]), f"{where}: fingerprint does not match the targets"


# ---- coverage of names and modules --------------------------------------------------

def test_every_public_name_is_in_the_api_reference():
    import adapterkit

    text = read_doc("api.md") + read_doc("plugins.md")
    missing = [name for name in adapterkit.__all__ if not re.search(rf"`(adapterkit\.)?{re.escape(name)}\b", text)]
    assert not missing, f"docs/api.md and docs/plugins.md never mention: {missing}"


def test_every_core_module_is_in_the_architecture_map():
    text = read_doc("architecture.md")
    modules = sorted(p.name for p in (ROOT / "core").rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if f"`{m}`" not in text and not re.search(rf"`{re.escape(m[:-3])}/?`", text)
               and f"`{Path(m).stem}.py`" not in text]
    assert not missing, f"docs/architecture.md's module map lacks core/ modules: {missing}"
