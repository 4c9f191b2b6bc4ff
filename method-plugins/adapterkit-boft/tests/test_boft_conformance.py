"""The conformance kit on tiny Llama, GPT-2 (Conv1D) and BERT, with 1 and 2 butterfly factors and both block modes."""

from __future__ import annotations

import pytest
import torch

from adapterkit.testing import MethodConformance

from boft_helpers import CONFIGS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestBoft(MethodConformance):
    method = "boft"
    configs = CONFIGS
