"""Shared bits of the adapterkit-vera tests (a unique module name: other packages' tests run in the same session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapterkit.testing import TINY_MODELS

#: adapterkit configs per tiny model: modules of different sizes, so the projections are sliced
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "gpt2": {"r": 6, "target_modules": ["c_attn", "c_fc"], "projection_prng_key": 3},
    "bert": {"r": 4, "target_modules": ["query", "intermediate.dense"], "init_weights": False},
}
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


def save_base_with_tokenizer(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny seeded model of adapterkit.testing saved as a Hugging Face folder, with a tokenizer."""
    TINY_MODELS[kind](seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str, python: str = sys.executable, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (the installed plugins, as a user sees them)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([python, "-m", "adapterkit", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
