"""The PEFT codecs of the virtual-token methods: ``PROMPT_TUNING`` (``prompt``) and ``PREFIX_TUNING`` (``prefix``).

Registered by the method modules (``prompt_method``, ``prefix_method``); the peft format
plugin owns the folder and hands each call its context (docs/plugins.md, "The PEFT codec
context"). Torch-free (a live model as the base is the caller's torch).

PEFT's layout (PEFT 0.21, ``get_peft_model_state_dict``): one tensor,
``prompt_embeddings``.

- PROMPT_TUNING: ``[num_virtual_tokens * num_transformer_submodules, token_dim]``,
  token_dim = the hidden size: the virtual-token embeddings, our
  ``<input embedding>.prompt.embeddings``.
- PREFIX_TUNING: ``[num_virtual_tokens, num_layers * 2 * token_dim]`` with
  token_dim = kv_heads * head_dim (PEFT writes the key/value heads into
  ``num_attention_heads`` for grouped-query models). Column block ``2l`` is
  layer ``l``'s keys, ``2l + 1`` its values, each ``[heads, head_dim]`` heads
  major: our ``<key proj>.prefix.key`` / ``<value proj>.prefix.value``.
  PEFT always saves the *folded* prefix, also with ``prefix_projection``
  (``get_prompt_embedding_to_save`` runs the MLP); a file holding the MLP
  itself (``embedding.weight`` + ``transform.{0,2}.{weight,bias}``) is folded
  here: ``tanh(E W0^T + b0) W2^T + b2``.

PEFT records no module paths, so reading needs the base model (the ``base`` option: a
local folder, read from config.json and safetensors headers only, or a live model) to
name the input embedding and the key/value projections. Encoder-decoder adapters
(``num_transformer_submodules`` 2) are refused: adapterkit's methods cover
decoder-only and encoder-only models.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import Adapter, Codec, check_tensor_dims
from adapterkit.core.errors import AdapterkitError, BaseModelError, FormatError, LossyConversionError, TensorFileError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.base_model import BaseModelInfo, base_fields, read_base_model

from .prefix_layout import layer_plans, prefix_targets
from .prompt_layout import ModelDims, find_input_embedding, model_dims, weight_shapes

TENSOR = "prompt_embeddings"
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_MLP_KEY = re.compile(r"(?:.*\.)?(embedding\.weight|transform\.[02]\.(?:weight|bias))")
_MLP = {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}
_BASE_HINT = ("PEFT prompt/prefix folders do not record module paths or the vocabulary size: pass the base model "
              "(base=<local model folder or model>, --base on the command line)")
#: fields PEFT's prompt-learning configs have, written as null unless the original config says otherwise
_NULL_FIELDS = ("auto_mapping", "modules_to_save", "num_attention_heads", "num_layers")

Layout = tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]


class _VirtualTokenCodec(Codec):
    """What PROMPT_TUNING and PREFIX_TUNING share: the config checks, the one tensor, the base."""

    format = "peft"

    def read(self, context: Any) -> Adapter:
        config, file = context.config, context.config_file
        count, token_dim = _positive(config, "num_virtual_tokens", file), _positive(config, "token_dim", file)
        submodules = config.get("num_transformer_submodules") or 1
        if submodules != 1 or config.get("task_type") == "SEQ_2_SEQ_LM":
            raise LossyConversionError(
                "encoder-decoder prompt learning (num_transformer_submodules 2, SEQ_2_SEQ_LM) is not supported: "
                "the decoder's half of the virtual tokens would be lost", file=file,
                location="$.num_transformer_submodules", expected=1, found=submodules,
                hint="use the adapter with PEFT directly", code="unsupported",
            )
        embeddings = _prompt_embeddings(context.tensors, context.tensors_file)
        dtype = _DTYPES.get(safetensors_io.dtype_name(embeddings))
        if dtype is None or embeddings.ndim != 2:
            raise TensorFileError("prompt_embeddings must be a 2-D floating-point tensor", file=context.tensors_file,
                                  location=TENSOR, found=f"{embeddings.dtype} {list(embeddings.shape)}", code="bad_dtype")
        shapes, dims, info = _base_layout(context.base)
        targets, tensors, method_config = self.layout(embeddings, count, token_dim, config, shapes, dims, context)
        return context.adapter(self.methods[0], method_config, targets, tensors, dtype, base_model=info)

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        count = int(adapter.manifest.config.get("num_virtual_tokens", 20))
        embeddings, fields = self.embeddings(adapter, count)
        defaults = {name: None for name in _NULL_FIELDS if name not in context.original}
        return {**defaults, **fields, "num_transformer_submodules": 1}, {TENSOR: np.ascontiguousarray(embeddings)}

    @abstractmethod
    def layout(self, embeddings: np.ndarray, count: int, token_dim: int, config: Mapping[str, Any],
               shapes: Mapping[str, list[int]], dims: ModelDims, context: Any) -> Layout:
        """(targets, canonical tensors, method config) of the file's ``prompt_embeddings``."""

    @abstractmethod
    def embeddings(self, adapter: Adapter, count: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(``prompt_embeddings``, this layout's config fields) of ``adapter``."""


class PromptTuningCodec(_VirtualTokenCodec):
    key = "PROMPT_TUNING"
    methods = ("prompt",)
    description = "PEFT prompt tuning (reading needs the base model)"

    def layout(self, embeddings: np.ndarray, count: int, token_dim: int, config: Mapping[str, Any],
               shapes: Mapping[str, list[int]], dims: ModelDims, context: Any) -> Layout:
        if tuple(embeddings.shape) != (count, token_dim):
            raise TensorFileError("prompt_embeddings disagrees with num_virtual_tokens and token_dim",
                                  file=context.tensors_file, location=TENSOR, expected=[count, token_dim],
                                  found=list(embeddings.shape), code="shape")
        path = find_input_embedding(shapes, dims)
        shape = list(shapes[path])
        if shape[1] != token_dim:
            raise BaseModelError("the adapter's token_dim differs from the base model's hidden size", location=path,
                                 expected=token_dim, found=shape[1], hint="is this the right base model?",
                                 code="wrong_base")
        targets = {path: {"kind": "embedding", "shape": shape}}
        tensors = {f"{path}.prompt.embeddings": np.ascontiguousarray(embeddings)}
        return targets, tensors, ({"num_virtual_tokens": count} if count != 20 else {})

    def embeddings(self, adapter: Adapter, count: int) -> tuple[np.ndarray, dict[str, Any]]:
        targets = adapter.targets
        if len(targets) != 1:
            raise FormatError("a prompt adapter has exactly one target (the input embedding)", location="$.targets",
                              found=sorted(targets), code="bad_target")
        (module, target), = targets.items()
        hidden = int(target["shape"][1])
        key = f"{module}.prompt.embeddings"
        embeddings = _tensor(adapter, key, (count, hidden))
        _check_only(adapter, {key})
        fields = {"num_virtual_tokens": count, "token_dim": hidden, "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
        return embeddings, fields


class PrefixTuningCodec(_VirtualTokenCodec):
    key = "PREFIX_TUNING"
    methods = ("prefix",)
    description = "PEFT prefix tuning, folded prefixes (reading needs the base model)"

    def layout(self, embeddings: np.ndarray, count: int, token_dim: int, config: Mapping[str, Any],
               shapes: Mapping[str, list[int]], dims: ModelDims, context: Any) -> Layout:
        file = context.config_file
        layers = _positive(config, "num_layers", file)
        heads = _positive(config, "num_attention_heads", file)
        if tuple(embeddings.shape) != (count, layers * 2 * token_dim):
            raise TensorFileError("prompt_embeddings disagrees with num_virtual_tokens, num_layers and token_dim",
                                  file=context.tensors_file, location=TENSOR, expected=[count, layers * 2 * token_dim],
                                  found=list(embeddings.shape), code="shape")
        mine = (dims.num_layers, dims.kv_heads, dims.kv_dim)
        if (layers, heads, token_dim) != mine:
            raise BaseModelError(
                "the adapter's layers / key-value heads / token_dim differ from the base model's", file=file,
                expected={"num_layers": mine[0], "num_attention_heads (kv heads)": mine[1], "token_dim": mine[2]},
                found={"num_layers": layers, "num_attention_heads": heads, "token_dim": token_dim},
                hint="is this the right base model?", code="wrong_base",
            )
        targets = prefix_targets(shapes, dims)
        tensors: dict[str, np.ndarray] = {}
        for plan in layer_plans(targets):
            start = 2 * plan.layer * token_dim
            tensors[plan.key] = np.ascontiguousarray(embeddings[:, start:start + token_dim])
            tensors[plan.value] = np.ascontiguousarray(embeddings[:, start + token_dim:start + 2 * token_dim])
        method_config: dict[str, Any] = {"num_virtual_tokens": count} if count != 20 else {}
        if config.get("prefix_projection"):
            method_config["prefix_projection"] = True
            size = config.get("encoder_hidden_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0 and size != token_dim:
                method_config["encoder_hidden_size"] = size
        return targets, tensors, method_config

    def embeddings(self, adapter: Adapter, count: int) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            plans = layer_plans(adapter.targets)
        except AdapterkitError as exc:
            raise FormatError(f"the prefix adapter's targets cannot be laid out for PEFT: {exc.message}",
                              location="$.targets", code="bad_target") from None
        width = plans[0].kv_dim
        blocks = []
        for plan in plans:
            blocks += [_tensor(adapter, plan.key, (count, width)), _tensor(adapter, plan.value, (count, width))]
        _check_only(adapter, {key for plan in plans for key in (plan.key, plan.value)})
        fields = {"num_virtual_tokens": count, "token_dim": width, "num_attention_heads": plans[0].heads,
                  "num_layers": len(plans), "encoder_hidden_size": adapter.config.get("encoder_hidden_size") or width,
                  # the tensor is the folded prefix, which PEFT reads directly (with True it would be the
                  # same in inference mode: PEFT only runs the MLP while training, and never saves it)
                  "prefix_projection": False, "init_weights": None}
        return np.concatenate(blocks, axis=1), fields


# ---- reading ------------------------------------------------------------------

def _positive(config: Mapping[str, Any], key: str, file: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FormatError(f"{key} must be a positive integer", file=file, location=f"$.{key}", found=value,
                          hint="fix adapter_config.json (PEFT itself could not load it)", code="bad_config")
    return value


def _prompt_embeddings(raw: Mapping[str, np.ndarray], file: str) -> np.ndarray:
    check_tensor_dims(raw, file)
    if set(raw) == {TENSOR}:
        return raw[TENSOR]
    mlp = {(_MLP_KEY.fullmatch(k) or [None, None])[1]: v for k, v in raw.items()}
    if None not in mlp and set(mlp) == _MLP:
        return _fold_mlp(mlp)
    raise FormatError(
        "unexpected tensors in a PEFT prompt-learning file", file=file, expected=[TENSOR], found=sorted(raw),
        hint="PeftModel.save_pretrained writes one tensor, prompt_embeddings", code="unknown_key",
    )


def _fold_mlp(mlp: Mapping[str, np.ndarray]) -> np.ndarray:
    """The prefix the reparameterisation MLP produces (float32, as PEFT computes it)."""
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in mlp.items()}
    hidden = np.tanh(f32["embedding.weight"] @ f32["transform.0.weight"].T + f32["transform.0.bias"])
    out = hidden @ f32["transform.2.weight"].T + f32["transform.2.bias"]
    return out.astype(np.asarray(mlp["embedding.weight"]).dtype, copy=False)


def _base_layout(base: Any) -> tuple[dict[str, list[int]], ModelDims, dict[str, Any]]:
    """(module path -> weight shape, dimensions, base_model fields) of the base model."""
    if base is None:
        raise FormatError("the base model is needed to read this adapter", hint=_BASE_HINT, code="needs_base")
    if isinstance(base, (str, Path)):
        base = read_base_model(base)
    if isinstance(base, BaseModelInfo):
        shapes = weight_shapes({key: w.shape for key, w in base.weights.items()})
        return shapes, model_dims(base.config), base_fields(base)
    if hasattr(base, "named_modules"):  # a live torch model
        from .prefix_module import weight_shapes as live_shapes

        config = getattr(base, "config", None)
        return live_shapes(base), model_dims(config or {}), base_fields(base)
    raise FormatError("base must be a model folder, a BaseModelInfo or a torch model", found=type(base).__name__,
                      code="needs_base")


# ---- writing ------------------------------------------------------------------

def _tensor(adapter: Adapter, key: str, shape: tuple[int, ...]) -> np.ndarray:
    array = adapter.tensors.get(key)
    if array is None:
        raise TensorFileError("adapter tensor missing", location=key, expected=list(shape), code="missing_tensor")
    if tuple(array.shape) != shape:
        raise TensorFileError("adapter tensor has the wrong shape", location=key, expected=list(shape),
                              found=list(array.shape), code="shape")
    return array


def _check_only(adapter: Adapter, keys: set[str]) -> None:
    extra = sorted(set(adapter.tensors) - keys)
    if extra:
        raise LossyConversionError("tensor has no place in a PEFT prompt-learning file and would be lost",
                                   location=extra[0], code="unsupported")
