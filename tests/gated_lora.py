"""A throwaway third-party low-rank method, written against the public ``adapterkit`` API only.

"Gated LoRA": ``delta W = (alpha / r) * B @ diag(g) @ A`` with a learned gate ``g`` per rank.
It subclasses :class:`adapterkit.LowRank` and nothing else of LoRA's, so every command that
low-rank factors allow must work for it: the adapter pool, merge, compose, swappable ONNX,
``validate --target``. tests/test_capabilities.py checks that they do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import adapterkit

NAME = "gated_lora"


class GatedLora(adapterkit.Method, adapterkit.LowRank):
    name = NAME
    description = "test: LoRA with a learned gate per rank (B diag(g) A)"

    # ---- torch-free ---------------------------------------------------------
    def config_schema(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {"r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number", "exclusiveMinimum": 0},
                               "target_modules": {"type": "array", "items": {"type": "string"}}}}

    def default_config(self) -> dict[str, Any]:
        return {"r": 4, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}

    def expected_tensors(self, module: str, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        r = self.resolve_config(config)["r"]
        fan_in, fan_out = adapterkit.in_out_features(target["kind"], target["shape"])
        return {f"{module}.{NAME}.A": (r, fan_in), f"{module}.{NAME}.B": (fan_out, r), f"{module}.{NAME}.g": (r,)}

    def lora_factors(self, module: str, target: Any, config: Any, tensors: Any) -> adapterkit.Factors:
        config = self.resolve_config(config)
        a = np.asarray(tensors["A"], np.float32) * np.asarray(tensors["g"], np.float32)[:, None]
        return adapterkit.Factors(a, np.asarray(tensors["B"], np.float32), config["alpha"] / config["r"])

    # ---- torch --------------------------------------------------------------
    def inject(self, model: Any, config: Any, adapter_name: str = "default", targets: Any = None) -> dict[str, Any]:
        config = self.resolve_config(config)
        if targets is None:
            found = adapterkit.select_modules(model, config["target_modules"], method=NAME)
            targets = {path: {"kind": adapterkit.module_kind(m), "shape": list(m.weight.shape)}
                       for path, m in found.items()}
        for param in model.parameters():
            param.requires_grad_(False)
        r, scale = config["r"], config["alpha"] / config["r"]
        for path, target in targets.items():
            base = model.get_submodule(path)
            fan_in, fan_out = adapterkit.in_out_features(target["kind"], target["shape"])
            wrapper = GatedLinear(base, r, fan_in, fan_out, scale)
            torch.nn.init.normal_(wrapper.A, std=0.02)
            adapterkit.replace_module(model, path, wrapper)
        return {path: dict(target) for path, target in targets.items()}

    def _params(self, model: Any) -> dict[str, Any]:
        return {f"{path}.{NAME}.{p}": getattr(m, p) for path, m in model.named_modules() if isinstance(m, GatedLinear)
                for p in ("A", "B", "g")}

    def load_state(self, model: Any, tensors: Any, adapter_name: str = "default") -> None:
        with torch.no_grad():
            for key, param in self._params(model).items():
                param.copy_(tensors[key])

    def extract_state(self, model: Any, adapter_name: str = "default") -> dict[str, Any]:
        return {key: param.detach().clone() for key, param in self._params(model).items()}

    def trainable_parameters(self, model: Any, adapter_name: str = "default") -> list[Any]:
        return list(self._params(model).values())


class GatedLinear(torch.nn.Module):
    """The base module plus ``scale * B diag(g) A x``; the original stays as ``base_layer``."""

    def __init__(self, base: torch.nn.Module, r: int, fan_in: int, fan_out: int, scale: float) -> None:
        super().__init__()
        self.base_layer, self.scale = base, scale
        self.A = torch.nn.Parameter(torch.zeros(r, fan_in))
        self.B = torch.nn.Parameter(torch.zeros(fan_out, r))
        self.g = torch.nn.Parameter(torch.ones(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * ((x @ self.A.T) * self.g) @ self.B.T


class Plugin:
    @adapterkit.hookimpl
    def adapterkit_register_methods(self, register: Any) -> None:
        register(GatedLora())
