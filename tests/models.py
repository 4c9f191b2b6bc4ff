"""Tiny seeded models for the tests: the builders live in adapterkit.testing."""

from __future__ import annotations

from pathlib import Path

from adapterkit.testing import TINY_MODELS as BUILDERS
from adapterkit.testing import sample_inputs, tiny_bert, tiny_gpt2, tiny_llama

__all__ = ["BUILDERS", "sample_inputs", "save_tiny", "tiny_bert", "tiny_gpt2", "tiny_llama"]


def save_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model as a local HF folder (config.json + model.safetensors)."""
    BUILDERS[kind](seed).save_pretrained(folder)
    return folder
