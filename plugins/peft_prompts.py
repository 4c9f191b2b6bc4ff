"""PEFT prompt-tuning and prefix-tuning folders <-> adapterkit ``prompt`` / ``prefix`` adapters.

Called by the PEFT format plugin (``plugins/peft``) for folders whose
``adapter_config.json`` says ``peft_type`` PROMPT_TUNING or PREFIX_TUNING,
and for adapters of those two methods when writing. Torch-free (a
``adapter_model.bin`` is read through the PEFT plugin's weights-only loader).

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

PEFT records no module paths, so reading needs the base model (a local folder,
read from config.json and safetensors headers only, or a live model) to name
the input embedding and the key/value projections. Encoder-decoder adapters
(``num_transformer_submodules`` 2) are refused: adapterkit's methods cover
decoder-only and encoder-only models.

Integration (``plugins/peft/__init__.py``, ``PeftFormat``): ``detect`` is
``_detect.detect(path) or peft_prompts.detect(path)``; ``read`` returns
``peft_prompts.read(path, base=options.get("base"))`` when
``peft_prompts.detect(path)``, before the LoRA reader (which refuses other
``peft_type`` values); ``write`` calls ``peft_prompts.write(adapter, path)``
when ``adapter.method in peft_prompts.METHODS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit.core import safetensors_io
from adapterkit.core.adapter import Adapter
from adapterkit.core.base_model import BaseModelInfo, read_base_model, targets_fingerprint
from adapterkit.core.errors import AdapterkitError, BaseModelError, FormatError, LossyConversionError, TensorFileError
from adapterkit.core.io import atomic_write_bytes, read_json
from adapterkit.core.manifest import Manifest
from adapterkit.plugins.prefix_tuning.layout import layer_plans, prefix_targets
from adapterkit.plugins.prompt_tuning.layout import ModelDims, find_input_embedding, model_dims, weight_shapes

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TENSOR = "prompt_embeddings"
#: PEFT peft_type -> adapterkit method
PEFT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
#: adapterkit methods this module writes
METHODS = frozenset(PEFT_TYPES.values())
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_MLP_KEY = re.compile(r"(?:.*\.)?(embedding\.weight|transform\.[02]\.(?:weight|bias))")
_BASE_HINT = ("PEFT prompt/prefix folders do not record module paths or the vocabulary size: pass the base model "
              "(base=<local model folder or model>, --base on the command line)")


# ---- detection --------------------------------------------------------------

def handles(config: Any) -> bool:
    """Whether a parsed ``adapter_config.json`` is a PEFT prompt- or prefix-tuning config."""
    return isinstance(config, dict) and config.get("peft_type") in PEFT_TYPES


def detect(path: str | Path) -> bool:
    """True for a folder holding a PEFT prompt- or prefix-tuning adapter. Never raises."""
    try:
        folder = _folder(Path(path))
        return (folder / CONFIG_NAME).is_file() and _weights(folder) is not None and handles(read_json(folder / CONFIG_NAME))
    except Exception:
        return False


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) else path


def _weights(folder: Path) -> Path | None:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


# ---- reading ------------------------------------------------------------------

def read(path: str | Path, base: Any = None) -> Adapter:
    """The adapter in a PEFT prompt/prefix folder, laid out for ``base``.

    :param base: a local Hugging Face model folder, a :class:`BaseModelInfo`, or a
        live transformers model: the model the adapter was made for.
    """
    folder = _folder(Path(path))
    config_path = folder / CONFIG_NAME
    file = str(config_path)
    config = read_json(config_path)
    if not handles(config):
        raise FormatError("is not a PEFT prompt- or prefix-tuning config", file=file, location="$.peft_type",
                          expected=sorted(PEFT_TYPES), found=config.get("peft_type") if isinstance(config, dict) else None,
                          code="unsupported")
    method = PEFT_TYPES[config["peft_type"]]
    count, token_dim = _positive(config, "num_virtual_tokens", file), _positive(config, "token_dim", file)
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1 or config.get("task_type") == "SEQ_2_SEQ_LM":
        raise LossyConversionError(
            "encoder-decoder prompt learning (num_transformer_submodules 2, SEQ_2_SEQ_LM) is not supported: "
            "the decoder's half of the virtual tokens would be lost", file=file, location="$.num_transformer_submodules",
            expected=1, found=submodules, hint="use the adapter with PEFT directly", code="unsupported",
        )
    tensors_path = _weights(folder)
    if tensors_path is None:
        raise FormatError("no adapter_model.safetensors or adapter_model.bin beside adapter_config.json",
                          file=str(folder), code="missing_file")
    embeddings = _prompt_embeddings(tensors_path)
    dtype = _DTYPES.get(safetensors_io.dtype_name(embeddings))
    if dtype is None or embeddings.ndim != 2:
        raise TensorFileError("prompt_embeddings must be a 2-D floating-point tensor", file=str(tensors_path),
                              location=TENSOR, found=f"{embeddings.dtype} {list(embeddings.shape)}", code="bad_dtype")
    shapes, dims, info = _base_layout(base)
    if method == "prompt":
        targets, tensors, method_config = _prompt(embeddings, count, token_dim, shapes, dims, str(tensors_path))
    else:
        targets, tensors, method_config = _prefix(embeddings, count, token_dim, config, shapes, dims, str(tensors_path), file)
    from adapterkit.plugins.peft.detect import TASKS

    base_model = {"fingerprint": targets_fingerprint(targets), **info}
    for field, key in (("name", "base_model_name_or_path"), ("revision", "revision")):
        if isinstance(config.get(key), str) and config[key]:
            base_model.setdefault(field, config[key])
    manifest = Manifest(
        method=method, config=method_config, targets=targets, dtype=dtype, base_model=base_model,
        task=TASKS.get(config.get("task_type")) if isinstance(config.get("task_type"), str) else None,
        provenance={"converted_from": {"format": "peft", "config": config}},
    )
    return Adapter(manifest, tensors, source=folder, source_format="peft")


def _positive(config: Mapping[str, Any], key: str, file: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FormatError(f"{key} must be a positive integer", file=file, location=f"$.{key}", found=value,
                          hint="fix adapter_config.json (PEFT itself could not load it)", code="bad_config")
    return value


def _prompt_embeddings(path: Path) -> np.ndarray:
    if path.name == BIN_NAME:
        from adapterkit.plugins.peft.reader import _load_bin

        raw = _load_bin(path)
    else:
        raw = safetensors_io.load(path)[0]
    if set(raw) == {TENSOR}:
        return raw[TENSOR]
    mlp = {(_MLP_KEY.fullmatch(k) or [None, None])[1]: v for k, v in raw.items()}
    if None not in mlp and set(mlp) == {"embedding.weight", "transform.0.weight", "transform.0.bias",
                                        "transform.2.weight", "transform.2.bias"}:
        return _fold_mlp(mlp)
    raise FormatError(
        "unexpected tensors in a PEFT prompt-learning file", file=str(path), expected=[TENSOR], found=sorted(raw),
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
        info = {"model_type": base.model_type, "architecture": base.architecture}
        return shapes, model_dims(base.config), {k: v for k, v in info.items() if v}
    if hasattr(base, "named_modules"):  # a live torch model
        from adapterkit.plugins.prefix_tuning.module import weight_shapes as live_shapes

        config = getattr(base, "config", None)
        archs = getattr(config, "architectures", None) or [type(base).__name__]
        info = {"model_type": getattr(config, "model_type", None), "architecture": archs[0]}
        return live_shapes(base), model_dims(config or {}), {k: v for k, v in info.items() if v}
    raise FormatError("base must be a model folder, a BaseModelInfo or a torch model", found=type(base).__name__,
                      code="needs_base")


def _prompt(embeddings: np.ndarray, count: int, token_dim: int, shapes: Mapping[str, list[int]], dims: ModelDims,
            file: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    if tuple(embeddings.shape) != (count, token_dim):
        raise TensorFileError("prompt_embeddings disagrees with num_virtual_tokens and token_dim", file=file,
                              location=TENSOR, expected=[count, token_dim], found=list(embeddings.shape), code="shape")
    path = find_input_embedding(shapes, dims)
    shape = list(shapes[path])
    if shape[1] != token_dim:
        raise BaseModelError("the adapter's token_dim differs from the base model's hidden size", location=path,
                             expected=token_dim, found=shape[1], hint="is this the right base model?", code="wrong_base")
    targets = {path: {"kind": "embedding", "shape": shape}}
    tensors = {f"{path}.prompt.embeddings": np.ascontiguousarray(embeddings)}
    return targets, tensors, ({"num_virtual_tokens": count} if count != 20 else {})


def _prefix(embeddings: np.ndarray, count: int, token_dim: int, config: Mapping[str, Any],
            shapes: Mapping[str, list[int]], dims: ModelDims, tensors_file: str,
            file: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    layers = _positive(config, "num_layers", file)
    heads = _positive(config, "num_attention_heads", file)
    if tuple(embeddings.shape) != (count, layers * 2 * token_dim):
        raise TensorFileError("prompt_embeddings disagrees with num_virtual_tokens, num_layers and token_dim",
                              file=tensors_file, location=TENSOR, expected=[count, layers * 2 * token_dim],
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


# ---- writing ------------------------------------------------------------------

def write(adapter: Adapter, path: str | Path) -> None:
    """Write a ``prompt`` or ``prefix`` adapter as a PEFT folder PeftModel.from_pretrained loads."""
    manifest = adapter.manifest
    if manifest.method not in METHODS:
        raise LossyConversionError(f"this writer handles prompt and prefix adapters, not {manifest.method!r}",
                                   location="$.method.name", expected=sorted(METHODS), found=manifest.method,
                                   code="unsupported")
    count = int(manifest.config.get("num_virtual_tokens", 20))
    if manifest.method == "prompt":
        embeddings, fields = _prompt_out(adapter, count)
    else:
        embeddings, fields = _prefix_out(adapter, count)
    from adapterkit.plugins.peft.detect import peft_task_type

    source = manifest.provenance.get("converted_from") or {}
    original = dict(source["config"]) if source.get("format") == "peft" and isinstance(source.get("config"), dict) else {}
    if original.get("peft_type") != fields["peft_type"]:
        original = {}
    task_type = peft_task_type(manifest.task, original.get("task_type"))
    config = {
        "auto_mapping": None, "modules_to_save": None, "num_attention_heads": None, "num_layers": None,
        **original, **fields,
        "task_type": task_type, "inference_mode": True, "num_transformer_submodules": 1,
        "base_model_name_or_path": manifest.base_model.get("name", original.get("base_model_name_or_path")),
        "revision": manifest.base_model.get("revision", original.get("revision")),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    safetensors_io.save(path / SAFETENSORS_NAME, {TENSOR: np.ascontiguousarray(embeddings)}, {"format": "pt"})


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


def _prompt_out(adapter: Adapter, count: int) -> tuple[np.ndarray, dict[str, Any]]:
    targets = adapter.targets
    if len(targets) != 1:
        raise FormatError("a prompt adapter has exactly one target (the input embedding)", location="$.targets",
                          found=sorted(targets), code="bad_target")
    (module, target), = targets.items()
    hidden = int(target["shape"][1])
    key = f"{module}.prompt.embeddings"
    embeddings = _tensor(adapter, key, (count, hidden))
    _check_only(adapter, {key})
    fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": count, "token_dim": hidden,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    return embeddings, fields


def _prefix_out(adapter: Adapter, count: int) -> tuple[np.ndarray, dict[str, Any]]:
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
    config = adapter.config
    fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": count, "token_dim": width,
              "num_attention_heads": plans[0].heads, "num_layers": len(plans),
              "encoder_hidden_size": config.get("encoder_hidden_size") or width,
              # the tensor is the folded prefix, which PEFT reads directly (with True it would be the
              # same in inference mode: PEFT only runs the MLP while training, and never saves it)
              "prefix_projection": False, "init_weights": None}
    return np.concatenate(blocks, axis=1), fields
