"""adapterkit's conformance kit and PEFT interop kit, run on VeRA exactly as on the built-in methods."""

from __future__ import annotations

import peft
import pytest
import torch

from adapterkit.testing import MethodConformance, PeftInterop

from vera_helpers import CONFIGS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestVera(MethodConformance):
    method = "vera"
    configs = CONFIGS


class TestVeraDropoutAndLayers(MethodConformance):
    """Dropout on the adapter's input (training only), a regex target, one layer of two."""

    method = "vera"
    configs = {"llama": {"r": 4, "target_modules": ["k_proj", "up_proj"], "layers_to_transform": [1],
                         "layers_pattern": "layers", "vera_dropout": 0.1},
               "gpt2": {"r": 4, "target_modules": r"transformer\.h\.0\.(attn\.c_proj|mlp\.c_proj)"}}


class TestVeraPeft(PeftInterop):
    method = "vera"
    peft_configs = {
        "llama": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "gpt2": lambda: peft.VeraConfig(r=6, target_modules=["c_attn", "c_fc"], projection_prng_key=5,
                                        fan_in_fan_out=True),
        "bert": lambda: peft.VeraConfig(r=4, target_modules=["query", "value", "intermediate.dense"],
                                        d_initial=0.3, layers_to_transform=[0]),
    }
    configs = CONFIGS
