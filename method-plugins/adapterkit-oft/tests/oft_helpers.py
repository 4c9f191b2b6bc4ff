"""Shared bits of the adapterkit-oft tests (a unique module name: adapterkit's own tests/ has helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapterkit.testing import TINY_MODELS

#: adapterkit OFT configs for the tiny models (hidden 32, intermediate 64)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "oft_block_size": 8},
    "gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "oft_block_size": 8},  # Conv1D
    "bert": {"target_modules": ["query", "value"], "r": 4, "use_cayley_neumann": False},
}
#: the scale of the noise that gives OFT parameters non-trivial but well-conditioned rotations
NOISE = 0.1
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer() -> Any:
    """A character-level fast tokenizer inside the tiny models' vocabulary of 128 (no downloads)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *(chr(c) for c in range(32, 127))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_base(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny seeded model of adapterkit.testing saved as a Hugging Face folder, with a tokenizer."""
    TINY_MODELS[kind](seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (the installed plugins, as a user sees them)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
