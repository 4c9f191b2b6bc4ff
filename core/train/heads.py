"""Classification heads for ``adapterkit train``: the base's own (frozen), or a new seeded one in ``--head-base``.

``AutoModelForSequenceClassification`` puts a head (``classifier`` / ``score``) on
the base. An adapter in format 1.0 cannot carry extra base weights (there is no
``modules_to_save``), so the head is never trained: it is frozen, and it must
live in the base folder, where the adapter's user will find it again.

- A base saved with a classification head of the right size (its checkpoint
  holds the head's weights): used as it is.
- A base without one (a plain encoder or a causal LM): refused, unless
  ``head_base=DIR`` is given; then a copy of the base with a new head, seeded
  with ``seed``, is written to DIR (weights, config with the label names,
  tokenizer) and the adapter is trained for, and recorded against, that folder.
  A resumed run finds DIR as the first run wrote it and uses it again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, BaseModelError, UsageError
from adapterkit.core.train.data import DataError, Dataset

HEAD_RECORD = "adapterkit-head.json"


def classification_base(base: Path, dataset: Dataset, tokenizer: Any, head_base: Path | None, seed: int,
                        overwrite: bool, resume: bool, ctx: Any,
                        say: Callable[[str], Any]) -> tuple[Path, list[str], Path | None]:
    """(base to train on, label names, head base or None): see the module docstring."""
    from transformers import AutoConfig

    from adapterkit.core.train import dist as train_dist
    from adapterkit.core.train.data import label_names

    config = AutoConfig.from_pretrained(base)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        base_labels = [config.id2label[i] for i in range(config.num_labels)]
        names = label_names(dataset, base_labels)
        if len(names) != config.num_labels:
            raise DataError(f"the data has {len(names)} classes, the base's classification head has "
                            f"{config.num_labels}",
                            file=str(dataset.path), hint="use a base whose head fits the labels, or --head-base "
                            "with a base without a head", code="bad_data")
        if head_base is not None:
            raise UsageError("--head-base makes a new head, but the base already has one", file=str(base),
                             hint="drop --head-base (the base's head is used, frozen)", code="bad_option")
        return base, names, None
    names = label_names(dataset)
    if head_base is None:
        raise BaseModelError(
            f"the base has no trained classification head ({', '.join(archs) or config.model_type}); a new head would "
            "start random, and an adapter cannot carry it (format 1.0 saves adapter tensors only)", file=str(base),
            hint="pass --head-base DIR: a copy of the base with a new, seeded, frozen head is written there and "
                 "the adapter is trained for it (docs/training.md)", code="no_head")
    if resume:
        check_head_base(head_base, base, names, seed)
        return head_base, names, head_base
    failure: BaseException | None = None
    if ctx.main:
        try:
            write_head_base(base, head_base, names, tokenizer, seed, overwrite)
            say(f"Wrote {head_base}: the base with a new {len(names)}-class head (seed {seed}, frozen)")
        except AdapterkitError as exc:
            failure = exc
    train_dist.agree(ctx, failure is None, "writing the head base")
    if failure is not None:
        raise failure
    return head_base, names, head_base


def _record(base: Path, seed: int, names: list[str]) -> dict[str, Any]:
    return {"base": str(base), "seed": seed, "labels": names}


def check_head_base(head_base: Path, base: Path, names: list[str], seed: int) -> None:
    """A resumed run's head base must be the one its first run wrote (same base, seed and labels)."""
    from adapterkit.core.io import read_json

    record = head_base / HEAD_RECORD
    found = read_json(record) if record.is_file() else None
    if found != _record(base, seed, names):
        raise BaseModelError("the head base is not the one this run wrote (base, seed and labels differ, or it is "
                             "missing)", file=str(record), expected=_record(base, seed, names), found=found,
                             hint="resume with the first run's --head-base, --base, --seed and data",
                             code="resume_mismatch")


def write_head_base(base: Path, dest: Path, names: list[str], tokenizer: Any, seed: int, overwrite: bool) -> Path:
    """Save ``base`` with a new sequence-classification head for ``names`` (seeded) as a model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from adapterkit.core.io import atomic_directory, canonical_json
    from adapterkit.core.runtime.models import quiet_transformers
    from adapterkit.core.train.data import pad_id

    torch.manual_seed(seed)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            base, dtype=torch.float32, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id(tokenizer)
    with atomic_directory(dest, overwrite=overwrite) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / HEAD_RECORD).write_bytes(canonical_json(_record(base, seed, names)))
    return dest
