"""The torch side of prompt tuning: learned virtual-token embeddings prepended to the input embeddings.

:class:`PromptTuning` is registered as the child ``adapterkit_prompt`` of the
top model (so ``.to()``, ``parameters()`` and ``train()`` reach it) and holds
each named adapter's embeddings ``[num_virtual_tokens, hidden]`` in a
``ParameterDict``. Two hooks on the top model do the work:

- before ``forward``: on a first call (no cache, or a cache without this
  method's tokens), ``input_ids`` become ``inputs_embeds`` with the prompts of
  every enabled adapter prepended (in injection order); the attention mask gets
  ones on the left, ``labels`` get -100, ``token_type_ids`` zeros, and given
  ``position_ids`` become ``[0 .. n-1, position_ids + n]``. A call continuing
  from a cache that already holds the prompt only extends the mask and shifts
  the positions by ``n``.
- after ``forward``: per-token outputs (logits, hidden states) lose the ``n``
  virtual positions, so they line up with the caller's tokens and have the base
  model's shape. The loss is computed inside the model on the full sequence
  (virtual positions labelled -100): PEFT's loss. Attentions keep them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import UsageError

from . import virtual

CHILD = "adapterkit_prompt"
METHOD = "prompt"


class PromptTuning(nn.Module):
    """The prompts of every prompt-tuning adapter of one model, and the hooks that use them."""

    def __init__(self, embedding_path: str):
        super().__init__()
        self.embedding_path = embedding_path
        self.embeddings = nn.ParameterDict()
        self.enabled = True
        self._calls: list[tuple[int, int]] = []  # (virtual tokens prepended, total length) per running call
        self._handles: list[Any] = []

    # ---- life cycle -----------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def add(self, name: str, prompt: torch.Tensor) -> None:
        self.embeddings[name] = nn.Parameter(prompt)

    @property
    def num_virtual_tokens(self) -> int:
        return sum(p.shape[0] for p in self.embeddings.values())

    def prompts(self) -> torch.Tensor:
        """Every adapter's prompt, concatenated in injection order: ``[n, hidden]``."""
        values = list(self.embeddings.values())
        return values[0] if len(values) == 1 else torch.cat(values, dim=0)

    # ---- hooks ------------------------------------------------------------------
    def _before(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.enabled or not len(self.embeddings):
            self._calls.append((0, 0))
            return None
        kwargs = virtual.bind_call(model, args, kwargs)
        _, cache = virtual.take_cache(model, kwargs)
        count = self.num_virtual_tokens
        batch, length = virtual.inputs_shape(kwargs)
        past, held = virtual.cache_length(cache), virtual.marks(cache)
        if METHOD in held:  # continuing: the cache already holds the prompt
            kwargs["attention_mask"] = virtual.extend_continuing_mask(
                kwargs.get("attention_mask"), held[METHOD], past, length, "prompt tuning")
            kwargs["position_ids"] = virtual.shift_positions(kwargs.get("position_ids"), held[METHOD])
            self._calls.append((0, 0))
            return (), kwargs
        if past != held.get("prefix", 0):
            raise UsageError(
                "the cache holds tokens that were not run through this prompt-tuning adapter",
                hint="start from an empty cache (or the cache a call of this model returned)", code="bad_cache",
            )
        self._prepend(model, kwargs, batch, count)
        virtual.mark(cache, METHOD, count)
        self._calls.append((count, count + length))
        return (), kwargs

    def _prepend(self, model: nn.Module, kwargs: dict[str, Any], batch: int, count: int) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_submodule(self.embedding_path)(kwargs["input_ids"])
        prompts = self.prompts().to(device=embeds.device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts.unsqueeze(0).expand(batch, -1, -1), embeds), dim=1)
        kwargs["input_ids"] = None
        kwargs["attention_mask"] = virtual.prepend_ones(kwargs.get("attention_mask"), count, "prompt tuning")
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            pad = torch.full((labels.shape[0], count), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat((pad, labels), dim=1)
        types = kwargs.get("token_type_ids")
        if isinstance(types, torch.Tensor):
            kwargs["token_type_ids"] = torch.cat((types.new_zeros(types.shape[0], count), types), dim=1)
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor):
            head = torch.arange(count, dtype=positions.dtype, device=positions.device)
            head = head.expand(*positions.shape[:-1], count)
            kwargs["position_ids"] = torch.cat((head, positions + count), dim=-1)

    def _after(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        count, total = self._calls.pop() if self._calls else (0, 0)
        if count == 0 or output is None:
            return None
        values = list(output.values()) if callable(getattr(output, "keys", None)) else output
        for value in values if isinstance(values, (tuple, list)) else ():
            if hasattr(value, "get_seq_length"):  # the cache the model made: it holds the prompt now
                virtual.mark(value, METHOD, count)
        return virtual.strip_outputs(output, count, total)


# ---- helpers used by the method ------------------------------------------------

def prompt_tuning(model: nn.Module) -> PromptTuning | None:
    child = getattr(model, CHILD, None)
    return child if isinstance(child, PromptTuning) else None


def embedding_path(model: nn.Module) -> str:
    """The module path of ``model.get_input_embeddings()``."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        raise UsageError(f"{type(model).__name__} has no input embeddings (get_input_embeddings())",
                         hint="prompt tuning needs a transformers model that accepts inputs_embeds", code="bad_model")
    for path, module in model.named_modules():
        if module is embedding and path:
            return path
    raise UsageError("the input embedding is not a sub-module of the model", code="bad_model")


def init_prompt(embedding: nn.Module, config: dict[str, Any], count: int) -> torch.Tensor:
    """A new prompt ``[count, hidden]`` (float32) initialised as ``config["init"]`` says (PEFT's rules)."""
    weight = embedding.weight
    hidden, vocab = int(weight.shape[1]), int(weight.shape[0])
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    init = config["init"]
    if init == "random":
        return torch.randn(count, hidden, dtype=dtype, device=weight.device)
    if init == "sample_vocab":
        ids = torch.randint(0, vocab, (count,), dtype=torch.long)
    else:
        text = list(config["init_text_ids"])
        bad = [i for i in text if i >= vocab]
        if bad:
            raise UsageError("init_text_ids holds token ids outside the vocabulary", location="$.method.config.init_text_ids",
                             expected=f"ids < {vocab}", found=bad[:5], code="bad_config")
        ids = torch.tensor((text * math.ceil(count / len(text)))[:count], dtype=torch.long)
    with torch.no_grad():
        return embedding(ids.to(weight.device)).detach().clone().to(dtype)
