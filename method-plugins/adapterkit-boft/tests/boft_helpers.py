"""Shared bits of the adapterkit-boft tests (a unique module name: other packages' tests have helpers too)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from adapterkit.testing import TINY_MODELS

#: adapterkit configs of the conformance kit: every tiny model, both block modes, 1 and 2 butterfly factors
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2},
    "gpt2": {"target_modules": ["c_attn", "mlp.c_proj"], "boft_block_size": 8, "boft_n_butterfly_factor": 2,
             "boft_dropout": 0.25},
    "bert": {"target_modules": ["query", "value", "output.dense"], "boft_block_num": 8},
}
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def fake_fbd() -> Any:
    """A torch stand-in for PEFT's CUDA ``fbd`` extension (``FastBlockDiag``: ``[N, D, H, H]`` blocks ->
    ``[N, D*H, D*H]`` block-diagonal matrices), so that PEFT builds and runs several butterfly factors on a CPU."""
    import torch

    def forward(blocks: Any) -> list[Any]:
        return [torch.stack([torch.block_diag(*torch.unbind(blocks[i])) for i in range(blocks.shape[0])])]

    def backward(grad: Any, blocks: Any) -> list[Any]:
        n, d, h, _ = blocks.shape
        return [torch.stack([torch.stack([grad[i, j * h:(j + 1) * h, j * h:(j + 1) * h] for j in range(d)])
                             for i in range(n)])]

    return types.SimpleNamespace(forward=forward, backward=backward)


def set_fbd(value: Any) -> Any:
    """Set what PEFT's ``get_fbd_cuda`` returns (``False``: no extension, without PEFT trying to compile it on a
    machine with no CUDA; ``fake_fbd()``: the torch stand-in); returns the previous value."""
    import peft.tuners.boft.layer as boft_layer

    previous = boft_layer._FBD_CUDA
    boft_layer._FBD_CUDA = value
    return previous


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


def run_cli(*args: str, python: str = sys.executable, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (the installed plugins, as a user sees them)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([python, "-m", "adapterkit", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
