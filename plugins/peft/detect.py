"""The PEFT LoRA layout: file names, tensor keys, task names, module-matching rules, detection.

The matching rules restate PEFT's own (``peft.utils.other.get_pattern_key`` and
``peft.tuners.tuners_utils.check_target_module_exists``, PEFT 0.21) so that the
reader resolves per-module rank and alpha exactly as PEFT does, and the writer
can check that the ``adapter_config.json`` it writes selects the adapted modules.
Nothing here imports torch or PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapterkit.core.io import read_json

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# PEFT task_type <-> manifest task
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


def peft_task_type(task: str | None, original: Any) -> str | None:
    """task_type to write: the original when it still says the manifest's task, else the manifest's; null
    for a task whose PEFT model class would expect a saved head."""
    if original is not None and (task is None or (isinstance(original, str) and TASKS.get(original) == task)):
        chosen = original
    else:
        chosen = TASK_TYPES.get(task) if task else None
    return None if chosen in HEAD_TASK_TYPES else chosen

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
# DoRA's magnitude: PEFT strips the in-memory ".weight" when saving; older files kept it
_MAGNITUDE_KEY = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?")
MAGNITUDE = "magnitude"
#: safetensors __metadata__ keys adapterkit adds (PEFT ignores them): the method and its quantisation
METHOD_METADATA = "adapterkit.method"
QUANTIZATION_METADATA = "adapterkit.quantization"


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "A"); a DoRA
    ``<module>.lora_magnitude_vector`` -> (module, "magnitude"); None for any other key."""
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX):]
    match = _LORA_KEY.fullmatch(rest)
    if match:
        return match["module"], match["which"]
    match = _MAGNITUDE_KEY.fullmatch(rest)
    return (match["module"], MAGNITUDE) if match else None


def lora_key(module: str, which: str) -> str:
    if which == MAGNITUDE:
        return f"{KEY_PREFIX}{module}.lora_magnitude_vector"
    return f"{KEY_PREFIX}{module}.lora_{which}.weight"


def adapter_folder(path: Path) -> Path:
    """The adapter folder of ``path``: itself, or the parent of a file PEFT writes."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        return path.parent
    return path


def weights_file(folder: Path) -> Path | None:
    """The tensor file PEFT would load: safetensors first, then the pickle."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def is_lora_config(config: Any) -> bool:
    """A PEFT LoRA config: ``peft_type`` LORA, or no ``peft_type`` but LoRA's fields."""
    if not isinstance(config, dict):
        return False
    if "peft_type" in config:
        return config["peft_type"] == "LORA"
    return "r" in config and ("lora_alpha" in config or "target_modules" in config)


def detect(path: Path) -> bool:
    """True for a folder holding a PEFT LoRA adapter. Never raises."""
    try:
        path = Path(path)
        if not path.is_dir() or not (path / CONFIG_NAME).is_file() or weights_file(path) is None:
            return False
        return is_lora_config(read_json(path / CONFIG_NAME))
    except Exception:
        return False


# ---- PEFT's matching rules -------------------------------------------------

def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module`` (PEFT's rule).

    A key matches when ``(.*\\.)?(key)$`` matches the module path from its start.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_r_alpha(config: Mapping[str, Any], module: str) -> tuple[int, Any]:
    """Rank and alpha PEFT gives ``module`` under ``config`` (r, lora_alpha, rank/alpha_pattern)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(rank_pattern, module)
    alpha_key = pattern_key(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return r, alpha


def selects(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would put LoRA on ``module`` (target_modules, exclude_modules, layers_to_transform)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{name}") for name in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{name}") for name in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def layer_index(module: str, layers_pattern: Any) -> int | None:
    """The layer number PEFT reads from a module path (the first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    return int(match["idx"]) if match else None
