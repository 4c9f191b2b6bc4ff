"""Batches that name more distinct adapters than the pool has device slots: rows split, served, put back in order.

The pool plans the sub-batches (:func:`adapterkit.core.runtime.residency.plan_sub_batches`);
this module cuts the arguments by rows (:func:`take_rows`), checks what cannot be split by
rows (:func:`check_wide_forward`, :func:`check_wide_generate`), and reassembles the outputs
in the original row order (:func:`reassemble`, :func:`merge_sequences`). Docs: docs/runtime.md,
"Wide batches".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adapterkit.core.errors import UsageError

#: generate options whose output does not split by rows (or that multiply the rows)
WIDE_GENERATE_REFUSED = ("streamer", "return_dict_in_generate", "output_scores", "output_logits",
                         "output_attentions", "output_hidden_states", "assistant_model")


def _too_wide(what: str, distinct: int, capacity: int, hint: str) -> UsageError:
    return UsageError(f"{what} with {distinct} distinct adapters, more than the pool's max_adapters={capacity} "
                      "device slots, is served in sub-batches", hint=hint, code="wide_batch")


def check_wide_forward(kwargs: Mapping[str, Any], distinct: int, capacity: int) -> None:
    """Refuse the forward options whose result cannot be put back together from sub-batches."""
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise _too_wide("a forward with a KV cache", distinct, capacity,
                        "each sub-batch would have its own cache: pass use_cache=False, name at most max_adapters "
                        "distinct adapters per batch, or use pool.generate (which serves each sub-batch with its "
                        "own cache)")
    if kwargs.get("labels") is not None:
        raise _too_wide("a forward with labels", distinct, capacity,
                        "the batch's mean loss cannot be rebuilt from the sub-batches' losses: compute the loss from "
                        "the logits, or make the pool with a larger max_adapters")


def check_wide_generate(kwargs: Mapping[str, Any], distinct: int, capacity: int) -> None:
    """Refuse the generate options whose output does not split by rows."""
    refused = [key for key in WIDE_GENERATE_REFUSED if kwargs.get(key)]
    if kwargs.get("num_beams", 1) > 1:
        refused.append("num_beams > 1")
    if kwargs.get("num_return_sequences", 1) > 1:
        refused.append("num_return_sequences > 1")
    if refused:
        raise _too_wide(f"generate with {', '.join(refused)}", distinct, capacity,
                        "drop those options, name at most max_adapters distinct adapters per call, or make the pool "
                        "with a larger max_adapters")


def take_rows(args: Sequence[Any], kwargs: Mapping[str, Any], rows: list[int],
              total: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Every tensor argument whose first dimension is the batch (``total`` rows), restricted to ``rows``."""
    index: dict[torch.device, torch.Tensor] = {}

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == total:
            idx = index.get(value.device)
            if idx is None:
                idx = index[value.device] = torch.tensor(rows, dtype=torch.long, device=value.device)
            return value.index_select(0, idx)
        return value

    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def reassemble(parts: list[tuple[list[int], Any]], total: int) -> Any:
    """The sub-batches' outputs as one output, rows in the original order.

    A tensor whose first dimension is the sub-batch (logits, hidden states, tuples of them) is
    scattered into a full-batch tensor; anything else (the cache, which a wide forward does
    not return) becomes None. A model output keeps its class.
    """
    rows_list = [rows for rows, _ in parts]
    outputs = [out for _, out in parts]

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == len(rows_list[0]):
            full = first.new_empty((total, *first.shape[1:]))
            for value, rows in zip(values, rows_list):
                full.index_copy_(0, torch.tensor(rows, device=value.device), value)
            return full
        if isinstance(first, tuple) and first and all(isinstance(v, torch.Tensor) for v in first):
            return tuple(merge([value[i] for value in values]) for i in range(len(first)))
        return None

    first = outputs[0]
    if isinstance(first, (torch.Tensor, tuple)):
        return merge(outputs)
    if isinstance(first, Mapping):  # a transformers ModelOutput (an ordered dict)
        merged = {key: merge([out[key] for out in outputs]) for key in first.keys()}
        return first.__class__(**{k: v for k, v in merged.items() if v is not None})
    raise TypeError(f"cannot put a {type(first).__name__} back together from sub-batches")


def merge_sequences(parts: list[tuple[list[int], torch.Tensor]], total: int, pad: int) -> torch.Tensor:
    """``generate`` outputs of the sub-batches in row order, shorter ones right-padded with ``pad``.

    That is what ``generate`` itself does for rows that finish before the others.
    """
    width = max(out.shape[1] for _, out in parts)
    first = parts[0][1]
    result = torch.full((total, width), int(pad), dtype=first.dtype, device=first.device)
    for rows, out in parts:
        result[torch.tensor(rows, device=out.device), :out.shape[1]] = out
    return result


def pad_token(model: Any, kwargs: Mapping[str, Any]) -> int:
    """The pad id a wide ``generate`` pads with: ``pad_token_id``, else the (first) EOS id."""
    config = getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    if pad is None:
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if pad is None:
        raise UsageError("a generate call wider than the pool's device slots needs a pad token to pad the sub-batches "
                         "that finish first", hint="pass pad_token_id=...", code="wide_batch")
    return int(pad if not isinstance(pad, torch.Tensor) else pad.item())
