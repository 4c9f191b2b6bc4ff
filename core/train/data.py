"""Training data for ``adapterkit train``: JSON Lines in, tokenised examples and padded batches out.

One JSON object per line (blank lines are skipped):

- ``{"text": ...}``: causal language modelling, the loss covers every token;
- ``{"prompt": ..., "completion": ...}``: causal language modelling, the loss
  covers the completion (and the end-of-sequence token) only;
- ``{"text": ..., "label": ...}``: sequence classification; a label is a
  string (the label map is built from the data, sorted) or an integer class id.

``text`` and ``prompt`` / ``completion`` lines may be mixed; classification
lines may not be mixed with the other two. Any problem is an error that names
``file:line``. Tokenisation is separate (:func:`encode`), and so is batching
(:func:`collate`), so the loop and the Trainer integration share them.

torch is imported only by :func:`collate`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, UsageError

CAUSAL = "causal-lm"
CLASSIFICATION = "sequence-classification"
IGNORE = -100  # label of a position that carries no loss (PyTorch's cross-entropy ignore_index)
MAX_LINE_BYTES = 1 << 20

_KEYS = {
    frozenset({"text"}): CAUSAL,
    frozenset({"prompt", "completion"}): CAUSAL,
    frozenset({"text", "label"}): CLASSIFICATION,
}
_SHAPES = '{"text": ...}, {"prompt": ..., "completion": ...} or {"text": ..., "label": ...}'


class DataError(AdapterkitError):
    """A training data file is missing or has a bad line."""


@dataclass(frozen=True)
class Example:
    """One line of a data file (1-based ``line``)."""

    line: int
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    label: str | int | None = None


@dataclass
class Dataset:
    """The examples of one file, with the task they imply."""

    path: Path
    task: str
    examples: list[Example]
    sha256: str

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class Encoded:
    """A tokenised example: ``ids``, and either per-token ``targets`` (causal) or a class ``label``.

    ``targets`` is aligned with ``ids`` (IGNORE where no loss); the model predicts
    ``targets[i + 1]`` from position ``i``. ``units`` is what the example adds to
    the loss normaliser: its predicted tokens, or 1 for a classification example.
    """

    ids: tuple[int, ...]
    targets: tuple[int, ...] | None = None
    label: int | None = None
    line: int = 0

    @property
    def units(self) -> int:
        if self.targets is None:
            return 1
        return sum(1 for t in self.targets[1:] if t != IGNORE)


def read_jsonl(path: str | Path) -> Dataset:
    """Read and check a data file; every problem names ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("data file not found", file=str(path), code="missing_file")
    raw = path.read_bytes()
    examples: list[Example] = []
    task: str | None = None
    first_line = 0
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if not chunk.strip():
            continue
        if len(chunk) > MAX_LINE_BYTES:
            raise DataError("line is too long", file=where, expected=f"<= {MAX_LINE_BYTES} bytes", found=len(chunk),
                            code="bad_data")
        example, line_task = _parse_line(chunk, where, number)
        if task is None:
            task, first_line = line_task, number
        elif line_task != task:
            raise DataError(f"a {line_task} line in a {task} file (line {first_line} set the task)", file=where,
                            hint="keep classification lines ({\"text\", \"label\"}) and language-modelling lines "
                                 "in separate files", code="bad_data")
        examples.append(example)
    if not examples:
        raise DataError("data file has no examples", file=str(path), expected=f"JSON Lines: {_SHAPES}",
                        code="bad_data")
    if task == CLASSIFICATION:
        _check_label_types(path, examples)
    return Dataset(path, task or CAUSAL, examples, hashlib.sha256(raw).hexdigest())


def _parse_line(chunk: bytes, where: str, number: int) -> tuple[Example, str]:
    try:
        data = json.loads(chunk.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError("line is not UTF-8 text", file=where, code="bad_data") from None
    except ValueError as exc:
        raise DataError(f"not valid JSON: {exc}", file=where, hint="write one JSON object per line",
                        code="bad_data") from None
    if not isinstance(data, dict):
        raise DataError("line is not a JSON object", file=where, expected=_SHAPES, found=type(data).__name__,
                        code="bad_data")
    task = _KEYS.get(frozenset(data))
    if task is None:
        fits = [shape for shape in _KEYS if data and set(data) < shape]
        if len(fits) == 1:  # a known shape with a field missing: {"prompt": ...} without "completion"
            missing = sorted(fits[0] - set(data))
            raise DataError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}",
                            file=where, expected=_SHAPES, found=sorted(data), code="bad_data")
        if not data:
            raise DataError("the object has no fields", file=where, expected=_SHAPES, code="bad_data")
        raise DataError(f"unexpected fields {sorted(data)}", file=where, expected=_SHAPES,
                        hint="rename or remove the other fields", code="bad_data")
    for key in ("text", "prompt", "completion"):
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise DataError(f"{key!r} must be a string", file=where, found=type(value).__name__, code="bad_data")
            if not value.strip() and key != "prompt":
                raise DataError(f"{key!r} is empty", file=where, code="bad_data")
    label = data.get("label")
    if task == CLASSIFICATION:
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label):
            raise DataError("'label' must be a non-empty string or an integer class id", file=where, found=label,
                            code="bad_data")
        if isinstance(label, int) and label < 0:
            raise DataError("an integer label must be >= 0", file=where, found=label, code="bad_data")
    return Example(number, data.get("text"), data.get("prompt"), data.get("completion"), label), task


