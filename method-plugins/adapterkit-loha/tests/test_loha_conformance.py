"""adapterkit's conformance kit, run on the LoHa method exactly as on the built-in methods."""

from typing import Any

from adapterkit.testing import MethodConformance

#: adapterkit loha configs per tiny model: rank and alpha patterns, so targets carry different r / alpha
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "gpt2": {"r": 4, "alpha": 6, "target_modules": ["c_attn", "mlp.c_proj"], "rank_pattern": {"c_proj": 3}},
    "bert": {"r": 3, "alpha": 5, "target_modules": ["query", "value", "output.dense"],
             "alpha_pattern": {"value": 2}},
}


class TestLoha(MethodConformance):
    """Per-module r / alpha from rank_pattern / alpha_pattern; GPT-2's Conv1D included (PEFT has no LoHa for it)."""

    method = "loha"
    configs = CONFIGS


class TestLohaRandomInit(MethodConformance):
    """init_weights false (every factor random), a regex selection and layers_to_transform with layers_pattern."""

    method = "loha"
    configs = {
        "llama": {"r": 2, "init_weights": False, "target_modules": ["o_proj", "up_proj"], "layers_to_transform": [1],
                  "layers_pattern": "layers"},
        "gpt2": {"r": 2, "alpha": 1, "init_weights": False, "target_modules": r".*\.mlp\.c_fc"},
        "bert": {"r": 2, "init_weights": False, "target_modules": "all-linear", "exclude_modules": ["pooler.dense"]},
    }
