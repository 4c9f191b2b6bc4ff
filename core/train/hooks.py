"""The trained method's own part in the loop: :class:`adapterkit.TrainingHooks`, bound to the model and adapter.

A method with the capability adds a term to the loss of every optimizer step, acts after each step (before the
gradients are cleared) and keeps its own state in checkpoints. The term counts once per optimizer step whatever
``grad_accum`` and the number of processes: every rank runs one extra backward of ``term / world`` after its
micro-batches, and summing the gradients over the ranks gives the term's gradient once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapterkit.core.errors import PluginError
from adapterkit.core.plugin.capabilities import TrainingHooks


@dataclass(frozen=True)
class MethodHooks:
    method: TrainingHooks
    model: torch.nn.Module
    adapter_name: str

    @classmethod
    def of(cls, method: Any, model: torch.nn.Module, adapter_name: str) -> MethodHooks | None:
        """The binding when ``method`` has the capability, else None (nothing to call)."""
        return cls(method, model, adapter_name) if isinstance(method, TrainingHooks) else None

    @property
    def _who(self) -> str:
        return f"method {getattr(self.method, 'name', type(self.method).__name__)!r}"

    def backward_term(self, world: int) -> torch.Tensor | None:
        """Backward of the method's loss term / ``world``; the detached value added (None: no term this step)."""
        term = self.method.training_loss(self.model, self.adapter_name)
        if term is None:
            return None
        if not isinstance(term, torch.Tensor) or term.numel() != 1:
            raise PluginError(f"{self._who}: training_loss returned {type(term).__name__}"
                              f"{list(term.shape) if isinstance(term, torch.Tensor) else ''}",
                              expected="a one-element tensor (or None)", code="bad_training_loss")
        if term.requires_grad:
            (term.reshape(()) / world).backward()
        return term.detach().float().reshape(1) / world

    def after_step(self, step: int, total: int) -> None:
        self.method.after_step(self.model, self.adapter_name, step, total)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The method's checkpoint state split into (JSON-ready values, arrays by name)."""
        state = self.method.training_state(self.model, self.adapter_name)
        if not isinstance(state, Mapping):
            raise PluginError(f"{self._who}: training_state returned {type(state).__name__}",
                              expected="a dict of JSON-ready values and numpy arrays", code="bad_training_state")
        plain: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if isinstance(value, np.ndarray):
                arrays[str(key)] = np.ascontiguousarray(value)
            else:
                plain[str(key)] = value
        try:
            json.dumps(plain, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"{self._who}: training_state is not JSON-ready ({exc})",
                              expected="JSON values (finite numbers, strings, lists, dicts) and numpy arrays",
                              code="bad_training_state") from None
        return plain, arrays

    def load_state(self, plain: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.method.load_training_state(self.model, self.adapter_name, {**plain, **arrays})
