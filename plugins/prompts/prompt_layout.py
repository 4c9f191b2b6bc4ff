"""Where virtual tokens meet a base model: its dimensions and the modules that anchor the adapter.

Torch-free, so that the PEFT reader can resolve module paths from a base
folder's ``config.json`` and safetensors headers alone, and the live-model
injection (``module``) uses the very same rules.

- :func:`model_dims` reads layers, hidden size, heads, key/value heads, head
  size and vocabulary size from a Hugging Face config (a dict or a config
  object; ``text_config`` of a multimodal config is used when present).
- :func:`find_input_embedding` picks the input token embedding among weights.
- :func:`find_kv_projections` finds, per decoder layer, the attention key and
  value projections (``k_proj`` / ``v_proj``, BERT's ``key`` / ``value``) or
  the fused one (GPT-2's ``c_attn``, ``qkv_proj``, ``query_key_value``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterkit.core.errors import BaseModelError

EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
KEY_NAMES = ("k_proj", "key", "k_lin", "wk", "key_proj")
VALUE_NAMES = ("v_proj", "value", "v_lin", "wv", "value_proj")
FUSED_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")
#: path components of cross-attention blocks, never given a self-attention prefix
CROSS_ATTENTION = ("crossattention", "encoder_attn", "cross_attn", "EncDecAttention")

#: target kinds of prefix tuning: which projection of an attention block the module is
KEY_PROJ, VALUE_PROJ, QKV_PROJ = "key_proj", "value_proj", "qkv_proj"


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that virtual tokens depend on (None when the config lacks them)."""

    num_layers: int | None
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    vocab: int | None

    @property
    def kv_dim(self) -> int | None:
        """Width of one token's keys (or values): ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim if self.kv_heads and self.head_dim else None


def _getter(config: Any) -> Any:
    if isinstance(config, Mapping):
        text = config.get("text_config")
        source = text if isinstance(text, Mapping) else config
        return source.get
    text = getattr(config, "get_text_config", None)
    source = text() if callable(text) else config
    return lambda key, default=None: getattr(source, key, default)


def _first_int(get: Any, *names: str) -> int | None:
    for name in names:
        value = get(name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_dims(config: Any) -> ModelDims:
    """The dimensions in a Hugging Face config (the spellings of llama, gpt2, bert, t5, falcon...)."""
    get = _getter(config)
    layers = _first_int(get, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _first_int(get, "hidden_size", "n_embd", "d_model")
    heads = _first_int(get, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first_int(get, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None and get("multi_query", False) is True:
        kv_heads = 1
    kv_heads = kv_heads or heads
    head_dim = _first_int(get, "head_dim")
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    return ModelDims(layers, hidden, heads, kv_heads, head_dim, _first_int(get, "vocab_size"))


def find_input_embedding(shapes: Mapping[str, Sequence[int]], dims: ModelDims) -> str:
    """The module path of the input token embedding among ``shapes`` (module path -> weight shape).

    The embedding is the 2-D weight of shape ``[vocab_size, hidden]`` whose module
    is named like one (``embed_tokens``, ``wte``, ``word_embeddings``...).
    """
    found = sorted(
        path for path, shape in shapes.items()
        if path.rsplit(".", 1)[-1] in EMBEDDING_NAMES and len(shape) == 2
        and (dims.vocab is None or shape[0] == dims.vocab) and (dims.hidden is None or shape[1] == dims.hidden)
    )
    if len(found) != 1:
        raise BaseModelError(
            "cannot tell which module is the input token embedding" if found else "the base model has no input token embedding",
            expected=f"one [vocab_size, hidden] weight named like {list(EMBEDDING_NAMES)}",
            found=found or None, hint="check that the base model is the one the adapter was made for",
            code="no_embedding",
        )
    return found[0]


def layer_index(path: str) -> int | None:
    """The first all-digit component of ``path`` (the block index), or None."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def find_kv_projections(paths: Iterable[str], num_layers: int) -> dict[int, dict[str, str]]:
    """Layer index -> {kind: module path}, kinds ``key_proj`` + ``value_proj`` or ``qkv_proj``.

    Every layer ``0 .. num_layers - 1`` must have exactly one key and one value
    projection (separate ones are preferred over a fused one); cross-attention
    blocks are ignored.
    """
    found: dict[int, dict[str, list[str]]] = {}
    for path in paths:
        leaf = path.rsplit(".", 1)[-1]
        kind = KEY_PROJ if leaf in KEY_NAMES else VALUE_PROJ if leaf in VALUE_NAMES else QKV_PROJ if leaf in FUSED_NAMES else None
        index = layer_index(path)
        if kind is None or index is None or any(part in CROSS_ATTENTION for part in path.split(".")):
            continue
        found.setdefault(index, {}).setdefault(kind, []).append(path)
    layers: dict[int, dict[str, str]] = {}
    for index in range(num_layers):
        kinds = found.get(index, {})
        wanted = (KEY_PROJ, VALUE_PROJ) if KEY_PROJ in kinds or VALUE_PROJ in kinds else (QKV_PROJ,)
        chosen: dict[str, str] = {}
        for kind in wanted:
            candidates = sorted(kinds.get(kind, []))
            if len(candidates) != 1:
                raise BaseModelError(
                    f"layer {index}: {'no' if not candidates else 'more than one'} attention "
                    f"{kind.replace('_proj', '')} projection found",
                    expected=f"one module named like {list(_names(kind))} in layer {index}",
                    found=candidates or None,
                    hint="prefix tuning supports decoder models whose attention has k/v projections "
                    "(k_proj/v_proj, key/value) or a fused qkv projection (c_attn, qkv_proj, query_key_value)",
                    code="no_attention",
                )
            chosen[kind] = candidates[0]
        layers[index] = chosen
    extra = sorted(i for i in found if i >= num_layers)
    if extra:
        raise BaseModelError(
            f"attention projections found in layers {extra}, beyond the config's {num_layers} layers",
            hint="check the base model's config.json", code="no_attention",
        )
    return layers


def _names(kind: str) -> tuple[str, ...]:
    return {KEY_PROJ: KEY_NAMES, VALUE_PROJ: VALUE_NAMES, QKV_PROJ: FUSED_NAMES}[kind]


def weight_shapes(weights: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Checkpoint ``<module>.weight`` keys -> ``{module: shape}`` (other keys dropped)."""
    return {key[: -len(".weight")]: list(shape) for key, shape in weights.items() if key.endswith(".weight")}
