"""adapterkit.selects / layer_index are PEFT's check_target_module_exists, compared with PEFT itself over the
module paths of real architectures and configs that use every field."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from peft.tuners.tuners_utils import check_target_module_exists

import adapterkit
from adapterkit.testing import TINY_MODELS

TARGETS = [["q_proj", "v_proj"], ["c_attn"], ["query", "dense"], ["self_attn.q_proj", "model.layers.1.mlp.up_proj"],
           r".*\.(q|k)_proj", r".*attn.*", ["layers.0.mlp.down_proj"], ["mlp.c_proj", "h.1.attn.c_attn"]]
LAYERS = [None, [], [0], [1], 0, [0, 1]]
PATTERNS = [None, "layers", "h", ["layer", "layers"], "la.*"]
EXCLUDES = [None, ["v_proj"], r".*\.1\..*", ["attention.output.dense"], []]


def _paths(kind: str) -> list[str]:
    return [path for path, _ in TINY_MODELS[kind](0).named_modules() if path]


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_selects_is_peft_s_rule(kind):
    paths = [*_paths(kind), "layers.0.fc", "model.layers.3", "x.layers.12.experts.4.w1"]
    checked = 0
    for targets, layers, pattern, exclude in itertools.product(TARGETS, LAYERS, PATTERNS, EXCLUDES):
        config = SimpleNamespace(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern,
                                 exclude_modules=exclude, modules_to_save=None, target_parameters=None)
        for path in paths:
            theirs = check_target_module_exists(config, path)
            theirs = bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
            ours = adapterkit.selects(path, targets, layers_to_transform=layers, layers_pattern=pattern,
                                      exclude_modules=exclude)
            assert ours == theirs, (path, targets, layers, pattern, exclude)
            checked += 1
    assert checked > 10_000


def test_layer_index():
    assert adapterkit.layer_index("model.layers.3.mlp.up_proj") == 3
    assert adapterkit.layer_index("x.layers.12.experts.4.w1") == 12  # the first index, not the expert's
    assert adapterkit.layer_index("layers.3.fc") is None  # PEFT wants a named component before the index
    assert adapterkit.layer_index("transformer.h.2.attn.c_attn", "h") == 2
    assert adapterkit.layer_index("transformer.h.2.attn.c_attn", "layers") is None
