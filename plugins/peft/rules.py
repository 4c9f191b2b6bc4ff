"""PEFT's own rules, restated torch-free (PEFT 0.21): which ``peft_type`` a config names, tensor keys,
task types, and which modules a config selects.

- ``peft_type``: the config's field; a config without one but with LoRA's fields (``r`` and
  ``lora_alpha`` or ``target_modules``) is an old PEFT LoRA.
- keys: ``base_model.model.<module>.<leaf>`` (``PeftModel.save_pretrained`` strips the adapter name).
- ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``:
  ``peft.tuners.tuners_utils.check_target_module_exists`` (:func:`selects`, :func:`layer_index`).
- ``rank_pattern``-style maps: ``peft.utils.other.get_pattern_key``, which is
  :func:`adapterkit.pattern_value`'s rule.

The selection fields are checked here when present (every PEFT tuner that has them reads them
the same way); each codec checks its own fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapterkit.core.errors import FormatError
from adapterkit.core.format.targeting import layer_index
from adapterkit.core.format.targeting import selects as targeting_selects

KEY_PREFIX = "base_model.model."
#: PEFT task_type <-> manifest task
TASKS: dict[str, str] = {
    "CAUSAL_LM": "causal-lm",
    "SEQ_CLS": "sequence-classification",
    "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "seq2seq-lm",
    "FEATURE_EXTRACTION": "feature-extraction",
    "QUESTION_ANS": "question-answering",
}
TASK_TYPES: dict[str, str] = {task: task_type for task_type, task in TASKS.items()}
#: task types whose PEFT model class trains the task head with the adapter (adds it to modules_to_save) and
#: requires its weights in the adapter file when loading. adapterkit adapters keep the head in the base
#: (docs/training.md), so they are written with task_type null, which PEFT loads on the head's model.
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})
#: the fields that select modules (:func:`selects`)
SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"


def peft_type_of(config: Any) -> str | None:
    """The ``peft_type`` a parsed adapter_config.json names: its field, ``"LORA"`` for an old LoRA config
    without one (``r`` and ``lora_alpha`` or ``target_modules``), else None."""
    if not isinstance(config, dict):
        return None
    if "peft_type" in config:
        value = config["peft_type"]
        return value if isinstance(value, str) and value else None
    if "r" in config and ("lora_alpha" in config or "target_modules" in config):
        return "LORA"
    return None


def task_of(task_type: Any) -> str | None:
    """The manifest task of a PEFT task_type (None when unknown)."""
    return TASKS.get(task_type) if isinstance(task_type, str) else None


def peft_task_type(task: str | None, original: Any) -> str | None:
    """task_type to write: the original when it still says the manifest's task, else the manifest's; null
    for a task whose PEFT model class would expect a saved head."""
    if original is not None and (task is None or (isinstance(original, str) and TASKS.get(original) == task)):
        chosen = original
    else:
        chosen = TASK_TYPES.get(task) if task else None
    return None if chosen in HEAD_TASK_TYPES else chosen


def same(a: Any, b: Any) -> bool:
    """Equal as PEFT would read them (0 == 0.0), but never True == 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


# ---- which modules ---------------------------------------------------------------

def selects(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would adapt ``module`` under ``config`` (target_modules, exclude_modules, layers_to_transform,
    layers_pattern): :func:`adapterkit.selects` on the config's fields."""
    return targeting_selects(module, config.get("target_modules"), layers_to_transform=config.get("layers_to_transform"),
                             layers_pattern=config.get("layers_pattern"), exclude_modules=config.get("exclude_modules"))


# ---- checking the selection fields of a config --------------------------------------

def bad_config(message: str, file: str, location: str, found: Any, hint: str = FIX) -> FormatError:
    return FormatError(message, file=file, location=location, found=found, hint=hint, code="bad_config")


def check_regex(pattern: str, file: str, location: str) -> None:
    """Refuse a string PEFT would use as a regular expression and that does not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise bad_config(f"not a valid regular expression: {exc}", file, location, pattern,
                         hint="PEFT matches this as a regex; escape special characters") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_selection(config: Mapping[str, Any], file: str) -> None:
    """Refuse selection fields (:data:`SELECTION_FIELDS`) PEFT could not apply; absent or null ones pass."""
    for name in ("target_modules", "exclude_modules"):
        value = config.get(name)
        names_ok = isinstance(value, list) and all(isinstance(t, str) for t in value)
        if not (value is None or isinstance(value, str) or names_ok):
            raise bad_config(f"{name} must be a list of names or a regex string", file, f"$.{name}", value)
        if isinstance(value, str):
            check_regex(value, file, f"$.{name}")
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(i) for i in layers))):
        raise bad_config("layers_to_transform must be an integer or a list of integers", file, "$.layers_to_transform",
                         layers)
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not (patterns is None or (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns))):
        raise bad_config("layers_pattern must be a name, a regex string or a list of them", file, "$.layers_pattern",
                         pattern)
    for index, item in enumerate(patterns or ()):
        check_regex(item, file, f"$.layers_pattern[{index}]" if isinstance(pattern, list) else "$.layers_pattern")
