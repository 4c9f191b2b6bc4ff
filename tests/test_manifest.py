"""core/format/manifest.py: the Manifest model, version policy, migrations, schema checks."""

from __future__ import annotations

import copy

import pytest

import adapterkit
from adapterkit.core.format import manifest as mf
from adapterkit.core.errors import ManifestError, VersionError
from helpers import bits, edit_manifest, load_tensors, make_lora_adapter, read_manifest, write_adapter


def manifest_dict(**overrides) -> dict:
    data = make_lora_adapter().manifest.to_dict()
    data["tensors"] = {"adapter.safetensors": {"sha256": "0" * 64, "size": 100}}
    data.update(overrides)
    return data


# ---- the model -------------------------------------------------------------------

def test_to_dict_leaves_out_defaults_and_empty_fields():
    data = make_lora_adapter().manifest.to_dict()
    assert "version" not in data["method"]
    for key in ("task", "provenance", "annotations"):
        assert key not in data
    assert data["format"] == "adapterkit" and data["format_version"] == "1.0"


def test_to_dict_drops_none_base_model_fields_and_keeps_non_defaults():
    manifest = make_lora_adapter(base_model={"name": None, "model_type": "llama"}, task="causal-lm").manifest
    manifest.method_version = "2"
    data = manifest.to_dict()
    assert "name" not in data["base_model"] and data["base_model"]["model_type"] == "llama"
    assert data["method"]["version"] == "2"
    assert data["task"] == "causal-lm"


def test_from_dict_to_dict_round_trip():
    data = make_lora_adapter(
        task="causal-lm",
        provenance={"created_by": "test", "converted_from": {"format": "peft", "config": {"a": 1}}},
        annotations={"org.example.note": "hi"},
        base_model={"name": "tiny", "revision": "main", "model_type": "llama", "num_parameters": 10},
    ).manifest.to_dict()
    data["method"]["version"] = "3"
    assert mf.Manifest.from_dict(copy.deepcopy(data)).to_dict() == data


def test_from_dict_copies_its_input():
    data = manifest_dict()
    manifest = mf.Manifest.from_dict(data)
    manifest.targets[next(iter(manifest.targets))]["r"] = 99
    manifest.config["r"] = 99
    assert data == manifest_dict()


def test_json_path():
    assert mf.json_path([]) == "$"
    assert mf.json_path(["method", "config", "r"]) == "$.method.config.r"
    assert mf.json_path(["targets", "model.layers.0.q", "r"]) == '$.targets["model.layers.0.q"].r'
    assert mf.json_path(["a", 3, "b c"]) == '$.a[3]["b c"]'


# ---- version policy -----------------------------------------------------------

def test_current_version_is_accepted():
    data, errors = mf.check(manifest_dict())
    assert errors == []
    assert data == manifest_dict()


@pytest.mark.parametrize(
    "edit, path",
    [
        (lambda d: d.update(extra=1), "$"),
        (lambda d: d["base_model"].update(extra=1), "$.base_model"),
        (lambda d: d["method"].update(extra=1), "$.method"),
        (lambda d: d["tensors"]["adapter.safetensors"].update(extra=1), '$.tensors["adapter.safetensors"]'),
        (lambda d: d.update(provenance={"extra": 1}), "$.provenance"),
    ],
)
def test_unknown_field_in_a_known_minor_is_an_error_naming_the_path(edit, path):
    data = manifest_dict()
    edit(data)
    _, errors = mf.check(data, "adapter.json")
    assert len(errors) == 1
    assert errors[0].location == path
    assert "'extra'" in str(errors[0]) and "remove the field or check its spelling" in str(errors[0])
    assert str(errors[0]).startswith(f"adapter.json {path}: ")


def test_newer_minor_unknown_fields_are_accepted_and_dropped():
    data = manifest_dict(format_version="1.7", future_field={"x": 1})
    data["base_model"]["future_base_field"] = "y"
    data["method"]["future_method_field"] = 2
    checked, errors = mf.check(copy.deepcopy(data))
    assert errors == []
    assert "future_field" not in checked
    assert "future_base_field" not in checked["base_model"]
    assert "future_method_field" not in checked["method"]
    # everything this release knows is kept, free-form objects untouched
    assert checked["base_model"]["fingerprint"] == data["base_model"]["fingerprint"]
    assert checked["method"]["config"] == data["method"]["config"]
    assert checked["targets"] == data["targets"]


