"""Tiny bases with a tokenizer, and generated JSON Lines data, for the training tests (no downloads)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapterkit.core.demo import number_words
from adapterkit.testing import TINY_MODELS

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer() -> Any:
    """A character-level fast tokenizer: 4 specials + printable ASCII (99 ids, inside the tiny vocab of 128).

    Every text gets ``<bos>`` in front (the template), so an encoder's first token is always the same.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *(chr(c) for c in range(32, 127))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_base(kind: str, folder: Path, seed: int = 0, tokenizer: bool = True, **kwargs: Any) -> Path:
    """A tiny seeded model (adapterkit.testing) saved as an HF folder, with the char tokenizer."""
    model = TINY_MODELS[kind](seed, **kwargs)
    model.save_pretrained(folder)
    if tokenizer:
        char_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any] | str]) -> Path:
    """One JSON object (or a raw string, for broken lines) per line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def number_rows(count: int = 100, seed: int = 0) -> list[dict[str, str]]:
    """The demo's task in prompt / completion lines: "47 ->" -> " forty-seven"."""
    numbers = list(range(100))
    random.Random(seed).shuffle(numbers)
    return [{"prompt": f"{n} ->", "completion": f" {number_words(n)}"} for n in numbers[:count]]


def sentiment_rows(count: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """A separable 3-class task with string labels: the label is in the words."""
    rng = random.Random(seed)
    words = {"pos": ("good", "great", "fine"), "neg": ("bad", "awful", "poor"), "neu": ("okay", "plain", "so-so")}
    rows = []
    for i in range(count):
        label = ("pos", "neg", "neu")[i % 3]
        rows.append({"text": f"{rng.choice(words[label])} {rng.choice(words[label])} day", "label": label})
    return rows


def one_torch_thread():
    """A pytest fixture body: one torch thread while the module runs (tiny models gain nothing from more, and
    on a busy machine OpenMP's spinning threads make every step many times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
