"""schema/manifest-1.json, the code and docs/format.md describe the same format."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner

from adapterkit.cli.main import cli
from adapterkit.core.format import manifest as mf
from adapterkit.core.format.adapter import DTYPE_NAMES
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.store.native import TENSOR_FILE
from adapterkit.core.plugin.registry import default_registry
from helpers import REPO, make_lora_adapter

SCHEMA_FILE = REPO / "schema" / "manifest-1.json"
FORMAT_DOC = REPO / "docs" / "format.md"


def rich_manifest() -> dict[str, Any]:
    """A manifest using every field the code can write."""
    adapter = make_lora_adapter(
        task="causal-lm",
        base_model={
            "name": "HuggingFaceTB/SmolLM2-135M", "revision": "main", "model_type": "llama",
            "architecture": "LlamaForCausalLM", "num_parameters": 134515008,
        },
        provenance={
            "created_by": "adapterkit 0.1.0",
            "created_at": "2025-06-01T12:00:00Z",
            "converted_from": {"format": "peft", "config": {"peft_type": "LORA", "r": 4}},
            "training": {"steps": 10, "loss": [2.5, 1.25], "seconds": 3.5},
            "composition": {"strategy": "svd", "rank": 4, "sources": []},
        },
        annotations={"org.example.owner": "team-a", "dev.adapterkit.test": {"nested": True}},
        config={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.05,
                "rank_pattern": {"q_proj": 4}, "layers_to_transform": [0, 1]},
    )
    adapter.manifest.method_version = "2"
    adapter.manifest.tensors = {TENSOR_FILE: {"sha256": "ab" * 32, "size": 4096}}
    return adapter.manifest.to_dict()


def undescribed(value: Any, node: dict[str, Any], path: list[Any], extra: dict[tuple, dict]) -> list[str]:
    """JSON paths of fields in ``value`` that ``node`` (a schema) does not describe.

    A free-form object (no ``properties``, no ``additionalProperties`` schema) is
    described as a whole. ``extra`` adds properties at some paths (the method's
    own schemas for its config and targets); ``*`` matches any key.
    """
    for pattern, more in extra.items():
        if len(pattern) == len(path) and all(p in ("*", q) for p, q in zip(pattern, path)):
            node = {**node, "properties": {**node.get("properties", {}), **more.get("properties", {})}}
    out: list[str] = []
    if isinstance(value, dict):
        props = node.get("properties")
        additional = node.get("additionalProperties")
        if props is None and not isinstance(additional, dict):
            return out  # free-form object, described as a whole
        for key, child in value.items():
            if props and key in props:
                out += undescribed(child, props[key], [*path, key], extra)
            elif isinstance(additional, dict):
                out += undescribed(child, additional, [*path, key], extra)
            else:
                out.append(mf.json_path([*path, key]))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, child in enumerate(value):
            out += undescribed(child, node["items"], [*path, i], extra)
    return out


def method_extra() -> dict[tuple, dict]:
    lora = default_registry().method("lora")
    return {("method", "config"): lora.config_schema(), ("targets", "*"): lora.target_schema()}


# ---- code -> schema -----------------------------------------------------------------

def test_rich_manifest_is_valid_against_the_strict_schema():
    data = rich_manifest()
    jsonschema.Draft202012Validator(mf.schema(1)).validate(data)
    checked, errors = mf.check(json.loads(json.dumps(data)))
    assert errors == [] and checked == data


def test_every_field_the_code_writes_is_described_by_the_schema():
    data = rich_manifest()
    assert undescribed(data, mf.schema(1), [], method_extra()) == []


def test_the_walker_finds_an_undescribed_field():
    data = rich_manifest()
    data["provenance"]["converted_from"]["extra"] = 1
    data["targets"]["model.layers.0.self_attn.q_proj"]["scale"] = 2.0
    found = sorted(undescribed(data, mf.schema(1), [], method_extra()))
    assert found == ["$.provenance.converted_from.extra", '$.targets["model.layers.0.self_attn.q_proj"].scale']


def test_every_schema_property_can_be_written_by_the_code():
    """The reverse direction: the rich manifest exercises every property the schema names."""
    missing = []

    def walk(node: dict[str, Any], value: Any, path: list[str]) -> None:
        for key, child in node.get("properties", {}).items():
            if not isinstance(value, dict) or key not in value:
                missing.append(mf.json_path([*path, key]))
            else:
                walk(child, value[key], [*path, key])

    walk(mf.schema(1), rich_manifest(), [])
    assert missing == []


def test_schema_constants_match_the_code():
    doc = mf.schema(1)
    assert doc["properties"]["format"]["const"] == mf.FORMAT
    assert re.fullmatch(doc["properties"]["format_version"]["pattern"], mf.FORMAT_VERSION)
    assert str(mf.CURRENT_MAJOR) == mf.FORMAT_VERSION.split(".")[0]
    assert sorted(doc["properties"]["dtype"]["enum"]) == sorted(DTYPE_NAMES)
    assert re.fullmatch(doc["properties"]["tensors"]["propertyNames"]["pattern"], TENSOR_FILE)
    assert set(doc["required"]) <= set(rich_manifest())
    assert set(doc["required"]) <= set(make_lora_adapter().manifest.to_dict())
    # the minimal manifest the code writes is valid too
    minimal = make_lora_adapter().manifest.to_dict()
    minimal["tensors"] = {TENSOR_FILE: {"sha256": "0" * 64, "size": 8}}
    assert mf.check(minimal)[1] == []


def test_schema_is_a_valid_draft_2020_12_schema():
    doc = json.loads(SCHEMA_FILE.read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema.validators.validator_for(doc) is jsonschema.Draft202012Validator


def test_method_schemas_are_valid_schemas():
    for method in default_registry().methods.values():
        jsonschema.Draft202012Validator.check_schema(method.config_schema())
        jsonschema.Draft202012Validator.check_schema(method.target_schema())


def test_shipped_package_data_is_the_repository_file():
    shipped = resources.files("adapterkit.schema").joinpath("manifest-1.json").read_text("utf-8")
    assert json.loads(shipped) == json.loads(SCHEMA_FILE.read_text("utf-8")) == mf.schema(1)


def test_cli_schema_prints_the_shipped_file():
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(SCHEMA_FILE.read_text("utf-8"))
    result = CliRunner().invoke(cli, ["schema", "--version", "1"])
    assert json.loads(result.stdout) == json.loads(SCHEMA_FILE.read_text("utf-8"))


def test_cli_schema_of_a_method_is_its_config_and_target_schema():
    result = CliRunner().invoke(cli, ["schema", "--method", "lora"])
    assert result.exit_code == 0, result.output
    lora = default_registry().method("lora")
    assert json.loads(result.stdout) == json.loads(
        json.dumps({"config": lora.config_schema(), "target": lora.target_schema()})
    )


# ---- docs/format.md -> schema -----------------------------------------------------------

FENCE = re.compile(r"^```json[ \t]*\n(.*?)^```", re.S | re.M)
IS_MANIFEST = re.compile(r'"format"\s*:\s*"adapterkit"')


def manifest_examples(doc=FORMAT_DOC) -> list[str]:
    """The fenced ```json blocks of ``doc`` that are adapterkit manifests."""
    if not doc.is_file():
        return []
    return [block for block in FENCE.findall(doc.read_text("utf-8")) if IS_MANIFEST.search(block)]


def test_example_extraction(tmp_path):
    doc = tmp_path / "format.md"
    doc.write_text(
        "# Format\n\n```json\n{\"format\": \"adapterkit\", \"format_version\": \"1.0\"}\n```\n\n"
        "```json\n{\"r\": 4}\n```\n\n```python\nx = {\"format\": \"adapterkit\"}\n```\n"
        "```json\n{\n  \"format\":  \"adapterkit\"\n}\n```\n",
        "utf-8",
    )
    examples = manifest_examples(doc)
    assert [json.loads(e)["format"] for e in examples] == ["adapterkit", "adapterkit"]
    assert manifest_examples(tmp_path / "missing.md") == []


def test_docs_format_examples_validate():
    examples = manifest_examples()
    assert examples, "docs/format.md has no manifest examples"
    registry = default_registry()
    for number, text in enumerate(examples, 1):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            pytest.fail(f"docs/format.md manifest example {number} is not valid JSON: {exc}")
        checked, errors = mf.check(data, f"docs/format.md example {number}")
        assert errors == [], [str(e) for e in errors]
        fingerprint = checked["base_model"].get("fingerprint")
        if fingerprint is not None:
            assert fingerprint == targets_fingerprint(checked["targets"]), f"example {number}: fingerprint"
        method = registry.methods.get(checked["method"]["name"])
        if method is not None:  # examples of plugin methods also follow the method's schemas
            config_errors = mf.schema_errors(checked["method"]["config"], method.config_schema(), "docs", ["method", "config"])
            assert config_errors == [], [str(e) for e in config_errors]
            for module, target in checked["targets"].items():
                target_errors = mf.schema_errors(target, method.target_schema(), "docs", ["targets", module])
                assert target_errors == [], [str(e) for e in target_errors]
