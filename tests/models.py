"""Tiny seeded models for the tests: the builders live in adapterkit.testing."""

from __future__ import annotations

from pathlib import Path

from adapterkit.core.plugin.method import Method
from adapterkit.testing import TINY_MODELS as BUILDERS
from adapterkit.testing import sample_inputs, tiny_bert, tiny_gpt2, tiny_llama

__all__ = ["BUILDERS", "TorchlessMethod", "sample_inputs", "save_tiny", "tiny_bert", "tiny_gpt2", "tiny_llama"]


def save_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model as a local HF folder (config.json + model.safetensors)."""
    BUILDERS[kind](seed).save_pretrained(folder)
    return folder


class TorchlessMethod(Method):
    """Base of throwaway test methods that never touch a model: the torch hooks refuse."""

    def inject(self, model, config, adapter_name="default", targets=None):
        raise NotImplementedError

    def load_state(self, model, tensors, adapter_name="default"):
        raise NotImplementedError

    def extract_state(self, model, adapter_name="default"):
        raise NotImplementedError

    def trainable_parameters(self, model, adapter_name="default"):
        raise NotImplementedError
