"""core/plugin/registry.py: loading, checking and reporting plugins; a broken plugin never breaks the others."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit import hookimpl
from adapterkit.core.plugin import registry as plugins_mod
from adapterkit.core.errors import FormatError, PluginError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.registry import Registry, allowed_plugins, default_registry, get_plugin_manager
from helpers import edit_manifest, registry_with, write_adapter
from models import TorchlessMethod


# ---- a throwaway method and format -----------------------------------------------

class ToyMethod(TorchlessMethod):
    """One tensor per target, same shape as the base weight."""

    name = "toy"
    description = "toy method for tests"

    def config_schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}, "additionalProperties": False}

    def expected_tensors(self, module, target, config):
        return {f"{module}.toy.delta": tuple(target["shape"])}


class ToyFormat(Format):
    name = "toyfmt"
    description = "toy format for tests"

    def detect(self, path: Path) -> bool:
        return path.suffix == ".toy"

    def read(self, path: Path, **options: Any):
        raise FormatError("toy files cannot be read", file=str(path))


class ToyPlugin:
    @hookimpl
    def adapterkit_register_methods(self, register):
        register(ToyMethod())

    @hookimpl
    def adapterkit_register_formats(self, register):
        register(ToyFormat())


def plugin(**hooks):
    """A plugin object whose hook implementations are the given functions."""
    ns = type("ThrowawayPlugin", (), {})()
    for name, fn in hooks.items():
        setattr(ns, name, hookimpl(fn) if not name.startswith("unmarked_") else fn)
    return ns


def methods_hook(*objects):
    def adapterkit_register_methods(register):
        for obj in objects:
            register(obj)

    return adapterkit_register_methods


# ---- registration -------------------------------------------------------------------

def test_throwaway_plugin_adds_a_method_and_a_format():
    registry = registry_with(("toy", ToyPlugin()))
    assert isinstance(registry.method("toy"), ToyMethod)
    assert isinstance(registry.format("toyfmt"), ToyFormat)
    info = registry.plugins["toy"]
    assert info.ok and info.methods == ["toy"] and info.formats == ["toyfmt"]
    assert info.hooks == ["adapterkit_register_formats", "adapterkit_register_methods"]
    # the built-ins are still there
    assert "lora" in registry.methods and "adapterkit" in registry.formats


def test_a_plugin_method_gets_save_validate_and_load_for_free(tmp_path):
    import numpy as np

    from adapterkit.core.format.adapter import Adapter
    from adapterkit.core.format.base_model import targets_fingerprint
    from adapterkit.core.format.manifest import Manifest

    registry = registry_with(("toy", ToyPlugin()))
    targets = {"layer.proj": {"kind": "linear", "shape": [3, 2]}}
    adapter = Adapter(
        Manifest("toy", {"size": 1}, targets, "float32", base_model={"fingerprint": targets_fingerprint(targets)}),
        {"layer.proj.toy.delta": np.arange(6, dtype=np.float32).reshape(3, 2)},
    )
    folder = adapterkit.save(adapter, tmp_path / "toy", registry=registry)
    assert adapterkit.validate(folder, registry=registry).valid
    loaded = adapterkit.load(folder, registry=registry)
    assert loaded.method == "toy" and loaded.tensors["layer.proj.toy.delta"][2, 1] == 5
    # the method's own config schema is applied
    edit_manifest(folder, lambda d: d["method"]["config"].update(size=0))
    report = adapterkit.validate(folder, registry=registry)
    assert [e.location for e in report.errors] == ["$.method.config.size"]
    # without the plugin, the method is unknown
    report = adapterkit.validate(folder, registry=registry_with())
    assert [e.code for e in report.errors] == ["unknown_method"]


def test_a_plugin_raising_in_its_hook_is_recorded_and_others_keep_working():
    def adapterkit_register_methods(register):
        raise RuntimeError("kaput")

    registry = registry_with(("broken", plugin(adapterkit_register_methods=adapterkit_register_methods)), ("toy", ToyPlugin()))
    errors = registry.plugins["broken"].errors
    assert len(errors) == 1
    assert errors[0].startswith("adapterkit_register_methods raised RuntimeError: kaput (at ")
    assert "toy" in registry.methods and "toyfmt" in registry.formats and "lora" in registry.methods
    assert [info.name for info in registry.failures] == ["broken"]


@pytest.mark.parametrize(
    "obj, needle",
    [
        ("lora", "registered str, expected an adapterkit.Method instance"),
        (ToyFormat(), "registered ToyFormat, expected an adapterkit.Method instance"),
        (ToyMethod, "registered ABCMeta, expected an adapterkit.Method instance"),  # the class, not an instance
        (type("Nameless", (ToyMethod,), {"name": ""})(), "without a name"),
        (type("Future", (ToyMethod,), {"name": "future", "api_version": "3"})(), "targets plugin API 3"),
    ],
)
def test_a_plugin_registering_something_invalid_is_recorded(obj, needle):
    registry = registry_with(("bad", plugin(adapterkit_register_methods=methods_hook(obj, ToyMethod()))))
    info = registry.plugins["bad"]
    assert len(info.errors) == 1 and needle in info.errors[0]
    assert info.methods == ["toy"]  # the valid registration of the same plugin is kept
    assert isinstance(registry.methods["toy"], ToyMethod) and "future" not in registry.methods
    assert "" not in registry.methods and "lora" in registry.methods


def test_a_format_hook_registering_a_method_is_refused():
    def adapterkit_register_formats(register):
        register(ToyMethod())

    registry = registry_with(("bad", plugin(adapterkit_register_formats=adapterkit_register_formats)))
    assert "registered ToyMethod, expected an adapterkit.Format instance" in registry.plugins["bad"].errors[0]
    assert "toy" not in registry.formats and "toy" not in registry.methods


def test_duplicate_method_name_second_is_refused_naming_the_first():
    first, second = ToyMethod(), ToyMethod()
    registry = registry_with(
        ("first", plugin(adapterkit_register_methods=methods_hook(first))),
        ("second", plugin(adapterkit_register_methods=methods_hook(second))),
    )
    assert registry.methods["toy"] is first
    assert registry.plugins["first"].ok and registry.plugins["first"].methods == ["toy"]
    errors = registry.plugins["second"].errors
    assert errors == ["Method 'toy' is already registered by plugin 'first'; skipped"]
    assert registry.plugins["second"].methods == []


def test_a_plugin_cannot_replace_a_built_in_method():
    impostor = type("Impostor", (ToyMethod,), {"name": "lora"})()
    registry = registry_with(("impostor", plugin(adapterkit_register_methods=methods_hook(impostor))))
    assert registry.methods["lora"] is not impostor
    assert "already registered by plugin 'lora'" in registry.plugins["impostor"].errors[0]


def test_duplicate_format_name_is_refused():
    registry = registry_with(("one", ToyPlugin()), ("two", ToyPlugin()))
    assert "Format 'toyfmt' is already registered by plugin 'one'" in " ".join(registry.plugins["two"].errors)


def test_misspelled_hook_is_recorded_as_invalid():
    def adapterkit_register_method(register):  # missing "s"
        register(ToyMethod())

    typo = plugin(adapterkit_register_method=adapterkit_register_method)
    pm, infos = get_plugin_manager(plugins=[("typo", typo), ("toy", ToyPlugin())])
    registry = Registry(pm, infos)
    errors = registry.plugins["typo"].errors
    assert len(errors) == 1 and errors[0].startswith("invalid hooks:")
    assert "adapterkit_register_method" in errors[0]
    assert not pm.is_registered(typo)
    assert "toy" in registry.methods  # the others keep working


def test_hook_with_an_unknown_argument_is_recorded_as_invalid():
    def adapterkit_register_methods(register, extra):
        pass

    registry = registry_with(("bad", plugin(adapterkit_register_methods=adapterkit_register_methods)))
    assert registry.plugins["bad"].errors[0].startswith("invalid hooks:")
    assert "extra" in registry.plugins["bad"].errors[0]


def test_unmarked_hook_function_is_not_silently_ignored():
    """A hook implementation without @hookimpl is never called: report it instead of listing it as a hook."""

    def adapterkit_register_methods(register):
        register(ToyMethod())

    forgot_marker = type("ForgotMarker", (), {})()
    forgot_marker.adapterkit_register_methods = adapterkit_register_methods
    registry = registry_with(("forgot", forgot_marker))
    info = registry.plugins["forgot"]
    assert "adapterkit_register_methods" not in info.hooks
    assert info.errors and "adapterkit_register_methods" in info.errors[0]


def test_plugin_api_version_mismatch_is_recorded():
    future = ToyPlugin()
    future.ADAPTERKIT_PLUGIN_API = "9"
    pm, infos = get_plugin_manager(plugins=[("future", future)])
    registry = Registry(pm, infos)
    assert "targets plugin API 9" in registry.plugins["future"].errors[0]
    assert not pm.is_registered(future) and "toy" not in registry.methods


def test_plugin_commands_are_added_and_a_failing_one_is_recorded():
    def adapterkit_register_commands(cli):
        @cli.command("toy-hello")
        def hello():
            click.echo("hello from toy")

    def failing(cli):
        raise ValueError("no commands today")

    registry = registry_with(
        ("cmds", plugin(adapterkit_register_commands=adapterkit_register_commands)),
        ("failing", plugin(adapterkit_register_commands=failing)),
    )
    group = click.Group("adapterkit")
    registry.register_commands(group)
    assert "toy-hello" in group.commands
    assert CliRunner().invoke(group, ["toy-hello"]).stdout == "hello from toy\n"
    assert registry.plugins["failing"].errors[0].startswith("adapterkit_register_commands raised ValueError")


def test_unknown_method_and_format_errors():
    registry = default_registry()
    with pytest.raises(PluginError) as info:
        registry.method("nosuch")
    assert info.value.code == "unknown_method" and "lora" in info.value.expected
    with pytest.raises(PluginError) as info:
        registry.format("nosuch")
    assert info.value.code == "unknown_format" and "adapterkit" in info.value.expected


def test_built_in_plugins_load_cleanly_from_entry_points():
    registry = Registry(*get_plugin_manager(only=None))
    assert registry.failures == [], [(i.name, i.errors) for i in registry.failures]
    for name in ("adapterkit", "lora"):
        info = registry.plugins[name]
        assert info.distribution == "adapterkit" and info.version == adapterkit.__version__
    assert registry.plugins["adapterkit"].formats == ["adapterkit"]
    assert registry.plugins["lora"].methods == ["lora", "dora", "qlora"]
    json.dumps([info.to_dict() for info in registry.plugins.values()])


# ---- ADAPTERKIT_PLUGINS -----------------------------------------------------------

def test_only_limits_which_plugins_load():
    registry = Registry(*get_plugin_manager(only={"adapterkit"}))
    assert set(registry.plugins) == {"adapterkit"}
    assert "lora" not in registry.methods and "adapterkit" in registry.formats


def test_only_also_applies_to_throwaway_plugins():
    registry = Registry(*get_plugin_manager(plugins=[("toy", ToyPlugin())], only={"adapterkit"}))
    assert "toy" not in registry.methods and "toy" not in registry.plugins


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("", set()), ("adapterkit", {"adapterkit"}), (" adapterkit , lora ,", {"adapterkit", "lora"})],
)
def test_allowed_plugins_parsing(value, expected):
    env = {} if value is None else {plugins_mod.ENV_VAR: value}
    assert allowed_plugins(env) == expected


def test_environment_variable_limits_loading(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "adapterkit")
    registry = Registry(*get_plugin_manager())
    assert "lora" not in registry.methods and "adapterkit" in registry.formats
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "")
    registry = Registry(*get_plugin_manager())
    assert registry.methods == {} and registry.formats == {}
    monkeypatch.delenv("ADAPTERKIT_PLUGINS")
    assert "lora" in Registry(*get_plugin_manager()).methods


@pytest.fixture
def fresh_default_registry():
    """Clear the process-wide registry before and after, so the CLI sees the test's plugins."""
    default_registry.cache_clear()
    try:
        yield
    finally:
        default_registry.cache_clear()


