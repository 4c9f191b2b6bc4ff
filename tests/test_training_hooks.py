"""``adapterkit train`` runs a method's :class:`adapterkit.TrainingHooks`: the loss term, ``after_step`` and the
method's own state in checkpoints. The method is the third-party gated LoRA of tests/gated_lora.py plus a
penalty ``lam * (1 + calls) * sum(p ** 2)`` whose weight grows with the steps taken (so a resume that lost the
hook's state would train differently).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.core.errors import PluginError
from adapterkit.core.plugin.registry import Registry, get_plugin_manager
from adapterkit.core.train.run import train
from gated_lora import GatedLora
from adapterkit.testing import save_tiny_base
from train_helpers import number_rows, one_torch_thread, write_jsonl

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
SETTINGS = {"config": {"r": 4, "alpha": 8}, "lr": 1e-2, "batch_size": 7, "seed": 0, "max_grad_norm": None}


class Penalised(GatedLora, adapterkit.TrainingHooks):
    def __init__(self, lam: float) -> None:
        self.lam, self.calls = lam, 0
        self.steps: list[tuple[int, int]] = []
        self.first: dict[str, torch.Tensor] | None = None  # the parameters the first term saw
        self.grads: list[dict[str, torch.Tensor]] = []  # the gradients after_step saw
        self.history = np.zeros(0, np.float32)

    def training_loss(self, model: Any, adapter_name: str) -> torch.Tensor | None:
        params = self._params(model)
        if self.first is None:
            self.first = {k: p.detach().clone() for k, p in params.items()}
        return self.lam * (1 + self.calls) * sum((p ** 2).sum() for p in params.values())

    def after_step(self, model: Any, adapter_name: str, step: int, total_steps: int) -> None:
        self.calls += 1
        self.steps.append((step, total_steps))
        self.grads.append({k: p.grad.detach().clone() for k, p in self._params(model).items()})
        self.history = np.append(self.history, np.float32(step))

    def training_state(self, model: Any, adapter_name: str) -> dict[str, Any]:
        return {"calls": self.calls, "history": self.history}

    def load_training_state(self, model: Any, adapter_name: str, state: dict[str, Any]) -> None:
        self.calls, self.history = state["calls"], np.asarray(state["history"])


def registry_of(method: GatedLora) -> Registry:
    class Plugin:
        @adapterkit.hookimpl
        def adapterkit_register_methods(self, register: Any) -> None:
            register(method)

    return Registry(*get_plugin_manager(plugins=[("penalised", Plugin())]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hooks")
    return {"root": root, "base": save_tiny_base("llama", root / "llama", tokenizer=True),
            "data": write_jsonl(root / "numbers.jsonl", number_rows())}


def run(setup, method: GatedLora, out, **options) -> Any:
    return train(setup["base"], "gated_lora", setup["data"], out, registry=registry_of(method),
                 **{**SETTINGS, **options})


def test_the_loss_term_counts_once_per_step_and_after_step_sees_the_gradients(setup):
    """The gradient with the term minus the one without is the term's gradient 2 * lam * p, once (not once per
    micro-batch): grad_accum 3 and 1 give the same difference."""
    lam = 0.05
    plain, penalised, accumulated = Penalised(0.0), Penalised(lam), Penalised(lam)
    for method, accum in ((plain, 1), (penalised, 1), (accumulated, 3)):
        run(setup, method, None, max_steps=2, grad_accum=accum)
        assert method.steps == [(1, 2), (2, 2)]  # after every optimizer step, with the run's total
    assert plain.first is not None and penalised.first is not None
    for key, before in penalised.first.items():
        assert torch.equal(before, plain.first[key])  # the same seeded start
        expected = 2 * lam * before
        torch.testing.assert_close(penalised.grads[0][key] - plain.grads[0][key], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(accumulated.grads[0][key] - plain.grads[0][key], expected, atol=1e-6, rtol=1e-5)
    assert any(bool(before.abs().sum()) for before in penalised.first.values())  # a term that can be seen


def test_a_resumed_run_gets_the_methods_state_back(setup, tmp_path):
    straight = Penalised(0.02)
    run(setup, straight, tmp_path / "straight", max_steps=4)
    first, second = Penalised(0.02), Penalised(0.02)
    run(setup, first, tmp_path / "run", max_steps=2, checkpoint_every=2)
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "hooks.safetensors").is_file()
    run(setup, second, tmp_path / "run", max_steps=4, checkpoint_every=2, resume=True)
    assert second.steps == [(3, 4), (4, 4)] and second.calls == 4
    assert second.history.tolist() == [1.0, 2.0, 3.0, 4.0]
    reader = registry_of(GatedLora())
    a, b = adapterkit.load(tmp_path / "straight", registry=reader), adapterkit.load(tmp_path / "run", registry=reader)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    # the control: a method that forgets its state resumes into another adapter
    class Forgetful(Penalised):
        def load_training_state(self, model: Any, adapter_name: str, state: dict[str, Any]) -> None:
            pass

    run(setup, Penalised(0.02), tmp_path / "forgot", max_steps=2, checkpoint_every=2)
    run(setup, Forgetful(0.02), tmp_path / "forgot", max_steps=4, checkpoint_every=2, resume=True)
    c = adapterkit.load(tmp_path / "forgot", registry=reader)
    assert not all(np.array_equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_a_bad_hook_is_named(setup, tmp_path):
    class NotATensor(Penalised):
        def training_loss(self, model: Any, adapter_name: str) -> Any:
            return 1.5

    with pytest.raises(PluginError, match="method 'gated_lora': training_loss returned float"):
        run(setup, NotATensor(0.0), None, max_steps=1)

    class NotJson(Penalised):
        def training_state(self, model: Any, adapter_name: str) -> dict[str, Any]:
            return {"when": object()}

    with pytest.raises(PluginError, match="training_state is not JSON-ready"):
        run(setup, NotJson(0.0), tmp_path / "x", max_steps=1, checkpoint_every=1)
    assert not (tmp_path / "x" / "checkpoints" / "step-1").exists()
