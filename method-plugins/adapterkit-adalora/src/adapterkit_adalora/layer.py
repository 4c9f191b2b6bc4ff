"""The torch side of AdaLoRA: the layer (a :class:`adapterkit.WeightAdapterLayer`), its parameters, PEFT's
orthogonality penalty and PEFT's rank budget allocator (imported only when a model is touched)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterkit import WeightAdapterLayer

from .method import PARAMS


class AdaLoraLayer(WeightAdapterLayer):
    """A linear / Conv1D ``base_layer`` plus AdaLoRA adapters: ``params[name]`` holds ``A`` [r, in], ``E`` [r, 1]
    and ``B`` [out, r]; ``target[name]["r"]`` is the module's rank."""

    def _scaled(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value * scaling / (ranknum + 1e-5)`` in PEFT's order of operations (``ranknum`` a float32 tensor)."""
        config = self.config[name]
        alpha = config["lora_alpha"]
        scaling = float(alpha) if alpha > 0 else float(self.target[name]["r"])
        ranknum = torch.full((1,), float(config["init_r"]), dtype=torch.float32, device=value.device) + 1e-5
        return value * scaling / ranknum

    def delta(self, name: str) -> torch.Tensor:
        """PEFT's ``SVDLinear.get_delta_weight`` (``[out, in]``)."""
        p = self.params[name]
        return self._scaled(name, p["B"] @ (p["A"] * p["E"]))

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """PEFT's ``SVDLinear.forward`` term: ``dropout(x) @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)``."""
        p = self.params[name]
        x = self.dropouts[name](x).to(p["A"].dtype)
        return self._scaled(name, x @ (p["A"] * p["E"]).T @ p["B"].T)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        getattr(self, "allocation", {}).pop(name, None)


def new_parameters(layer: WeightAdapterLayer, config: Mapping[str, Any], r: int) -> dict[str, nn.Parameter]:
    """``A``, ``E``, ``B`` for training, as PEFT's ``AdaLoraLayer.update_layer`` / ``reset_lora_parameters``:
    with ``init_lora_weights`` E = 0 (the output is unchanged) and A, B ~ N(0, 0.02); else all N(0, 1)."""
    device = layer.base_layer.weight.device
    a = torch.randn(r, layer.in_features, device=device)
    e = torch.randn(r, 1, device=device)
    b = torch.randn(layer.out_features, r, device=device)
    if config["init_lora_weights"]:
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
    return {"A": nn.Parameter(a), "E": nn.Parameter(e), "B": nn.Parameter(b)}


# ---- the orthogonality penalty ---------------------------------------------------------------
def orthogonal_penalty(layers: Sequence[AdaLoraLayer], name: str) -> torch.Tensor:
    """PEFT's ``AdaLoraModel.forward`` regulariser (without its weight): the mean over every ``A`` and ``B`` of
    ``|| A A^T - I ||_F`` and ``|| B^T B - I ||_F``."""
    total: torch.Tensor | None = None
    count = 0
    for layer in layers:
        params = layer.params[name]
        for param, cov in (("A", lambda p: p @ p.T), ("B", lambda p: p.T @ p)):
            c = cov(params[param])
            eye = torch.eye(*c.size(), dtype=c.dtype, device=c.device)
            term = torch.norm(c - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None:
        return torch.zeros(())
    return total / count


# ---- the rank allocator -------------------------------------------------------------------------
def _state(layer: AdaLoraLayer, name: str) -> dict[str, Any]:
    if not hasattr(layer, "allocation"):
        layer.allocation = {}
    return layer.allocation.setdefault(name, {"ipt": {}, "unc": {}, "keep": None})


def _budgets(layers: Sequence[tuple[str, AdaLoraLayer]], name: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """PEFT's ``RankAllocator._set_budget_scheduler``: (initial budget = sum of ranks, target_r * modules)."""
    init = sum(int(layer.params[name]["A"].shape[0]) for _, layer in layers)
    return init, int(config["target_r"]) * len(layers)


def budget_schedule(step: int, config: Mapping[str, Any], init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``: (budget, whether to mask at this step)."""
    tinit, tfinal, total = config["tinit"], config["tfinal"], config["total_step"]
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % config["deltaT"] == 0


def _update_ipt(layers: Sequence[tuple[str, AdaLoraLayer]], name: str, config: Mapping[str, Any]) -> None:
    """PEFT's ``RankAllocator.update_ipt``: EMAs of the sensitivity ``|p * grad|`` and of its uncertainty."""
    beta1, beta2 = config["beta1"], config["beta2"]
    with torch.no_grad():
        for _, layer in layers:
            state = _state(layer, name)
            for param in PARAMS:
                p = layer.params[name][param]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs().detach()
                avg = state["ipt"].get(param, torch.zeros_like(p))
                unc = state["unc"].get(param, torch.zeros_like(p))
                avg = beta1 * avg + (1 - beta1) * ipt
                state["ipt"][param] = avg
                state["unc"][param] = beta2 * unc + (1 - beta2) * (ipt - avg).abs()


def _mask_to_budget(layers: Sequence[tuple[str, AdaLoraLayer]], name: str, init_bgt: int, budget: int) -> None:
    """PEFT's ``RankAllocator.mask_to_budget``: score each triplet (E's score plus the mean scores of its A row and
    B column), zero the singular values scoring at or below the ``init_bgt - budget``-th smallest score."""
    scores = []
    for _, layer in layers:
        state = _state(layer, name)
        params = layer.params[name]
        element = {p: state["ipt"].get(p, torch.zeros_like(params[p])) * state["unc"].get(p, torch.zeros_like(params[p]))
                   for p in PARAMS}
        a = torch.mean(element["A"], dim=1, keepdim=True)
        b = torch.mean(element["B"], dim=0, keepdim=False).view(-1, 1)
        scores.append(element["E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1))
    k = init_bgt - budget
    threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else -float("inf")
    with torch.no_grad():
        for (_, layer), score in zip(layers, scores):
            drop = (score <= threshold).view(-1, 1)
            layer.params[name]["E"].masked_fill_(drop, 0.0)
            _state(layer, name)["keep"] = (~drop).view(-1).clone()


def update_and_allocate(layers: Sequence[tuple[str, AdaLoraLayer]], name: str, config: Mapping[str, Any],
                        step: int) -> None:
    """PEFT's ``AdaLoraModel.update_and_allocate(step)`` (after the optimizer step, before the gradients are
    cleared): before ``total_step - tfinal`` update the scores and mask to the scheduled budget every ``deltaT``
    steps; at it, mask to the target budget and reset the scores; after it, keep that mask."""
    total, tfinal = config["total_step"], config["tfinal"]
    init_bgt, target_bgt = _budgets(layers, name, config)
    if step < total - tfinal:
        _update_ipt(layers, name, config)
        budget, mask = budget_schedule(step, config, init_bgt, target_bgt)
        if mask:
            _mask_to_budget(layers, name, init_bgt, budget)
    elif step == total - tfinal:
        budget, _ = budget_schedule(step, config, init_bgt, target_bgt)
        _mask_to_budget(layers, name, init_bgt, budget)
        for _, layer in layers:
            state = _state(layer, name)
            state["ipt"], state["unc"] = {}, {}
    else:
        with torch.no_grad():
            for _, layer in layers:
                keep = _state(layer, name)["keep"]
                if keep is not None:
                    layer.params[name]["E"].masked_fill_(~keep.view(-1, 1).to(layer.params[name]["E"].device), 0.0)


def rank_pattern(layers: Sequence[tuple[str, AdaLoraLayer]], name: str) -> dict[str, list[bool]] | None:
    """The allocator's current pattern in PEFT's form (``<module>.lora_E`` -> booleans), or None before any mask."""
    pattern = {}
    for path, layer in layers:
        keep = _state(layer, name)["keep"]
        if keep is None:
            return None
        pattern[f"{path}.lora_E"] = [bool(v) for v in keep.tolist()]
    return pattern


def allocator_state(layers: Sequence[tuple[str, AdaLoraLayer]], name: str) -> dict[str, Any]:
    """The allocator's EMAs (numpy arrays) and pattern, and the schedule's total_step, for an exact resume."""
    config = layers[0][1].config[name]
    state: dict[str, Any] = {"total_step": config.get("total_step"), "rank_pattern": rank_pattern(layers, name)}
    for path, layer in layers:
        held = _state(layer, name)
        for kind in ("ipt", "unc"):
            for param, value in held[kind].items():
                state[f"{kind}.{path}.{param}"] = value.detach().cpu().numpy().astype(np.float32)
    return state


def load_allocator_state(layers: Sequence[tuple[str, AdaLoraLayer]], name: str, state: Mapping[str, Any]) -> None:
    pattern = state.get("rank_pattern") or {}
    for path, layer in layers:
        held = _state(layer, name)
        device = layer.params[name]["E"].device
        held["ipt"], held["unc"] = {}, {}
        for kind in ("ipt", "unc"):
            for param in PARAMS:
                value = state.get(f"{kind}.{path}.{param}")
                if value is not None:
                    held[kind][param] = torch.as_tensor(np.asarray(value)).to(device=device, dtype=torch.float32)
        mask = pattern.get(f"{path}.lora_E")
        held["keep"] = torch.tensor(mask, dtype=torch.bool) if mask is not None else None
