"""The wrapper that serves many LoRA adapters from one module at once: stacked slots, one per adapter.

:class:`PoolLayer` keeps the original linear / Conv1D module as ``base_layer``
and adds preallocated, stacked weights (non-persistent buffers: they follow
``model.to(...)`` but never enter the model's ``state_dict``)::

    lora_A_slots [n_slots, r_max, in]     lora_B_slots [n_slots, out, r_max]

Slot 0 is all zeros and means "no adapter"; slots 1.. hold adapters, with the
scale (``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA) folded into B and a
rank below ``r_max`` padded with zeros (zero rows of A and columns of B add
exact zeros). Loading an adapter copies into its slot in place: shapes and
storage never change, so a ``torch.compile``-d model keeps its graph.

Which rows use which slot is set once per forward, for every layer, on a shared
:class:`Routing` object (the pool owns it); the layer reads it and adds
``x_row @ A[slot].T @ B[slot].T`` to each row's base output. Three kernels:

- *uniform*: every row has the same slot: two plain matmuls (nothing when slot 0);
- *gather* (BGMV-style, torch): ``A[index]`` / ``B[index]`` gathered per row, ``bmm`` and an
  in-place ``baddbmm_`` (the weights are materialised per row; four ops whatever the mix;
  static shapes). The CPU path, and the reference the Triton kernels are tested against;
- *triton*: the fused gather-matmul kernels of :mod:`adapterkit.core.runtime.lora_triton`
  (per-token BGMV for decode, slot-sorted SGMV for prefill: two launches per layer whatever
  the mix, no per-row weights materialised); on CUDA the pool runs them for the decode steps
  of a compiled (CUDA-graph) model, where they beat the gather path.

(The segment kernel, one matmul pair per adapter present in the batch, was retired: its
per-adapter loop collapsed as adapters grew, 8.6 s against the gather kernel's 0.61 s for 32
decoded tokens with 512 adapters on an H200; the SGMV kernel groups rows by adapter in one launch.)

Torch is imported by this module; the pool (``adapterkit.core.runtime.pool``) imports it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterkit.core.format.targeting import in_out_features
from adapterkit.core.runtime.modules import module_kind


@dataclass
class Routing:
    """Which slot each row of the current batch uses, shared by every layer of one pool.

    ``index`` (long ``[batch]``) is set for a routed call; ``uniform`` is the slot of
    every row when they all agree; otherwise a mixed batch runs the Triton kernels when its
    token rows number at most ``triton_tokens`` (0: never), else the torch gather kernel.
    With ``index`` None (a direct call of the model) every row uses ``default``. ``kernel``
    is the pool's choice (``auto``, ``gather``, ``triton``), read by the pool when it routes a
    batch. ``tokens`` caches the per-token index (and the slot-sorted groups) of the current
    call, keyed by sequence length.
    """

    default: int = 0
    index: torch.Tensor | None = None
    uniform: int | None = None
    triton_tokens: int = 0
    kernel: str = "auto"
    tokens: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)

    def clear(self) -> None:
        self.index, self.uniform, self.triton_tokens = None, None, 0
        self.tokens.clear()


class PoolLayer(nn.Module):
    """A linear or Conv1D module plus ``n_slots`` stacked LoRA slots (slot 0: no adapter)."""

    def __init__(self, base_layer: nn.Module, n_slots: int, r_max: int, routing: Routing,
                 dtype: torch.dtype | None = None):
        super().__init__()
        kind = module_kind(base_layer)
        if kind is None:
            raise TypeError(f"the adapter pool cannot wrap a {type(base_layer).__name__}")
        weight = base_layer.get_parameter("weight")
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = in_out_features(kind, tuple(weight.shape))
        if dtype is None:
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.n_slots, self.r_max = n_slots, r_max
        self.register_buffer("lora_A_slots", torch.zeros(n_slots, r_max, self.in_features, dtype=dtype,
                                                         device=weight.device), persistent=False)
        self.register_buffer("lora_B_slots", torch.zeros(n_slots, self.out_features, r_max, dtype=dtype,
                                                         device=weight.device), persistent=False)
        #: rank held by each slot (0: empty), used to skip the zero padding in eager kernels
        self.ranks = [0] * n_slots
        self.__dict__["routing"] = routing  # shared, not a submodule

    def __getattr__(self, name: str) -> Any:
        # Callers of the wrapped module (weight, bias, nf, in_features...) still find its attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ---- slots --------------------------------------------------------------
    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Copy ``a`` ``[r, in]`` and ``scale * b`` ``[out, r]`` into ``slot`` (None: clear it); same storage.

        Call it under ``torch.no_grad()`` (the pool does).
        """
        slot_a, slot_b = self.lora_A_slots[slot], self.lora_B_slots[slot]
        if a is None or b is None:
            if self.ranks[slot]:
                slot_a.zero_()
                slot_b.zero_()
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        if r < self.ranks[slot]:  # the old adapter's extra rank must not survive (an empty slot is zeros)
            slot_a[r:].zero_()
            slot_b[:, r:].zero_()
        slot_a[:r].copy_(a)
        slot_b[:, :r].copy_(b)
        if scale != 1.0:
            slot_b[:, :r].mul_(scale)
        self.ranks[slot] = r

    # ---- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self.routing
        if torch.compiler.is_compiling():  # static shapes, no Python-side branching on the batch
            if routing.index is None:
                return self._uniform(x, result, routing.default, self.r_max) if routing.default else result
            return self._mixed(x, result, routing)
        if routing.index is None:
            slot = routing.default
        elif x.shape[0] != routing.index.shape[0]:
            raise ValueError(f"the pool routes {routing.index.shape[0]} rows but this layer sees a batch of "
                             f"{x.shape[0]} (beam search or a flattened batch?): give one adapter name per row")
        elif routing.uniform is not None:
            slot = routing.uniform
        else:
            return self._mixed(x, result, routing)
        return self._uniform(x, result, slot, self.ranks[slot]) if slot and self.ranks[slot] else result

    def _mixed(self, x: torch.Tensor, result: torch.Tensor, routing: Routing) -> torch.Tensor:
        if routing.triton_tokens and x.numel() // self.in_features <= routing.triton_tokens:
            return self._triton(x, result, routing)
        return self._gather(x, result, routing.index)

    def _uniform(self, x: torch.Tensor, result: torch.Tensor, slot: int, r: int) -> torch.Tensor:
        a = self.lora_A_slots[slot, :r]
        b = self.lora_B_slots[slot, :, :r]
        hidden = nn.functional.linear(x.to(a.dtype), a)
        return _add_product(result, hidden, b)

    def _gather(self, x: torch.Tensor, result: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch = index.shape[0]
        a = self.lora_A_slots.index_select(0, index)  # [batch, r_max, in]
        b = self.lora_B_slots.index_select(0, index)  # [batch, out, r_max]
        hidden = torch.bmm(x.to(a.dtype).reshape(batch, -1, self.in_features), a.transpose(1, 2))
        if _may_add_in_place(result, a):
            result.view(batch, -1, self.out_features).baddbmm_(hidden, b.transpose(1, 2))  # no new output tensor
            return result
        delta = torch.bmm(hidden, b.transpose(1, 2))
        return result + delta.view(result.shape).to(result.dtype)

    def _triton(self, x: torch.Tensor, result: torch.Tensor, routing: Routing) -> torch.Tensor:
        from adapterkit.core.runtime import lora_triton

        index = routing.index
        tokens = x.to(self.lora_A_slots.dtype).reshape(-1, self.in_features)
        seq = tokens.shape[0] // index.shape[0]
        if torch.compiler.is_compiling():  # functional: the custom op returns a new tensor
            token_index = index.repeat_interleave(seq) if seq != 1 else index
            out = torch.ops.adapterkit.lora_add(tokens, self.lora_A_slots, self.lora_B_slots, token_index,
                                                result.reshape(-1, self.out_features))
            return out.view(result.shape)
        cached = routing.tokens.get(seq)
        if cached is None:  # once per forward and sequence length, shared by every layer
            token_index = index.repeat_interleave(seq) if seq != 1 else index
            groups = (lora_triton.SlotGroups.build(token_index, self.n_slots)
                      if lora_triton.family(token_index.shape[0]) == "sgmv" else None)
            cached = routing.tokens[seq] = (token_index, groups)
        in_place = result.is_contiguous() and not (result.requires_grad and torch.is_grad_enabled())
        out = result if in_place else result.contiguous().clone()  # the kernel adds in y's own dtype
        lora_triton.lora_add_(tokens, self.lora_A_slots, self.lora_B_slots, cached[0],
                              out.view(-1, self.out_features), groups=cached[1])
        return out

    def extra_repr(self) -> str:
        used = sum(1 for r in self.ranks[1:] if r)
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, "
                f"slots={self.n_slots - 1} ({used} used), r_max={self.r_max}")


def _add_product(result: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``result + hidden @ b.T``, accumulated in place (one GEMM, no new tensor) when the layout allows."""
    if _may_add_in_place(result, hidden):
        result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), b.t())
        return result
    return result + nn.functional.linear(hidden, b).to(result.dtype)


def _may_add_in_place(result: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether the base output may take the update in place: eager, no autograd on it, same dtype, contiguous."""
    return (result.dtype == like.dtype and result.is_contiguous() and not torch.compiler.is_compiling()
            and not (result.requires_grad and torch.is_grad_enabled()))


# ---- model-level helpers ----------------------------------------------------

def pool_layers(model: nn.Module) -> list[tuple[str, PoolLayer]]:
    """(path, layer) of every pool wrapper in ``model``."""
    return [(path, module) for path, module in model.named_modules() if isinstance(module, PoolLayer)]
