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
    peft_configs = {
        "llama": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "gpt2": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        "bert": lambda: peft.LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"]),
    }
    configs = {"llama": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}


def test_the_lora_reader_knows_exactly_the_fields_of_every_peft_lora_config():
    """The fields the LoRA reader refuses others against are PEFT's own: the installed LoraConfig's, which hold
    every field of the LoRA configs of the releases in plugins/peft/releases.json (0.3 on), so an older folder
    reads and a field of a later PEFT is refused (a PEFT upgrade that adds a field fails here, for review)."""
    import dataclasses

    from adapterkit.plugins.lora.peft_read import KNOWN_FIELDS
    from adapterkit.plugins.peft import releases

    common = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert set(KNOWN_FIELDS) == {f.name for f in dataclasses.fields(peft.LoraConfig)} - common
    for version, entry in releases.table().items():
        older = set(entry["configs"].get("LORA", {})) - common
        assert older <= KNOWN_FIELDS, (version, sorted(older - KNOWN_FIELDS))
