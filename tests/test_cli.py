"""The click CLI: help, exit codes (0 ok, 1 invalid / failed, 2 usage), JSON output, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import COMMANDS, cli
from adapterkit.core.format.manifest import MANIFEST_NAME
from adapterkit.core.store.native import TENSOR_FILE
from helpers import REPO, VENV_BIN, edit_manifest, write_adapter

LLAMA_BASE = {"model_type": "llama", "architecture": "LlamaForCausalLM"}


def invoke(*args: str, exit_code: int | None = 0):
    """Run the CLI in-process; an exception other than SystemExit is a bug, never a user error."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"adapterkit {' '.join(map(str, args))} crashed") from result.exception
    if exit_code is not None:
        assert result.exit_code == exit_code, (result.stdout, result.stderr)
    return result


def assert_clean_error(result, *needles: str) -> None:
    """Exit 1, one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def folder(tmp_path):
    return write_adapter(tmp_path)


@pytest.fixture
def broken(tmp_path):
    folder = write_adapter(tmp_path, "broken")
    edit_manifest(folder, lambda d: d["method"]["config"].update(r=0))
    return folder


# ---- help and version -----------------------------------------------------------

def test_top_level_help_lists_every_command():
    result = invoke("--help")
    assert result.stdout.startswith("Usage: ")
    for name, (_, line) in COMMANDS.items():
        assert name in result.stdout
        assert line[:30] in result.stdout
    assert invoke("-h").stdout == result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    result = invoke(name, "--help")
    assert result.stdout.startswith(f"Usage: cli {name}") or result.stdout.startswith(f"Usage: adapterkit {name}")
    assert "--help" in result.stdout


def test_version():
    assert adapterkit.__version__ in invoke("--version").stdout


def test_unknown_command_and_no_command_are_usage_errors():
    assert invoke("frobnicate", exit_code=2).stderr.count("No such command") == 1
    assert "Usage:" in invoke(exit_code=2).stderr  # no command: help, as a usage error


# ---- validate -----------------------------------------------------------

def test_validate_valid_exits_0(folder):
    result = invoke("validate", folder)
    assert result.stdout.splitlines()[0] == f"valid: {folder} (adapterkit, lora)"
    assert "checked:" in result.stdout and "not checked:" in result.stdout


def test_validate_invalid_exits_1_and_lists_errors(broken):
    result = invoke("validate", broken, exit_code=1)
    lines = result.stdout.splitlines()
    assert lines[0] == f"invalid: {broken} (adapterkit, lora)"
    assert any(line.startswith("  error: ") and "$.method.config.r" in line and "minimum" in line for line in lines)
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_missing_path_exits_1(tmp_path):
    result = invoke("validate", tmp_path / "nope", exit_code=1)
    assert "invalid:" in result.stdout and "path not found" in result.stdout


@pytest.mark.parametrize(
    "args",
    [("--nope",), (), ("--base",), ("--base", "/definitely/not/here")],
    ids=["bad option", "missing path", "option without value", "base does not exist"],
)
def test_validate_usage_errors_exit_2(folder, args):
    extra = list(args) if args == () else [str(folder), *args]
    result = invoke("validate", *extra, exit_code=2)
    assert "Usage:" in result.stderr or "Error:" in result.stderr


def test_validate_from_an_unknown_format_is_reported(folder):
    result = invoke("validate", folder, "--from", "nosuch", exit_code=1)
    assert "Traceback" not in result.stderr + result.stdout
    assert "invalid" in result.stdout and "unknown format 'nosuch'" in result.stdout
    data = json.loads(invoke("validate", "--json", folder, "--from", "nosuch", exit_code=1).stdout)
    assert data["valid"] is False and data["errors"][0]["code"] == "unknown_format"


def test_validate_json_valid_and_invalid(folder, broken):
    data = json.loads(invoke("validate", "--json", folder).stdout)
    assert data["valid"] is True and data["errors"] == [] and data["method"] == "lora"
    data = json.loads(invoke("validate", "--json", broken, exit_code=1).stdout)
    assert data["valid"] is False
    assert data["errors"][0]["location"] == "$.method.config.r" and data["errors"][0]["code"] == "schema"


def test_validate_json_with_a_wrong_base(tmp_path, tiny_base_dirs):
    folder = write_adapter(tmp_path, base_model=LLAMA_BASE)
    data = json.loads(invoke("validate", "--json", folder, "--base", tiny_base_dirs["gpt2"], exit_code=1).stdout)
    assert {e["code"] for e in data["errors"]} == {"wrong_base", "missing_module"}
    data = json.loads(invoke("validate", "--json", folder, "--base", tiny_base_dirs["llama"]).stdout)
    assert data["valid"] is True


# ---- inspect -----------------------------------------------------------

def test_inspect_text(tmp_path):
    folder = write_adapter(tmp_path, base_model={**LLAMA_BASE, "name": "tiny-llama", "num_parameters": 100_000})
    out = invoke("inspect", folder).stdout
    assert out.splitlines()[0].split() == ["format", "adapterkit"]
    assert "lora" in out and "alpha=8 r=4" in out
    assert "4 modules: q_proj, v_proj" in out
    assert "896" in out  # parameters
    assert "tiny-llama LlamaForCausalLM" in out
    assert "0.896% of 100.00K base parameters" in out


def test_inspect_json(folder):
    data = json.loads(invoke("inspect", "--json", folder).stdout)
    assert data["format"] == "adapterkit" and data["method"] == "lora"
    assert data["targets"] == 4 and data["target_kinds"] == {"linear": 4}
    assert data["ranks"] == {"4": 4} and data["alphas"] == {"8": 4}
    assert data["parameters"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert data["tensor_bytes"] == 4 * data["parameters"]
    assert data["file_bytes"] == sum((folder / n).stat().st_size for n in (MANIFEST_NAME, TENSOR_FILE))
    assert data["modules"] == ["q_proj", "v_proj"]


def test_inspect_invalid_adapter_is_a_clean_error(broken):
    assert_clean_error(invoke("inspect", broken, exit_code=1), "$.method.config.r", "minimum")


def test_inspect_missing_path_is_a_usage_error(tmp_path):
    invoke("inspect", tmp_path / "nope", exit_code=2)


# ---- convert -----------------------------------------------------------

def test_convert_adapterkit_to_adapterkit(folder, tmp_path):
    out = tmp_path / "converted"
    result = invoke("convert", folder, out, "--to", "adapterkit")
    assert result.stdout.strip() == f"wrote {out} (adapterkit)"
    for name in (MANIFEST_NAME, TENSOR_FILE):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "converted"]  # no temporary leftovers


def test_convert_to_an_unknown_format_is_a_clean_error(folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", folder, out, "--to", "nosuchformat", exit_code=1)
    assert_clean_error(result, "unknown format 'nosuchformat'", "adapterkit")
    assert not out.exists()


def test_convert_from_an_unknown_format_is_a_clean_error(folder, tmp_path):
    result = invoke("convert", folder, tmp_path / "out", "--from", "nosuch", "--to", "adapterkit", exit_code=1)
    assert_clean_error(result, "unknown format 'nosuch'")


def test_convert_invalid_source_is_a_clean_error(broken, tmp_path):
    result = invoke("convert", broken, tmp_path / "out", "--to", "adapterkit", exit_code=1)
    assert_clean_error(result, "$.method.config.r")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_an_existing_non_empty_destination(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    assert_clean_error(invoke("convert", folder, out, "--to", "adapterkit", exit_code=1), "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    invoke("convert", folder, out, "--to", "adapterkit", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, TENSOR_FILE])


@pytest.mark.parametrize("args", [("--to",), (), ("--to", "adapterkit", "--bogus")], ids=["no value", "no --to", "bad option"])
def test_convert_usage_errors_exit_2(folder, tmp_path, args):
    invoke("convert", folder, tmp_path / "out", *args, exit_code=2)


def test_convert_missing_source_exits_2(tmp_path):
    invoke("convert", tmp_path / "nope", tmp_path / "out", "--to", "adapterkit", exit_code=2)


# ---- schema, plugins -----------------------------------------------------------

def test_schema_prints_valid_json():
    data = json.loads(invoke("schema").stdout)
    assert data["$id"].endswith("manifest-1.json")
    assert data == json.loads((REPO / "schema" / "manifest-1.json").read_text("utf-8"))


def test_schema_of_an_unknown_version_or_method_is_a_clean_error():
    assert_clean_error(invoke("schema", "--version", "2", exit_code=1), "major version 2")
    assert_clean_error(invoke("schema", "--method", "nosuch", exit_code=1), "unknown method 'nosuch'")
    invoke("schema", "--version", "one", exit_code=2)


def test_plugins_text_and_json():
    text = invoke("plugins").stdout
    assert "lora  [ok]  adapterkit " in text and "methods: lora (" in text
    assert "formats: adapterkit (" in text
    entries = json.loads(invoke("plugins", "--json").stdout)
    names = [e["name"] for e in entries]
    assert {"adapterkit", "lora"} <= set(names)
    assert all(set(e) >= {"name", "distribution", "version", "hooks", "methods", "formats", "errors",
                          "method_capabilities"} for e in entries)
    caps = {m: c for e in entries for m, c in e["method_capabilities"].items()}
    assert caps["lora"] == {"capabilities": ["LowRank", "DeltaWeight", "FromFactors", "RuntimeComposable",
                                             "Quantizable"],
                            "merge": True, "compose": ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
                                                       "magnitude_prune"],
                            "runtime_composition": ["weighted_sum", "average"], "adapter_pool": True}
    assert caps["dora"] == {"capabilities": ["MergedWeight"], "merge": True, "compose": [], "runtime_composition": [],
                            "adapter_pool": False}
    assert caps["bottleneck"] == {"capabilities": ["RuntimeComposable"], "merge": False, "compose": [],
                                  "runtime_composition": ["stack", "average", "weighted_sum"], "adapter_pool": False}
    assert caps["prompt"] == {"capabilities": [], "merge": False, "compose": [], "runtime_composition": [],
                              "adapter_pool": False}
    assert "    bottleneck: RuntimeComposable: no merge; no compose; runtime stack, average, weighted_sum" in text


# ---- real processes -----------------------------------------------------------

def run(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "ADAPTERKIT_PLUGINS"}
    full_env.update(env or {})
    return subprocess.run(
        [str(VENV_BIN / "adapterkit"), *map(str, args)], capture_output=True, text=True, env=full_env,
        cwd=cwd, timeout=120,
    )


def test_console_script_help_and_validate(folder, broken, tmp_path):
    assert (VENV_BIN / "adapterkit").is_file()
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "validate" in result.stdout
    result = run("validate", folder, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("valid: ")
    result = run("validate", "--json", broken, cwd=tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout)["valid"] is False
    result = run("validate", folder, "--bogus", cwd=tmp_path)
    assert result.returncode == 2 and "No such option" in result.stderr


def test_console_script_user_error_has_no_traceback(folder, tmp_path):
    result = run("convert", folder, tmp_path / "out", "--to", "nosuchformat", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")


def test_python_dash_m_is_the_same_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adapterkit", "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0 and adapterkit.__version__ in result.stdout


def test_console_script_plugins_json_reports_a_broken_distribution(tmp_path):
    site = tmp_path / "site"
    info = site / "fakeplug-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[adapterkit]\nfakeplug = fakeplug_cli_mod\n")
    (site / "fakeplug_cli_mod.py").write_text("import no_such_module_anywhere\n")
    result = run("plugins", "--json", env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # a failed plugin makes the listing exit 1
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["fakeplug"]["distribution"] == "fakeplug"
    assert "ModuleNotFoundError" in entries["fakeplug"]["errors"][0]
    assert entries["lora"]["errors"] == [] and entries["lora"]["methods"] == ["lora", "dora", "qlora"]


# ---- bugs and interrupts -----------------------------------------------------------

def test_a_bug_keeps_its_traceback(folder, monkeypatch):
    from adapterkit.core import api

    def crash(*args, **kwargs):
        raise ValueError("internal bug")

    monkeypatch.setattr(api, "validate", crash)
    result = CliRunner().invoke(cli, ["validate", str(folder)])
    assert isinstance(result.exception, ValueError)  # not turned into a one-line user error


def test_ctrl_c_exits_130(folder, monkeypatch):
    from adapterkit.core import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "validate", interrupted)
    result = invoke("validate", folder, exit_code=130)
    assert result.stderr.strip() == "interrupted"


def test_convert_passes_base_only_to_the_formats_that_take_one(tmp_path):
    """--base goes to whichever side takes a base (here the mlx writer) and is not an error for the native
    format, which takes none; a -O key that neither side takes still is."""
    from models import tiny_llama

    from adapterkit.core.store.adapters import convert

    model = tiny_llama()
    source = adapterkit.save(adapterkit.inject(model, "lora", r=2, target_modules=["q_proj"]).to_adapter(),
                             tmp_path / "src")
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    assert convert(source, tmp_path / "copy", "adapterkit", base=base).is_dir()
    assert convert(source, tmp_path / "mlx", "mlx", base=base).is_dir()
    with pytest.raises(adapterkit.UsageError, match="option 'bogus' is taken by neither"):
        convert(source, tmp_path / "bad", "adapterkit", base=base, bogus=1)


def test_inspect_shows_what_the_reader_had_to_decide(tmp_path, folder):
    """A reader's warning (here: a PEFT LoRA initialised by PiSSA, relative to a changed base) is in the summary."""
    from helpers import make_lora_adapter

    peft_folder = adapterkit.save(make_lora_adapter(), tmp_path / "peft", "peft")
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    (peft_folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    rows = [line for line in invoke("inspect", peft_folder).stdout.splitlines() if line.startswith("warning")]
    assert len(rows) == 1 and "'pissa' initialisation changes the base weights" in rows[0], rows
    assert "pissa" in json.loads(invoke("inspect", "--json", peft_folder).stdout)["warnings"][0]
    assert "warnings" not in json.loads(invoke("inspect", "--json", folder).stdout)
    assert "warning" not in invoke("inspect", folder).stdout
