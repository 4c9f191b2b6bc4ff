"""adapterkit's conformance kit, run on the (IA)^3 method exactly as on the built-in methods."""

from adapterkit.testing import MethodConformance

from ia3_helpers import CONFIGS


class TestIa3(MethodConformance):
    method = "ia3"
    configs = CONFIGS


class TestIa3OutputOnly(MethodConformance):
    """No feed-forward target: every vector scales an output (a bias too, on GPT-2 and BERT)."""

    method = "ia3"
    configs = {"gpt2": {"target_modules": ["c_attn", "c_fc"]}, "bert": {"target_modules": r".*attention\.self\.(query|value)"}}
