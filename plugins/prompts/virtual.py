"""Shared torch plumbing of virtual-token methods (prompt and prefix tuning).

Both methods work from a forward pre-hook on the top model (the module passed
to ``inject``): the call is rewritten before the model sees it, so
``model(...)``, training loops and ``model.generate()`` all go through it.

Bookkeeping in the KV cache: a cache that holds virtual tokens is marked with
how many each method put there (``MARK`` attribute: ``{"prefix": n, "prompt": n}``),
so a later call that continues from it (a decode step of ``generate``, or a
user passing ``outputs.cache`` back) extends the attention mask by the same
count instead of adding the virtual tokens a second time.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from adapterkit.core.errors import UsageError

MARK = "adapterkit_virtual_tokens"


@functools.lru_cache(maxsize=64)
def _signature(forward: Any) -> inspect.Signature:
    return inspect.signature(forward)


def bind_call(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as keywords only (positional ones named after ``module.forward``)."""
    if not args:
        return dict(kwargs)
    signature = _signature(type(module).forward)
    bound = signature.bind_partial(module, *args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name, value in bound.items():
        if name == "self":
            continue
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise UsageError(f"{type(module).__name__}.forward got unexpected positional arguments",
                                 hint="pass them by keyword", code="bad_call")
        else:
            out[name] = value
    return out


def cache_keyword(module: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older), as ``module.forward`` names it."""
    params = _signature(type(module).forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def take_cache(module: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """(keyword, cache) of the call; a cache passed under the other name moves to the right one."""
    name = cache_keyword(module)
    other = "past_key_values" if name == "cache" else "cache"
    cache = kwargs.get(name)
    if cache is None and kwargs.get(other) is not None:
        cache = kwargs.pop(other)
        kwargs[name] = cache
    if cache is not None and not hasattr(cache, "get_seq_length"):
        raise UsageError(
            f"virtual-token adapters need a transformers Cache object, got a {type(cache).__name__}",
            hint="pass a transformers.DynamicCache (legacy tuple caches are not supported)", code="bad_cache",
        )
    return name, cache


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def marks(cache: Any) -> dict[str, int]:
    """Virtual tokens held by ``cache``, by method (empty for a cache adapterkit did not fill)."""
    return dict(getattr(cache, MARK, None) or {}) if cache is not None else {}


def mark(cache: Any, method: str, count: int) -> None:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    table = dict(getattr(cache, MARK, None) or {})
    table[method] = count
    try:
        setattr(cache, MARK, table)
    except AttributeError:  # a cache class with __slots__: continuing from it will be refused, not wrong
        pass


def inputs_shape(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(batch, sequence length) of the call's ``input_ids`` or ``inputs_embeds``.

    The sizes are returned as the tensor gives them, never through ``int()``: under
    ONNX / torch.export tracing they are symbolic, and ``int()`` would fix the traced
    batch size into the exported graph.
    """
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[0], embeds.shape[1]
    if ids is not None:
        return ids.shape[0], ids.shape[-1]
    raise UsageError("the call has neither input_ids nor inputs_embeds", code="bad_call")


def prepend_ones(mask: Any, count: int, what: str) -> Any:
    """A 2-D attention mask with ``count`` ones on the left (None stays None: every position attends)."""
    if mask is None or count == 0:
        return mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise UsageError(
            f"{what} extends 2-D attention masks only, got "
            f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else f'a {mask.dim()}-D mask'}",
            hint="pass a [batch, length] mask of ones and zeros (and a DynamicCache when generating)", code="bad_mask",
        )
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    return torch.cat((ones, mask), dim=1)


def extend_continuing_mask(mask: Any, count: int, past: int, query: int, what: str) -> Any:
    """The mask of a call continuing from a cache that holds ``count`` virtual tokens of this method.

    A mask that already spans the whole cache plus the query is kept as it is.
    """
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] >= past + query:
        return mask
    return prepend_ones(mask, count, what)


def shift_positions(position_ids: Any, count: int) -> Any:
    return position_ids + count if isinstance(position_ids, torch.Tensor) else position_ids


def model_dtype(model: torch.nn.Module, fallback: torch.Tensor) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else fallback.dtype


def strip_outputs(output: Any, count: int, total: int) -> Any:
    """Drop the first ``count`` positions of every per-token output (logits, hidden states).

    A 3-D tensor whose second dimension is ``total`` (virtual + real tokens) is
    per-token; pooled outputs, losses, attentions and the cache are left alone.
    """
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == total:
            return value[:, count:]
        if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(cut(v) for v in value)
        return value

    if output is None or count == 0:
        return output
    keys = getattr(output, "keys", None)
    if callable(keys):  # a transformers ModelOutput (or a dict)
        for key in list(keys()):
            if key in ("attentions", "cross_attentions", "cache", "past_key_values", "loss"):
                continue
            output[key] = cut(output[key])
        return output
    if isinstance(output, tuple):
        return tuple(cut(v) for v in output)
    return cut(output)


def check_no_checkpointing(model: torch.nn.Module, what: str) -> None:
    """Prefix tuning rides on the KV cache, which transformers drops under gradient checkpointing."""
    if model.training and torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
        raise UsageError(
            f"{what} needs the KV cache, which transformers disables under gradient checkpointing "
            "(the prefix would silently be dropped)",
            hint="call model.gradient_checkpointing_disable() while training a prefix adapter", code="checkpointing",
        )
