"""LoRA's torch-free side: config validation, schema parity, targets, tensors, delta."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from adapterkit.core.errors import TensorFileError, UsageError
from adapterkit.plugins.lora import LoraMethod, lora_scale
from adapterkit.plugins.lora.targeting import is_head, layer_index, matches_target, pattern_value

METHOD = LoraMethod()

BAD_CONFIGS = [
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"r": True}, "r"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": "8"}, "alpha"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": ""}, "target_modules"),
    ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ({"target_modules": "q_proj("}, "target_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern"),
    ({"layers_to_transform": []}, "layers_to_transform"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"),
    ({"init": "pissa"}, "init"),
]


@pytest.mark.parametrize(("config", "field"), BAD_CONFIGS)
def test_bad_config_names_the_field_and_the_schema_agrees(config, field):
    with pytest.raises(UsageError) as info:
        METHOD.resolve_config(config)
    assert info.value.location == f"$.method.config.{field}"
    assert info.value.hint
    if not (field == "target_modules" and config[field] == "q_proj("):  # JSON Schema cannot check regex syntax
        validator = jsonschema.Draft202012Validator(METHOD.config_schema())
        assert not validator.is_valid(config)


def test_defaults_resolve_and_match_the_schema():
    resolved = METHOD.resolve_config({})
    assert resolved == METHOD.default_config()
    assert resolved["r"] == 8 and resolved["alpha"] == 8 and resolved["target_modules"] == "all-linear"
    jsonschema.Draft202012Validator.check_schema(METHOD.config_schema())
    validator = jsonschema.Draft202012Validator(METHOD.config_schema())
    assert validator.is_valid(json.loads(json.dumps(resolved)))
    full = {"r": 4, "alpha": 16.5, "use_rslora": True, "dropout": 0.1, "target_modules": ["q_proj"],
            "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v.*": 4}, "layers_to_transform": [0], "init": "gaussian"}
    assert validator.is_valid(full)
    assert METHOD.resolve_config(full) == {**full, "target_parameters": []}
    with pytest.raises(UsageError, match="dropout cannot apply to LoRA on parameters"):
        METHOD.resolve_config({**full, "target_parameters": ["mlp.experts.down_proj"]})


def test_unknown_option_suggests_the_right_name():
    with pytest.raises(UsageError, match="unknown LoRA option 'lora_alpha'") as info:
        METHOD.resolve_config({"lora_alpha": 16})
    assert "'alpha'" in info.value.hint
    with pytest.raises(UsageError) as info:
        METHOD.resolve_config({"target_module": ["q_proj"]})
    assert "'target_modules'" in info.value.hint


def test_config_is_normalised_and_minimal_config_drops_defaults():
    resolved = METHOD.resolve_config({"r": 4, "target_modules": {"v_proj", "q_proj"}, "layers_to_transform": 1})
    assert resolved["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["layers_to_transform"] == [1]
    # integral JSON numbers are integers (as JSON Schema says): 2.0 from a file is r=2
    assert METHOD.resolve_config({"r": 2.0, "rank_pattern": {"q": 3.0}})["r"] == 2
    assert METHOD.resolve_config({"rank_pattern": {"q": 3.0}})["rank_pattern"] == {"q": 3}
    assert METHOD.minimal_config(resolved) == {"layers_to_transform": [1], "r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert METHOD.resolve_config(METHOD.minimal_config(resolved)) == resolved


def test_scale():
    assert lora_scale(4, 8) == 2.0
    assert lora_scale(4, 8, use_rslora=True) == 4.0
    assert lora_scale(16, 8, True) == 8 / math.sqrt(16)


def test_matching_rules():
    path = "model.layers.1.self_attn.q_proj"
    assert matches_target(path, ["q_proj"]) and matches_target(path, ["self_attn.q_proj"])
    assert not matches_target(path, ["proj"]) and not matches_target(path, ["attn.q_proj"])
    assert matches_target(path, r".*layers\.1\..*q_proj") and not matches_target(path, "q_proj")
    assert pattern_value(path, {"k_proj": 1, "q_proj": 2, "layers.1.self_attn.q_proj": 3}, 8) == 2  # first match wins
    assert pattern_value(path, {"proj": 1}, 8) == 8  # whole components only
    assert pattern_value(path, {r"layers\.1\..*": 5}, 8) == 5
    assert layer_index(path) == 1 and layer_index("bert.encoder.layer.0.output.dense") == 0 and layer_index("lm_head") is None
    assert is_head("lm_head") and is_head("classifier") and not is_head("bert.encoder.layer.0.output.dense")


def test_expected_tensors_and_check_target():
    linear = {"kind": "linear", "shape": [64, 32], "r": 4, "alpha": 8}
    conv1d = {"kind": "conv1d", "shape": [32, 96], "r": 2, "alpha": 8}
    assert METHOD.expected_tensors("m.up", linear, {}) == {"m.up.lora.A": (4, 32), "m.up.lora.B": (64, 4)}
    assert METHOD.expected_tensors("m.c_attn", conv1d, {}) == {"m.c_attn.lora.A": (2, 32), "m.c_attn.lora.B": (96, 2)}
    # without a recorded r, the config (patterns included) decides
    unrecorded = {"kind": "linear", "shape": [8, 8]}
    assert METHOD.expected_tensors("m.q_proj", unrecorded, {"rank_pattern": {"q_proj": 3}})["m.q_proj.lora.A"] == (3, 8)
    assert METHOD.check_target("m.up", linear, {}) == []
    problems = METHOD.check_target("m", {"kind": "embedding", "shape": [3], "r": 0, "alpha": -1}, {})
    assert len(problems) == 4


def test_delta_weight_orientation_and_scale():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(96, 2)).astype(np.float32)
    conv1d = {"kind": "conv1d", "shape": [32, 96], "r": 2, "alpha": 8}
    delta = METHOD.delta_weight("h.c_attn", conv1d, {"use_rslora": True}, {"h.c_attn.lora.A": a, "h.c_attn.lora.B": b})
    assert delta.shape == (32, 96) and delta.dtype == np.float32
    np.testing.assert_allclose(delta, (b @ a).T * (8 / math.sqrt(2)), rtol=1e-6)
    linear = {"kind": "linear", "shape": [96, 32], "r": 2, "alpha": 8}
    np.testing.assert_allclose(METHOD.delta_weight("q", linear, {}, {"A": a, "B": b}), b @ a * 4, rtol=1e-6)
    with pytest.raises(TensorFileError):
        METHOD.delta_weight("q", linear, {}, {"A": a})


def test_plugin_registers_without_importing_torch():
    code = (
        "import sys\n"
        "from adapterkit.core.plugin.registry import get_plugin_manager, Registry\n"
        "registry = Registry(*get_plugin_manager(only={'lora'}))\n"
        "method = registry.method('lora')\n"
        "method.resolve_config({'r': 4})\n"
        "method.expected_tensors('q', {'kind': 'linear', 'shape': [4, 4], 'r': 2, 'alpha': 2}, {})\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
        "from adapterkit.core.plugin.capabilities import names\n"
        "print(method.name, ','.join(names(method)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "lora LowRank,DeltaWeight,FromFactors,RuntimeComposable,Quantizable"