def test_environment_variable_reaches_the_cli(tmp_path, monkeypatch, fresh_default_registry):
    from adapterkit.cli.main import cli

    folder = write_adapter(tmp_path)
    monkeypatch.setenv("ADAPTERKIT_PLUGINS", "adapterkit")
    default_registry.cache_clear()
    result = CliRunner().invoke(cli, ["validate", str(folder)])
    assert result.exit_code == 1
    assert "unknown method 'lora'" in result.stdout


# ---- third-party distributions ------------------------------------------------------

def fake_distribution(root: Path, dist: str, module: str, source: str, entry: str | None = None) -> None:
    """An installed distribution in ``root``: a .dist-info with an adapterkit entry point, plus its module."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[adapterkit]\n{entry or dist} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


BROKEN_SOURCE = 'raise RuntimeError("fakeplug is broken")\n'

GOOD_SOURCE = """
    import click
    import adapterkit
    from adapterkit.core.plugin.formats import Format


    class GoodFormat(Format):
        name = "goodfmt"
        description = "a third-party format"

        def detect(self, path):
            return False

        def read(self, path, **options):
            raise NotImplementedError


    @adapterkit.hookimpl
    def adapterkit_register_formats(register):
        register(GoodFormat())


    @adapterkit.hookimpl
    def adapterkit_register_commands(cli):
        @cli.command("good-hello")
        def hello():
            click.echo("hello from goodplug")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path holding fake installed distributions."""
    root = tmp_path / "site"
    root.mkdir()
    fake_distribution(root, "fakeplug", "fakeplug_broken_mod", BROKEN_SOURCE)
    fake_distribution(root, "goodplug", "goodplug_mod", GOOD_SOURCE)
    monkeypatch.syspath_prepend(str(root))
    try:
        yield root
    finally:
        for name in ("fakeplug_broken_mod", "goodplug_mod"):
            sys.modules.pop(name, None)


def test_a_distribution_that_fails_to_import_is_reported_and_skipped(site):
    registry = Registry(*get_plugin_manager())
    info = registry.plugins["fakeplug"]
    assert info.distribution == "fakeplug" and info.version == "0.1" and info.module == "fakeplug_broken_mod"
    assert len(info.errors) == 1
    assert info.errors[0].startswith("failed to import: RuntimeError: fakeplug is broken")
    assert "fakeplug_broken_mod.py" in info.errors[0]
    # built-ins and other third parties still work
    assert "lora" in registry.methods and "adapterkit" in registry.formats
    assert "goodfmt" in registry.formats and registry.plugins["goodplug"].distribution == "goodplug"
    assert [i.name for i in registry.failures] == ["fakeplug"]


def test_built_ins_are_listed_before_third_parties(site):
    names = list(Registry(*get_plugin_manager()).plugins)
    assert names.index("adapterkit") < names.index("fakeplug")
    assert names.index("lora") < names.index("goodplug")


def test_cli_plugins_json_shows_the_failure(site, fresh_default_registry):
    from adapterkit.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 1, result.output  # a failed plugin: exit 1
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert entries["fakeplug"]["distribution"] == "fakeplug"
    assert "fakeplug is broken" in entries["fakeplug"]["errors"][0]
    assert entries["lora"]["methods"] == ["lora", "dora", "qlora"] and entries["lora"]["errors"] == []
    assert entries["goodplug"]["formats"] == ["goodfmt"]

    text = CliRunner().invoke(cli, ["plugins"])
    assert text.exit_code == 1
    assert "fakeplug  [FAILED]  fakeplug 0.1" in text.stdout
    assert "error:   failed to import: RuntimeError: fakeplug is broken" in text.stdout


def test_third_party_command_reaches_the_cli(site, fresh_default_registry):
    from adapterkit.cli.main import LazyGroup

    group = LazyGroup("adapterkit")  # a fresh group: plugin commands are added once per group
    result = CliRunner().invoke(group, ["good-hello"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello from goodplug\n"
    assert "good-hello" in CliRunner().invoke(group, ["--help"]).stdout


def test_a_third_party_entry_point_cannot_shadow_a_built_in(tmp_path, monkeypatch):
    """A distribution declaring an entry point named like a built-in ("lora") must not silently replace it."""
    root = tmp_path / "shadow_site"
    root.mkdir()
    fake_distribution(root, "shadow", "shadow_lora_mod", "X = 1\n", entry="lora")
    monkeypatch.syspath_prepend(str(root))  # first on sys.path: found before adapterkit's own entry point
    try:
        registry = Registry(*get_plugin_manager())
    finally:
        sys.modules.pop("shadow_lora_mod", None)
    assert registry.plugins["lora"].distribution == "adapterkit"
    assert "lora" in registry.methods
    # the clash is reported, not silently dropped
    reported = [e for info in registry.plugins.values() for e in info.errors if "shadow" in e]
    assert reported or any(info.distribution == "shadow" and info.errors for info in registry.plugins.values())


# ---- plugin API versions and hook coverage -------------------------------------------

def test_a_format_targeting_another_plugin_api_is_refused_with_a_clear_message():
    future_format = type("FutureFormat", (ToyFormat,), {"name": "futurefmt", "api_version": "3"})()

    def adapterkit_register_formats(register):
        register(future_format)
        register(ToyFormat())

    registry = registry_with(("future_fmt", plugin(adapterkit_register_formats=adapterkit_register_formats)))
    errors = registry.plugins["future_fmt"].errors
    assert errors == ["Format 'futurefmt' targets plugin API 3, this adapterkit provides 2; upgrade the plugin or adapterkit"]
    assert "futurefmt" not in registry.formats and "toyfmt" in registry.formats


def test_a_module_targeting_another_plugin_api_is_shown_by_the_cli(tmp_path, monkeypatch, fresh_default_registry):
    fake_distribution(tmp_path, "oldplug", "oldplug_mod", 'ADAPTERKIT_PLUGIN_API = "0"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    from adapterkit.cli.main import cli

    try:
        result = CliRunner().invoke(cli, ["plugins"])
    finally:
        sys.modules.pop("oldplug_mod", None)
    assert result.exit_code == 1
    assert "oldplug  [FAILED]  oldplug 0.1" in result.stdout
    assert "targets plugin API 0, this adapterkit provides 2; upgrade the plugin or adapterkit" in result.stdout


def test_every_hook_has_a_test():
    """datasette's rule: each hook spec is exercised by at least one test of this module."""
    import inspect as inspect_mod

    from adapterkit.core.plugin import hookspecs

    marker = f"{hookspecs.PROJECT}_spec"
    specs = [name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)]
    assert specs
    source = inspect_mod.getsource(sys.modules[__name__])
    tests = [chunk for chunk in source.split("\ndef test_")[1:]]
    untested = [name for name in specs if not any(name in chunk for chunk in tests)]
    assert not untested, f"hooks without a test in tests/test_plugins.py: {untested}"


