"""Shared bits of the adapterkit-lokr tests (a unique module name: pytest runs every package's tests together)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapterkit.testing import TINY_MODELS

#: adapterkit configs per tiny model: every layout (full w1/w2, low-rank w2, decompose_both, a factor, patterns)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2, "alpha": 3, "decompose_both": True,
              "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 5}},
    "gpt2": {"target_modules": ["c_attn", "c_fc"], "r": 2, "alpha": 4},
    "bert": {"target_modules": ["query", "value", "output.dense"], "r": 8, "decompose_factor": 4},
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


def save_base(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny seeded model saved as a Hugging Face folder, with a tokenizer."""
    TINY_MODELS[kind](seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (the installed plugins, as a user sees them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
