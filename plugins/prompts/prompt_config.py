"""Prompt-tuning config: JSON Schema, defaults, and validation with messages that say how to fix the input.

Torch-free. :func:`validate_config` is the code twin of :data:`CONFIG_SCHEMA`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from adapterkit import config_error, is_int
from adapterkit.core.errors import UsageError

DEFAULTS: dict[str, Any] = {
    "num_virtual_tokens": 20,
    "init": "random",
    "init_text_ids": None,
}
INITS = ("random", "sample_vocab", "text")

# PEFT spellings people will type, with the name to use instead.
ALIASES = {
    "prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text_ids (token ids of the text)",
    "n_virtual_tokens": "num_virtual_tokens", "virtual_tokens": "num_virtual_tokens",
}

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Prompt-tuning config (method.config of a prompt adapter)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "num_virtual_tokens": {
            "type": "integer", "minimum": 1, "default": 20,
            "description": "Number of learned virtual tokens prepended to the input embeddings.",
        },
        "init": {
            "enum": list(INITS), "default": "random",
            "description": 'Initialisation of a new adapter: "random" = normal(0, 1) (PEFT\'s RANDOM); '
                           '"sample_vocab" = embeddings of uniformly sampled vocabulary tokens; '
                           '"text" = embeddings of init_text_ids, repeated or cut to num_virtual_tokens.',
        },
        "init_text_ids": {
            "oneOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}, {"type": "null"}],
            "default": None,
            "description": 'Token ids of the initialisation text (init "text"): the tokeniser runs before, '
                           "so the manifest is self-contained.",
        },
    },
    "if": {"properties": {"init": {"const": "text"}}, "required": ["init"]},
    "then": {"required": ["init_text_ids"], "properties": {"init_text_ids": {"type": "array"}}},
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "shape"],
    "properties": {
        "kind": {"const": "embedding", "description": "The input token embedding the virtual tokens live beside."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                  "description": "The embedding weight's shape [vocab_size, hidden]."},
    },
}




def check_unknown(config: Mapping[str, Any], defaults: Mapping[str, Any], aliases: Mapping[str, str], what: str) -> None:
    """Refuse keys the method does not know, suggesting the right spelling."""
    if not isinstance(config, Mapping):
        raise UsageError(f"{what} config must be a mapping of options", found=type(config).__name__, code="bad_config")
    for key in config:
        if key not in defaults:
            suggestion = aliases.get(key) or next(iter(difflib.get_close_matches(str(key), defaults, n=1)), None)
            raise UsageError(f"unknown {what} option {key!r}", location=f"$.method.config.{key}", expected=sorted(defaults),
                             hint=f"did you mean {suggestion!r}?" if suggestion else "remove it", code="bad_config")


def check_virtual_tokens(value: Any) -> int:
    if not is_int(value) or value < 1:
        raise config_error("num_virtual_tokens", "num_virtual_tokens must be an integer >= 1", value,
                    "pass e.g. num_virtual_tokens=20")
    return int(value)


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full prompt-tuning config (defaults filled); UsageError says how to fix bad input."""
    check_unknown(config, DEFAULTS, ALIASES, "prompt-tuning")
    out = {**DEFAULTS, **config}
    out["num_virtual_tokens"] = check_virtual_tokens(out["num_virtual_tokens"])
    init = out["init"]
    if isinstance(init, str) and init.lower() in INITS:  # PEFT writes RANDOM / SAMPLE_VOCAB / TEXT
        init = out["init"] = init.lower()
    if init not in INITS:
        raise config_error("init", f"init must be one of {list(INITS)}", init, 'e.g. init="sample_vocab"')
    ids = out["init_text_ids"]
    if ids is not None:
        if not isinstance(ids, (list, tuple)) or not ids or not all(is_int(i) and i >= 0 for i in ids):
            raise config_error("init_text_ids", "init_text_ids must be a non-empty list of token ids >= 0, or null", ids,
                        "tokenise the text first: init_text_ids=tokenizer(text)['input_ids']")
        out["init_text_ids"] = [int(i) for i in ids]
    if init == "text" and ids is None:
        raise config_error("init_text_ids", 'init "text" needs init_text_ids', None,
                    "pass init_text_ids=tokenizer(text)['input_ids'] (the manifest stores ids, not text)")
    return out
