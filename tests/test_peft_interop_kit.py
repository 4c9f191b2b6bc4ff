"""adapterkit.testing.PeftInterop, the kit method plugins run against PEFT, run on the built-in LoRA codec
(what it checks must hold for the method the kit was modelled on)."""

from __future__ import annotations

import peft
import pytest
import torch

from adapterkit.testing import PeftInterop


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestLoraPeftInterop(PeftInterop):
    method = "lora"
    # the LoRA reader reads the configs of PEFT 0.6 to 0.21 (their fields differ) and checks the fields it uses
    refuses_unknown_fields = False
    peft_configs = {
        "llama": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "gpt2": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        "bert": lambda: peft.LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"]),
    }
    configs = {"llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
