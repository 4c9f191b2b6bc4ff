"""adapterkit's conformance kit, run on AdaLoRA exactly as on the built-in methods."""

from adapterkit.testing import MethodConformance

from adalora_helpers import CONFIGS


class TestAdaLora(MethodConformance):
    method = "adalora"
    configs = CONFIGS


class TestAdaLoraPatterned(MethodConformance):
    """A config with a pruned rank_pattern (one module at rank 0), a regex selection and dropout."""

    method = "adalora"
    configs = {
        "llama": {"target_modules": ["q_proj", "v_proj"], "init_r": 3, "layers_to_transform": [1],
                  "rank_pattern": {"model.layers.1.self_attn.q_proj.lora_E": [False, False, False],
                                   "model.layers.1.self_attn.v_proj.lora_E": [True, False, True]}},
        "gpt2": {"target_modules": r".*\.c_attn", "init_r": 2, "lora_alpha": 0, "lora_dropout": 0.1},
    }
