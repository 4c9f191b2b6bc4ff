"""torchtune <-> Hugging Face module names and the rotary row order of q/k, as torchtune 0.6 defines them.

From ``torchtune/models/convert_weights.py``: ``_FROM_HF`` maps HF weights to torchtune
(``self_attn.o_proj`` -> ``attn.output_proj``, ``mlp.gate_proj`` -> ``mlp.w1``, ``down_proj`` ->
``w2``, ``up_proj`` -> ``w3``, ``lm_head`` -> ``output``); LoRA keys append ``lora_a.weight`` /
``lora_b.weight`` (``_TO_PEFT_KEYS``). ``hf_to_tune`` permutes q/k rows from HF's half-split
rotary layout to Meta's interleaved one, and ``tune_to_peft_adapter_weights`` undoes it on
``lora_B`` only (``_permute_lora_matrix``: ``view(n_heads, head_dim // 2, 2, r).transpose(1, 2)``).
Qwen2 loads through ``qwen2_hf_to_tune``, which does not permute.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

#: torchtune local name -> (HF sub-path inside a block, PEFT target name), in torchtune's order
#: (get_lora_module_names: attention modules, then w1 w2 w3, then output)
BLOCK_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.q_proj", "q_proj"),
    "k_proj": ("self_attn.k_proj", "k_proj"),
    "v_proj": ("self_attn.v_proj", "v_proj"),
    "output_proj": ("self_attn.o_proj", "o_proj"),
    "w1": ("mlp.gate_proj", "gate_proj"),
    "w2": ("mlp.down_proj", "down_proj"),
    "w3": ("mlp.up_proj", "up_proj"),
}
ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP = ("w1", "w2", "w3")
OUTPUT = "output"
OUTPUT_HF = "lm_head"
#: PEFT target name (what torchtune's checkpointer writes) or torchtune name -> torchtune name
TARGET_NAMES = {peft: tune for tune, (_, peft) in BLOCK_MODULES.items()} | {t: t for t in BLOCK_MODULES} | {
    "lm_head": OUTPUT, OUTPUT: OUTPUT}
#: HF model_type -> whether torchtune keeps q/k rows in Meta's interleaved rotary order
META_ORDER = {"llama": True, "mistral": True, "gemma": True, "gemma2": True, "qwen2": False}

_TUNE_KEY = re.compile(r"^(?:layers\.(?P<layer>\d+)\.(?P<group>attn|mlp)\.(?P<name>\w+)|(?P<output>output))"
                       r"\.(?P<param>lora_a\.weight|lora_b\.weight|magnitude)$")
_HF_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<sub>(?:self_attn|mlp)\.\w+)$")
_HF_TO_TUNE = {sub: tune for tune, (sub, _) in BLOCK_MODULES.items()}


def parse_key(key: str) -> tuple[str, str, int | None, str] | None:
    """``layers.0.attn.q_proj.lora_a.weight`` -> (HF module, torchtune name, layer, "a" | "b" | "magnitude")."""
    match = _TUNE_KEY.match(key)
    if not match:
        return None
    param = match["param"].split(".")[0].removeprefix("lora_")
    if match["output"]:
        return OUTPUT_HF, OUTPUT, None, param
    name, group = match["name"], match["group"]
    if name not in BLOCK_MODULES or (group == "attn") != (name in ATTN):
        return None
    return f"model.layers.{match['layer']}.{BLOCK_MODULES[name][0]}", name, int(match["layer"]), param


def tune_module(module: str) -> tuple[str, int | None] | None:
    """HF module path -> (torchtune name, layer), None for modules torchtune's LoRA cannot adapt."""
    if module == OUTPUT_HF:
        return OUTPUT, None
    match = _HF_MODULE.match(module)
    if match and match["sub"] in _HF_TO_TUNE:
        return _HF_TO_TUNE[match["sub"]], int(match["layer"])
    return None


def tune_key(name: str, layer: int | None, which: str) -> str:
    """(``q_proj``, 0, ``a``) -> ``layers.0.attn.q_proj.lora_a.weight``."""
    if name == OUTPUT:
        return f"output.lora_{which}.weight"
    group = "attn" if name in ATTN else "mlp"
    return f"layers.{layer}.{group}.{name}.lora_{which}.weight"


def heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) as torchtune's checkpointer reads them from config.json."""
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // n_heads
    return n_heads, n_kv, int(head_dim)


def meta_to_hf(b: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Rows of a q/k ``lora_b`` from torchtune (interleaved) to HF (half-split) order."""
    r = b.shape[-1]
    rows = b.reshape(n_heads, head_dim // 2, 2, r).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(rows.reshape(n_heads * head_dim, r))


def hf_to_meta(b: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of :func:`meta_to_hf`."""
    r = b.shape[-1]
    rows = b.reshape(n_heads, 2, head_dim // 2, r).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(rows.reshape(n_heads * head_dim, r))
