"""Config and target checks of the boft method (torch-free), the package's import rules, and the codec's refusals."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit_boft.method import BoftMethod, block_problem, resolve_blocks
from adapterkit_boft.peft_codec import BoftPeftCodec

PACKAGE = Path(__file__).resolve().parent.parent
ALLOWED = {"adapterkit", "adapterkit_boft", "numpy", "ml_dtypes", "torch", "transformers", "peft", "pytest",
           "boft_helpers", "tokenizers", "safetensors"}


def test_the_package_uses_the_public_api_only():
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED or top in sys.stdlib_module_names, f"{file.name} imports {name}"
                if top == "adapterkit":
                    assert name in ("adapterkit", "adapterkit.testing"), f"{file.name} imports {name}"
                    assert name == "adapterkit" or file.parent.name == "tests", f"{file.name} imports {name}"


@pytest.mark.parametrize("config,field", [
    ({"target_modules": ["q"], "boft_block_size": 4, "boft_block_num": 8}, "boft_block_size"),
    ({"target_modules": ["q"], "boft_block_size": 0}, "boft_block_size"),
    ({"target_modules": ["q"], "boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
    ({"target_modules": ["q"], "boft_dropout": 1.0}, "boft_dropout"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": ["q"], "bias": "all"}, "bias"),
    ({"target_modules": ["q"], "layers_to_transform": [-1]}, "layers_to_transform"),
])
def test_bad_configs_name_their_field(config, field):
    with pytest.raises(adapterkit.UsageError) as info:
        BoftMethod().resolve_config(config)
    assert info.value.location == f"$.method.config.{field}"


def test_block_rules_are_peft_s():
    assert resolve_blocks(32, 4, 0, 1) == (4, 8)
    assert resolve_blocks(64, 0, 8, 2) == (8, 8)
    assert resolve_blocks(32, 4, 0, 4) == (4, 8)  # 8 blocks: 2**3 divides, log2(8) = 3
    for args in ((32, 4, 0, 5), (32, 3, 0, 1), (32, 0, 6, 1), (48, 3, 0, 2)):
        with pytest.raises(ValueError):
            resolve_blocks(*args)
    assert block_problem(32, 4, 8, 2) is None and block_problem(32, 4, 4, 1) is not None
    method = BoftMethod()
    config = method.resolve_config({"target_modules": ["q"], "boft_block_num": 8})
    assert config["boft_block_size"] == 0  # a number of blocks alone: the size follows
    with pytest.raises(adapterkit.UsageError, match="layers.0.q") as info:
        method.target_fields("layers.0.q", "linear", [16, 36], {**config, "boft_block_num": 0, "boft_block_size": 8})
    assert info.value.location == "$.method.config.boft_block_size"
    assert method.target_fields("c", "conv1d", [32, 96], config) == {"block_size": 4, "block_num": 8,
                                                                     "n_butterfly_factor": 1}


def test_merged_weight_is_the_identity_at_init_and_checks_shapes():
    method = BoftMethod()
    target = {"kind": "linear", "shape": [6, 8], "block_size": 2, "block_num": 4, "n_butterfly_factor": 3}
    weight = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    tensors = {"R": np.zeros((3, 4, 2, 2), np.float32), "s": np.ones((6, 1), np.float32)}
    assert np.array_equal(method.merged_weight("m", target, {}, tensors, weight), weight)
    with pytest.raises(adapterkit.AdapterkitError):
        method.merged_weight("m", target, {}, tensors, weight.T)
    # an orthogonal rotation keeps each row's norm; s scales it
    tensors = {"R": np.random.default_rng(1).standard_normal((3, 4, 2, 2)), "s": np.full((6, 1), 2.0)}
    merged = method.merged_weight("m", target, {}, tensors, weight.astype(np.float64))
    assert np.allclose(np.linalg.norm(merged, axis=1), 2 * np.linalg.norm(weight, axis=1))


def test_the_codec_refuses_what_peft_cannot_hold():
    codec = BoftPeftCodec()

    def adapter(targets):
        tensors = {}
        for module, t in targets.items():
            out = t["shape"][0] if t["kind"] == "linear" else t["shape"][1]
            tensors[f"{module}.boft.R"] = np.zeros((t["n_butterfly_factor"], t["block_num"], t["block_size"],
                                                    t["block_size"]), np.float32)
            tensors[f"{module}.boft.s"] = np.ones((out, 1), np.float32)
        manifest = adapterkit.Manifest(method="boft", config={"target_modules": ["a", "b"]}, targets=targets,
                                       dtype="float32")
        return adapterkit.Adapter(manifest, tensors)

    a = {"kind": "linear", "shape": [8, 32], "block_size": 4, "block_num": 8, "n_butterfly_factor": 1}
    assert codec.refusal(adapter({"x.a": a, "x.b": {**a, "shape": [8, 64], "block_num": 16}})) is None  # one size
    assert codec.refusal(adapter({"x.a": a, "x.b": {**a, "shape": [8, 64], "block_size": 8}})) is None  # one number
    assert "neither" in codec.refusal(adapter({"x.a": a, "x.b": {**a, "shape": [8, 48], "block_size": 8,
                                                                   "block_num": 6}}))
    assert "butterfly" in codec.refusal(adapter({"x.a": a, "x.b": {**a, "n_butterfly_factor": 2}}))
    assert "Conv1D" in codec.refusal(adapter({"x.a": {**a, "kind": "conv1d", "shape": [32, 8]}}))
