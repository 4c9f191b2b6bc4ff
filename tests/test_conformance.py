"""The conformance matrix: every built-in method x {tiny llama, gpt2, bert} through the same tests."""

from adapterkit.testing import MethodConformance


class TestLora(MethodConformance):
    method = "lora"
    configs = {
        "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "gpt2": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]},
        "bert": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
    }


class TestRsLora(MethodConformance):
    method = "lora"
    configs = {"llama": {"r": 8, "alpha": 4, "use_rslora": True, "rank_pattern": {"v_proj": 2}}}
