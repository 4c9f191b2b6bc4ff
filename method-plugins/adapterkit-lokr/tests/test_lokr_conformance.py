"""adapterkit's conformance kit on the LoKr method (tiny llama, gpt2 with Conv1D, bert)."""

import pytest
import torch

from adapterkit.testing import MethodConformance

from lokr_helpers import CONFIGS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestLokr(MethodConformance):
    method = "lokr"
    configs = CONFIGS


class TestLokrOtherLayouts(MethodConformance):
    """init_weights lycoris / false, low-rank W2 everywhere, layers_to_transform, exclude_modules."""

    method = "lokr"
    configs = {
        "llama": {"target_modules": "all-linear", "r": 1, "init_weights": "lycoris", "layers_to_transform": [1],
                  "exclude_modules": ["o_proj"]},
        "gpt2": {"target_modules": ["c_proj"], "r": 1, "decompose_both": True, "init_weights": False},
    }
