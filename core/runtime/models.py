"""Loading a local Hugging Face base model (and its tokenizer): nothing is ever downloaded."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from adapterkit.core.errors import BaseModelError


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-tensor progress bars and load reports while preparing."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


#: the transformers Auto class that builds a model for a task (``task=`` of :func:`load_base`)
TASK_CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}


def load_base(base_dir: str | Path, dtype: Any = None, *, task: str | None = None,
              require_all_weights: bool = False) -> Any:
    """The local Hugging Face model in ``base_dir``, in ``dtype`` (float32), eval mode, on CPU; nothing downloaded.

    The class is the config's architecture, or with ``task`` the Auto class of that task
    (:data:`TASK_CLASSES`). ``require_all_weights``: refuse a checkpoint that lacks weights the
    class needs (they would start random, and an adapter cannot save them).
    """
    import torch
    import transformers

    from adapterkit.core.format.base_model import read_base_model

    if task is not None:
        cls, what = getattr(transformers, TASK_CLASSES[task]), f"a {task} model"
    else:
        arch = read_base_model(base_dir).architecture
        cls, what = (getattr(transformers, arch, None) if arch else None), arch
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise BaseModelError("config.json names no model class this transformers provides", file=str(base_dir),
                                 location="$.architectures", found=arch,
                                 hint="set architectures to a transformers class such as LlamaForCausalLM",
                                 code="unknown_architecture")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(base_dir), dtype=dtype or torch.float32, local_files_only=True,
                                              output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BaseModelError(f"cannot load the base as {what}: {str(exc).splitlines()[0]}", file=str(base_dir),
                             code="bad_base") from None
    missing = sorted(info.get("missing_keys") or [])
    if require_all_weights and missing:
        raise BaseModelError(
            f"the base checkpoint lacks {len(missing)} weight(s) {what} needs; they would start random "
            "and an adapter cannot save them", file=str(base_dir), found=missing[:8],
            hint="use a base folder that holds them", code="missing_weights")
    return model.eval()


def load_tokenizer(base: Path) -> Any:
    """The base folder's tokenizer (AutoTokenizer), or a clear error when it has none."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
    if not any((base / name).is_file() for name in names):
        raise BaseModelError("the base folder has no tokenizer", file=str(base), expected=list(names),
                             hint="save one beside the model: tokenizer.save_pretrained(BASE)", code="no_tokenizer")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"cannot load the base's tokenizer: {exc}", file=str(base), code="no_tokenizer") from None