# ---- codecs (one method's layout inside a multi-method format) and the API 1 contract ----------

class ToyCodec(adapterkit.Codec):
    format, key, methods, description = "toyfmt", "TOY", ("toy",), "toy layout"

    def read(self, context):
        raise NotImplementedError

    def write(self, adapter, context):
        return {}, {}


def test_codecs_register_and_are_found_by_format_key_and_method():
    broken = type("NoKey", (ToyCodec,), {"key": ""})()
    again = type("Again", (ToyCodec,), {})()

    def adapterkit_register_codecs(register):
        register(ToyCodec())
        register(broken)
        register(again)
        register(ToyFormat())  # not a codec

    registry = registry_with(("codecs", plugin(adapterkit_register_codecs=adapterkit_register_codecs)))
    codec = registry.codec("toyfmt", "TOY")
    assert isinstance(codec, ToyCodec) and codec.name == "toyfmt:TOY"
    assert registry.codec_for("toyfmt", "toy") is codec and registry.codec_for("toyfmt", "lora") is None
    assert registry.codecs_of("toyfmt") == {"TOY": codec}
    info = registry.plugins["codecs"]
    assert info.codecs == ["toyfmt:TOY"]
    assert info.errors == ["codec NoKey must set format, key and methods",
                           "Codec 'toyfmt:TOY' is already registered by plugin 'codecs'; skipped",
                           "registered ToyFormat, expected an adapterkit.Codec instance"]


