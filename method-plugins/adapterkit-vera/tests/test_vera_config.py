"""The vera method's config checks (UsageError at $.method.config.<field>), its schema, and a torch-free import."""

from __future__ import annotations


import pytest

import adapterkit

METHOD = adapterkit.default_registry().method("vera")


def test_defaults_are_peft_defaults():
    import peft

    config = METHOD.resolve_config({})
    theirs = peft.VeraConfig()
    for field in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights",
                  "layers_to_transform", "layers_pattern"):
        assert config[field] == getattr(theirs, field), field
    assert config["target_modules"] == "all-linear"
    assert METHOD.resolve_config({"layers_to_transform": 1})["layers_to_transform"] == [1]


@pytest.mark.parametrize("config,field", [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "(unclosed"}, "target_modules"),
    ({"projection_prng_key": "0"}, "projection_prng_key"), ({"projection_prng_key": 2 ** 64}, "projection_prng_key"),
    ({"save_projection": 1}, "save_projection"), ({"init_weights": "true"}, "init_weights"),
    ({"vera_dropout": 1.0}, "vera_dropout"), ({"vera_dropout": -0.1}, "vera_dropout"),
    ({"d_initial": float("nan")}, "d_initial"), ({"layers_to_transform": [-1]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"dropout": 0.1}, "dropout"), ({"alpha": 8}, "alpha"),
])
def test_bad_values_name_the_field(config, field):
    with pytest.raises(adapterkit.UsageError) as caught:
        METHOD.resolve_config(config)
    assert caught.value.location == f"$.method.config.{field}", str(caught.value)


def test_schema_and_shapes():
    schema = METHOD.config_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(METHOD.default_config())
    targets = {"a": {"kind": "linear", "shape": [16, 32]}, "b": {"kind": "conv1d", "shape": [64, 96]}}
    assert METHOD.shared_tensors(targets, {"r": 4}) == {"vera.A": (4, 64), "vera.B": (96, 4)}
    assert METHOD.expected_tensors("b", targets["b"], {"r": 4}) == {"b.vera.lambda_d": (4,), "b.vera.lambda_b": (96,)}
    assert METHOD.check_target("x", {"kind": "embedding", "shape": [3]}, {})