def test_newer_minor_is_still_checked_for_known_fields():
    data = manifest_dict(format_version="1.7", future_field=1)
    data["dtype"] = "float8"
    _, errors = mf.check(data)
    assert [e.location for e in errors] == ["$.dtype"]


def test_newer_minor_folder_loads_and_saves_as_current(tmp_path):
    folder = write_adapter(tmp_path)

    def newer(d):
        d["format_version"] = "1.7"
        d["future_field"] = {"anything": [1, 2]}
        d["base_model"]["future_base_field"] = "x"

    edit_manifest(folder, newer)
    assert adapterkit.validate(folder).valid
    adapter = adapterkit.load(folder)
    out = adapterkit.save(adapter, tmp_path / "resaved")
    written = read_manifest(out)
    assert written["format_version"] == "1.0"
    assert "future_field" not in written and "future_base_field" not in written["base_model"]


@pytest.mark.parametrize("version", ["2.0", "3.1", "10.0"])
def test_newer_major_is_refused_with_upgrade_hint(version):
    with pytest.raises(VersionError) as info:
        mf.check(manifest_dict(format_version=version), "adapter.json")
    err = info.value
    assert err.code == "new_major" and err.location == "$.format_version" and err.found == version
    assert "newer major" in str(err) and "upgrade adapterkit" in str(err)


def test_newer_major_folder_through_validate_and_load(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d.update(format_version="2.0", something_new=True))
    report = adapterkit.validate(folder)
    assert not report.valid and report.errors[0].code == "new_major"
    with pytest.raises(VersionError, match="upgrade adapterkit"):
        adapterkit.load(folder)


@pytest.mark.parametrize("version", ["1", "1.0.0", "v1.0", "01.0", 1.0, None, "", "1.x"])
def test_malformed_version_is_a_manifest_error(version):
    data = manifest_dict(format_version=version)
    with pytest.raises(ManifestError) as info:
        mf.check(data)
    assert not isinstance(info.value, VersionError)
    assert info.value.code == "bad_version" and info.value.location == "$.format_version"


def test_missing_version_is_a_manifest_error():
    data = manifest_dict()
    del data["format_version"]
    with pytest.raises(ManifestError, match="MAJOR.MINOR"):
        mf.check(data)


@pytest.mark.parametrize("value, location", [([1], "$"), ("text", "$"), (None, "$")])
def test_non_object_is_an_error(value, location):
    _, errors = mf.check(value)
    assert [e.location for e in errors] == [location]
    assert "JSON object" in errors[0].message


def test_other_format_is_an_error():
    _, errors = mf.check(manifest_dict(format="peft"))
    assert errors[0].location == "$.format" and "not an adapterkit manifest" in errors[0].message


# ---- migrations -----------------------------------------------------------

def _legacy_0_9(current: dict) -> dict:
    """A synthetic pre-1.0 layout: flat method fields, 'modules' for targets, 'files' for tensors."""
    return {
        "format": "adapterkit",
        "format_version": "0.9",
        "method_name": current["method"]["name"],
        "method_config": current["method"]["config"],
        "modules": current["targets"],
        "weights_dtype": current["dtype"],
        "files": current["tensors"],
        "fingerprint": current["base_model"]["fingerprint"],
    }


@pytest.fixture
def migration_0_9():
    calls = []

    @mf.register_migration("0.9")
    def upgrade_0_9(data):
        calls.append(data["format_version"])
        return {
            "format": "adapterkit",
            "format_version": "1.0",
            "method": {"name": data["method_name"], "config": data["method_config"]},
            "base_model": {"fingerprint": data["fingerprint"]},
            "targets": data["modules"],
            "dtype": data["weights_dtype"],
            "tensors": data["files"],
        }

    try:
        yield calls
    finally:
        mf.MIGRATIONS.pop("0.9", None)


def test_a_migrated_0_9_manifest_loads(tmp_path, migration_0_9):
    folder = write_adapter(tmp_path)
    original = read_manifest(folder)
    tensors = load_tensors(folder)
    edit_manifest(folder, _legacy_0_9)
    report = adapterkit.validate(folder)
    assert report.valid, [str(e) for e in report.errors]
    adapter = adapterkit.load(folder)
    assert migration_0_9 == ["0.9", "0.9"]
    assert adapter.manifest.to_dict() == original
    for key, array in tensors.items():
        assert bits(adapter.tensors[key]) == bits(array)