def test_a_method_written_for_plugin_api_1_is_refused_with_what_to_change():
    import numpy as np

    class OldStyle(ToyMethod):  # API 1: a mergeable flag and a delta_weight hook, no capability
        name = "oldstyle"
        mergeable = True

        def delta_weight(self, module, target, config, tensors):
            return np.zeros(target["shape"], np.float32)

    class Hooked(ToyMethod):  # API 1 hook without its capability
        name = "hooked"

        def merged_weight(self, module, target, config, tensors, weight):
            return weight

    class Upgraded(ToyMethod, adapterkit.DeltaWeight):
        name = "upgraded"

        def delta_weight(self, module, target, config, tensors):
            return np.zeros(target["shape"], np.float32)

    registry = registry_with(("old", plugin(adapterkit_register_methods=methods_hook(OldStyle(), Hooked(), Upgraded()))))
    errors = registry.plugins["old"].errors
    assert errors[0].startswith("method 'oldstyle' is written for plugin API 1 (drop mergeable: merging follows from "
                                "DeltaWeight, MergedWeight or LowRank); upgrade the plugin: subclass the capabilities")
    assert errors[1].startswith("method 'hooked' is written for plugin API 1 (merged_weight is defined but the class "
                                "does not subclass adapterkit.MergedWeight)")
    assert "docs/plugins.md, 'From plugin API 1 to 2'" in errors[1]
    assert "upgraded" in registry.methods and not {"oldstyle", "hooked"} & set(registry.methods)
