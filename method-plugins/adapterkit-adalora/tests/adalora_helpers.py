"""Shared bits of the adapterkit-adalora tests (a unique module name: pytest runs every package's tests at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapterkit.testing import TINY_MODELS

#: adapterkit configs: small ranks, a full schedule, every field PEFT-named
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_r": 4, "target_r": 2, "lora_alpha": 8,
              "total_step": 10},
    "gpt2": {"target_modules": ["c_attn", "c_fc"], "init_r": 4, "target_r": 2, "lora_alpha": 16, "total_step": 10},
    "bert": {"target_modules": ["query", "value"], "init_r": 3, "target_r": 1, "lora_alpha": 4, "total_step": 10},
}
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def peft_config(kind: str, **extra: Any) -> Any:
    """PEFT's AdaLoraConfig for the same modules and values as CONFIGS[kind]."""
    import peft

    fields = {**CONFIGS[kind], **extra}
    return peft.AdaLoraConfig(**fields, task_type="CAUSAL_LM" if kind != "bert" else None)


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


def run_cli(*args: str, python: str = sys.executable, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adapterkit ARGS`` in a subprocess (the installed plugins, as a user sees them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERKIT_PLUGINS", None)
    return subprocess.run([python, "-m", "adapterkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd="/")


def prune(peft_model: Any, seed: int) -> dict[str, list[bool]]:
    """Mask E of a PEFT AdaLoRA model and set its rank_pattern as PEFT's ``RankAllocator.mask_to_budget`` does
    (keys ``<module>.lora_E.default``; one module pruned to rank 0, others to various ranks)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    names = [n for n, _ in peft_model.base_model.model.named_parameters() if "lora_E.default" in n]
    with torch.no_grad():
        for i, (name, param) in enumerate(peft_model.base_model.model.named_parameters()):
            if "lora_E.default" not in name:
                continue
            index = names.index(name)
            keep = torch.rand(param.shape[0], generator=gen) > 0.5
            if index == 0:
                keep[:] = False  # a module pruned to rank 0
            elif index == 1:
                keep[:] = True  # a module kept whole
            param.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[name] = keep.tolist()
    peft_model.peft_config["default"].rank_pattern = pattern
    return pattern
