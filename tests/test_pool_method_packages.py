"""The adapter pool serves the low-rank method packages (VeRA, AdaLoRA) beside LoRA in one mixed batch,
each row with its own adapter's logits: the pool asks for the LowRank capability, never for a method name."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, sample_inputs

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained(method: str, config: dict, seed: int) -> adapterkit.Adapter:
    registry = adapterkit.default_registry()
    if method not in registry.methods:
        pytest.fail(f"the {method} plugin package is not installed (make install installs method-plugins/*)")
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, method, {**config, "target_modules": TARGETS})
    perturb(handle.parameters(), seed=seed, scale=0.3)  # stand-in for training (PEFT zero-initialises parts)
    return handle.to_adapter()


def alone(adapter: adapterkit.Adapter | None, inputs: dict) -> torch.Tensor:
    model = TINY_MODELS["llama"](0)
    if adapter is not None:
        adapterkit.apply(adapter, model)
    return outputs(model, inputs)


def test_vera_and_adalora_in_one_mixed_batch():
    adapters = {"vera": trained("vera", {"r": 4}, seed=1), "adalora": trained("adalora", {"init_r": 4, "target_r": 2,
                                                                                          "total_step": 10}, seed=2),
                "lora": trained("lora", {"r": 2, "alpha": 4}, seed=3)}
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0), max_adapters=3, max_rank=8, target_modules=TARGETS)
    for name, adapter in adapters.items():
        pool.load(name, adapter)
    rows = ["vera", None, "adalora", "lora", "adalora", "vera"]
    inputs = sample_inputs(batch=len(rows))
    with torch.no_grad():
        mixed = pool(**inputs, adapter_names=rows).logits
    for row, name in enumerate(rows):
        expected = alone(adapters[name] if name else None, inputs)[row]
        diff = (mixed[row] - expected).abs().max().item()
        assert diff <= 1e-5, f"row {row} ({name}): max abs diff {diff:.3g} from the adapter alone"