def test_upgrade_reports_the_steps(migration_0_9):
    legacy = _legacy_0_9(manifest_dict())
    upgraded, steps = mf.upgrade(copy.deepcopy(legacy))
    assert steps == ["0.9"]
    assert upgraded["format_version"] == "1.0" and upgraded["targets"] == legacy["modules"]


def test_migrations_chain(migration_0_9):
    @mf.register_migration("0.8")
    def upgrade_0_8(data):
        return {**data, "format_version": "0.9", "fingerprint": data.pop("base_fingerprint")}

    try:
        legacy = _legacy_0_9(manifest_dict())
        legacy["format_version"] = "0.8"
        legacy["base_fingerprint"] = legacy.pop("fingerprint")
        upgraded, steps = mf.upgrade(legacy)
        assert steps == ["0.8", "0.9"]
        assert mf.check(upgraded)[1] == []
    finally:
        mf.MIGRATIONS.pop("0.8", None)


def test_migration_does_not_mutate_its_input(migration_0_9):
    legacy = _legacy_0_9(manifest_dict())
    before = copy.deepcopy(legacy)
    mf.check(legacy)
    assert legacy == before


def test_old_version_without_migration_is_a_version_error(tmp_path):
    assert "0.5" not in mf.MIGRATIONS
    with pytest.raises(VersionError) as info:
        mf.check(manifest_dict(format_version="0.5"), "adapter.json")
    assert info.value.code == "old_version" and info.value.found == "0.5"
    assert "no migration" in str(info.value)
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d.update(format_version="0.5"))
    report = adapterkit.validate(folder)
    assert [e.code for e in report.errors] == ["old_version"]


def test_a_migration_that_does_not_advance_is_refused():
    @mf.register_migration("0.3")
    def stuck(data):
        return data

    try:
        with pytest.raises(VersionError) as info:
            mf.check(manifest_dict(format_version="0.3"))
        assert info.value.code == "bad_migration"
    finally:
        mf.MIGRATIONS.pop("0.3", None)


# ---- schema errors -----------------------------------------------------------

def test_schema_errors_name_the_json_path_and_the_problem():
    data = manifest_dict(dtype="int8")
    data["targets"]["model.layers.0.self_attn.q_proj"]["shape"] = [32, -1]
    data["tensors"]["adapter.safetensors"]["size"] = 3
    _, errors = mf.check(data, "adapter.json")
    by_location = {e.location: str(e) for e in errors}
    assert set(by_location) == {
        "$.dtype",
        '$.targets["model.layers.0.self_attn.q_proj"].shape[1]',
        '$.tensors["adapter.safetensors"].size',
    }
    assert "-1 is less than the minimum of 0" in by_location['$.targets["model.layers.0.self_attn.q_proj"].shape[1]']
    assert all(e.code == "schema" for e in errors)


def test_all_schema_errors_are_reported_not_only_the_first():
    data = manifest_dict()
    del data["targets"]
    del data["dtype"]
    _, errors = mf.check(data)
    assert len(errors) == 2
    assert all("required property" in e.message for e in errors)


def test_config_error_paths_use_the_prefix():
    errors = mf.schema_errors({"r": 0}, {"properties": {"r": {"minimum": 1}}}, "adapter.json", ["method", "config"])
    assert [e.location for e in errors] == ["$.method.config.r"]
    assert str(errors[0]) == "adapter.json $.method.config.r: 0 is less than the minimum of 1"


def test_shipped_schema_is_loaded_and_unknown_major_refused():
    assert mf.schema(1)["$id"].endswith("manifest-1.json")
    with pytest.raises(VersionError):
        mf.schema(7)


def test_created_at_must_be_a_date_time():
    """The schema declares format: date-time; the checker must enforce it (needs rfc3339-validator)."""
    good = manifest_dict(provenance={"created_at": "2025-01-02T03:04:05Z"})
    assert mf.check(good)[1] == []
    bad = manifest_dict(provenance={"created_at": "yesterday"})
    _, errors = mf.check(bad)
    assert [e.location for e in errors] == ["$.provenance.created_at"]


def test_bool_is_not_an_integer_size():
    data = manifest_dict()
    data["tensors"]["adapter.safetensors"]["size"] = True
    assert [e.location for e in mf.check(data)[1]] == ['$.tensors["adapter.safetensors"].size']

