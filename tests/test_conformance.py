"""The conformance matrix: every built-in method x {tiny llama, gpt2, bert} through the same tests."""

from adapterkit.testing import TINY_MODELS, MethodConformance


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


class TestDora(MethodConformance):
    method = "dora"
    configs = {
        "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "gpt2": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]},
        "bert": {"r": 4, "alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    }


def _quantized(build, config):
    """A factory of tiny models whose base is already 4-bit, quantised as ``config`` says.

    QLoRA's base *is* the quantised model: disabling the adapter gives its output, not the
    float model's, so the kit compares against these (apply to a float base: tests/test_qlora.py).
    """
    from adapterkit.plugins.lora.qlora import quantize_base

    def factory(seed: int = 0):
        model = build(seed)
        quantize_base(model, config)
        return model

    return factory


_QLORA = {
    "llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "gpt2": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"], "quant_type": "fp4", "double_quant": False},
    "bert": {"r": 4, "alpha": 8, "target_modules": "all-linear", "quantize": "targets", "blocksize": 32},
}


class TestQlora(MethodConformance):
    method = "qlora"
    configs = _QLORA
    models = {kind: _quantized(TINY_MODELS[kind], config) for kind, config in _QLORA.items()}
