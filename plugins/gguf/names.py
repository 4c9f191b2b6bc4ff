"""Hugging Face module paths <-> llama.cpp GGUF tensor names, and the Llama Q/K row permutation.

Read from llama.cpp (ggml-org/llama.cpp): ``convert_lora_to_gguf.py`` maps
``base_model.model.<module>.lora_A.weight`` to ``<module>.weight``, lets the
base model's converter (``conversion/*.py``) rename it through gguf-py's
``TensorNameMap`` and appends ``.lora_a`` / ``.lora_b``. For Llama
(``LlamaModel.modify_tensors``) q_proj / k_proj go through ``LlamaModel.permute``;
on a LoRA pair (``LoraTorchTensor``) that reshape + swapaxes touches the rows
of B only. The name map itself is gguf-py's, so this module needs ``gguf``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# HF architectures[0] -> (llama.cpp general.architecture, q/k rows of B permuted)
ARCHES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),  # conversion/llama.py: LlamaModel, undo_permute = True
    "MistralForCausalLM": ("llama", True),  # registered on LlamaModel too
    "Qwen2ForCausalLM": ("qwen2", False),  # conversion/qwen.py: Qwen2Model, no permute
    "Qwen3ForCausalLM": ("qwen3", False),  # Qwen3Model(Qwen2Model)
    "GPT2LMHeadModel": ("gpt2", False),  # conversion/gpt2.py (see gguf_format: no transpose for LoRA)
}
PERMUTED_ARCHES = {arch for arch, permuted in ARCHES.values() if permuted}
CONV1D_ARCHES = {"gpt2"}

# Module paths tried when a GGUF is read without a base (standard HF naming per arch).
_DEFAULT_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
              "model.layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.o_proj",
              "model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt2": ("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_proj",
             "transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"),
}
_DEFAULT_MODULES["qwen2"] = _DEFAULT_MODULES["qwen3"] = _DEFAULT_MODULES["llama"]
_TOP_MODULES = ("lm_head",)


def block_count(config: Mapping[str, Any]) -> int:
    """Number of blocks, read like the converter's ``find_hparam`` does."""
    for key in ("n_layers", "num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return 0


class NameMap:
    """module path <-> ``blk.N.<tensor>.weight`` for one llama.cpp architecture."""

    def __init__(self, arch: str, n_blocks: int):
        import gguf

        by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
        self.arch = arch
        self._map = gguf.get_tensor_name_map(by_name[arch], n_blocks)

    def gguf_name(self, module: str) -> str | None:
        """The GGUF base tensor name of ``module`` (``...q_proj`` -> ``blk.0.attn_q.weight``), or None."""
        return self._map.get_name(f"{module}.weight", try_suffixes=(".weight", ".bias"))

    def inverse(self, modules: Iterable[str]) -> dict[str, list[str]]:
        """GGUF name -> every candidate module that maps to it."""
        out: dict[str, list[str]] = {}
        for module in modules:
            name = self.gguf_name(module)
            if name is not None:
                out.setdefault(name, []).append(module)
        return out


def default_modules(arch: str, n_blocks: int) -> list[str]:
    """Standard HF module paths of ``arch`` (for reading without a base)."""
    templates = _DEFAULT_MODULES.get(arch, ())
    return [t.format(i=i) for i in range(n_blocks) for t in templates] + list(_TOP_MODULES)


def rope_heads(module: str, config: Mapping[str, Any]) -> int | None:
    """Head count ``LlamaModel.permute`` uses for ``module``: n_head for q_proj, n_kv_head for k_proj; else None."""
    n_head = _first(config, ("n_heads", "num_attention_heads"))
    n_kv = _first(config, ("n_kv_heads", "num_key_value_heads"))
    if module.endswith("q_proj"):
        return n_head
    if module.endswith("k_proj"):
        return n_kv if n_kv is not None and n_kv != n_head else n_head
    return None


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def permute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the rows of B: (heads, 2, d/2) -> (heads, d/2, 2)."""
    out, r = b.shape
    return np.ascontiguousarray(b.reshape(heads, 2, out // heads // 2, r).swapaxes(1, 2).reshape(out, r))


def unpermute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`."""
    out, r = b.shape
    return np.ascontiguousarray(b.reshape(heads, out // heads // 2, 2, r).swapaxes(1, 2).reshape(out, r))