def _check_label_types(path: Path, examples: Sequence[Example]) -> None:
    first = examples[0]
    for example in examples:
        if isinstance(example.label, str) != isinstance(first.label, str):
            raise DataError("labels mix strings and integers", file=f"{path}:{example.line}", found=example.label,
                            hint=f"line {first.line} has {first.label!r}; use one kind of label throughout",
                            code="bad_data")


def split(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) index lists; validation gets round(count * fraction), at least 1 when asked."""
    if not 0 <= val_fraction < 1:
        raise UsageError("the validation fraction must be in [0, 1)", found=val_fraction, code="bad_option")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    size = 0 if val_fraction == 0 else max(1, round(count * val_fraction))
    if size and count - size < 1:
        raise UsageError(f"{count} example(s) are too few to hold {size} out for validation",
                         hint="add examples, or pass --val-fraction 0", code="too_little_data")
    return sorted(order[size:]), sorted(order[:size])


# ---- labels -------------------------------------------------------------------

def label_names(dataset: Dataset, base_labels: Sequence[str] | None = None) -> list[str]:
    """The class names by id: the base head's names when it has real ones, else built from the data.

    String labels are sorted; integer labels ``0..max`` are named ``"0"``, ``"1"``...
    (``base_labels`` fixes the count when the base already has a head).
    """
    labels = [e.label for e in dataset.examples]
    if base_labels is not None and not _default_names(base_labels):
        known = set(base_labels)
        for example in dataset.examples:
            if isinstance(example.label, str) and example.label not in known:
                raise DataError(f"label {example.label!r} is not one of the base model's labels",
                                file=f"{dataset.path}:{example.line}", expected=list(base_labels), code="bad_data")
        return list(base_labels)
    if isinstance(labels[0], str):
        names = sorted({str(label) for label in labels})
    else:
        names = [str(i) for i in range(max(int(label) for label in labels) + 1)]  # type: ignore[arg-type]
    if base_labels is not None and len(names) < len(base_labels) and not isinstance(labels[0], str):
        names = [str(i) for i in range(len(base_labels))]
    return names


def _default_names(names: Sequence[str]) -> bool:
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


def label_id(example: Example, names: Sequence[str], path: Path) -> int:
    if isinstance(example.label, int):
        if example.label >= len(names):
            raise DataError(f"label {example.label} is out of range for {len(names)} classes",
                            file=f"{path}:{example.line}", code="bad_data")
        return example.label
    return list(names).index(str(example.label))


# ---- tokenisation ---------------------------------------------------------------

def encode(dataset: Dataset, tokenizer: Any, max_length: int, names: Sequence[str] | None = None) -> list[Encoded]:
    """Tokenise every example, cut to ``max_length`` tokens (the end is dropped).

    Causal: ``prompt`` is tokenised with the tokenizer's special tokens (e.g. BOS),
    ``completion`` without, then EOS is appended; ``text`` likewise gets EOS.
    """
    if max_length < 2:
        raise UsageError("max length must be at least 2 tokens", found=max_length, code="bad_option")
    eos = tokenizer.eos_token_id
    out = []
    for example in dataset.examples:
        where = f"{dataset.path}:{example.line}"
        if dataset.task == CLASSIFICATION:
            ids = _ids(tokenizer, example.text or "", True, where)[:max_length]
            out.append(Encoded(tuple(ids), label=label_id(example, names or [], dataset.path), line=example.line))
            continue
        if example.completion is not None:
            prompt = _ids(tokenizer, example.prompt or "", True, where) if example.prompt else _specials(tokenizer)
            completion = _ids(tokenizer, example.completion, False, where) + ([eos] if eos is not None else [])
            ids, targets = prompt + completion, [IGNORE] * len(prompt) + completion
        else:
            ids = _ids(tokenizer, example.text or "", True, where) + ([eos] if eos is not None else [])
            targets = list(ids)
        out.append(Encoded(tuple(ids[:max_length]), tuple(targets[:max_length]), line=example.line))
    return out


def _ids(tokenizer: Any, text: str, special: bool, where: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not ids and text:
        raise DataError("the tokenizer turned this text into no tokens", file=where, code="bad_data")
    return ids


def _specials(tokenizer: Any) -> list[int]:
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def check_trainable(encoded: Sequence[Encoded], path: Path, max_length: int) -> int:
    """How many examples carry no loss after cutting; refuse when none does."""
    empty = [e for e in encoded if e.units == 0]
    if len(empty) == len(encoded):
        raise DataError(f"no example has a token to learn within --max-length {max_length}", file=str(path),
                        hint="raise --max-length or shorten the prompts", code="bad_data")
    return len(empty)


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0  # pragma: no cover


def collate(rows: Sequence[Encoded], pad: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask``, and ``targets`` (causal) or ``labels`` (classification)."""
    import torch

    width = max(len(r.ids) for r in rows)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([list(r.ids) + [pad] * (width - len(r.ids)) for r in rows], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows], dtype=torch.long),
    }
    if rows[0].targets is not None:
        batch["targets"] = torch.tensor([list(r.targets or ()) + [IGNORE] * (width - len(r.ids)) for r in rows],
                                        dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([r.label for r in rows], dtype=torch.long)
    return batch


def units(rows: Sequence[Encoded]) -> int:
    return sum(r.units for r in rows)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))


def summary(dataset: Dataset, train: Sequence[int], val: Sequence[int]) -> Mapping[str, Any]:
    return {"file": dataset.path.name, "sha256": dataset.sha256, "examples": len(dataset),
            "train": len(train), "validation": len(val)}
