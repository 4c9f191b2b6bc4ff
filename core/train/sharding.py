"""``adapterkit train --fsdp``: the frozen base sharded over the ranks with FSDP2, the adapter replicated.

Every rank holds a slice of each base parameter (``fully_shard``, one unit per
block of the model's stacks of repeated layers, plus the root for the
embeddings, the final norm and the head); a unit's full weights are
all-gathered for its forward and backward and freed again after. The adapter's
parameters are left out of the sharding (``ignored_params``): they stay plain,
replicated tensors, so their gradients travel in the one ``all_reduce`` of
:func:`adapterkit.core.train.dist.sync_gradients` exactly as in data-parallel
runs, and saving, the best-adapter snapshot, checkpoints and the divergence
check need nothing new. (Sharding the adapter too would save only its own bytes
and its optimizer state, small next to the base; FSDP's default gradient
reduction averages, where adapterkit's loss normalisation needs a plain sum.)

Consequences the loop honours (:mod:`.loop`): the all-gathers are collectives,
so every rank runs the same number of forward and backward passes (a rank whose
share of a micro-batch is empty runs a zero-weighted pass).

Blocks are found generically: every ``nn.ModuleList`` of two or more blocks of one
class that hold parameters (``model.layers``, ``transformer.h``, ``encoder.layer``...),
outermost lists only. A model without one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import UsageError
from adapterkit.core.train.dist import Dist

SHARDINGS = ("none", "ddp", "fsdp")


@dataclass
class Sharding:
    """How the base is held: ``kind`` (``none``, ``ddp`` or ``fsdp``) and the parameter bytes per rank."""

    kind: str
    base_bytes: int  # the base's parameters, unsharded
    base_bytes_per_rank: list[int] = field(default_factory=list)  # what each rank holds of them
    units: int = 0  # FSDP units (blocks + the root); 0 unless sharded

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sharding": self.kind, "base_bytes": self.base_bytes,
                               "base_bytes_per_rank": list(self.base_bytes_per_rank)}
        if self.units:
            out["fsdp_units"] = self.units
        return out


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of repeated blocks: (path, list), outermost lists only, in module order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue  # a list inside a block (experts, sub-layers): the block is the unit
        if len({type(block) for block in module}) != 1:
            continue
        if not all(next(block.parameters(), None) is not None for block in module):
            continue
        found.append((path, module))
    return found


def parameter_bytes(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole tensors) of ``params``; a DTensor holds its local shard."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for param in params:
        shard = param.to_local() if isinstance(param, DTensor) else param
        local += shard.numel() * shard.element_size()
        whole += param.numel() * param.element_size()  # a DTensor's numel is the global one
    return local, whole


def base_parameters(model: nn.Module, adapter: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    skip = {id(p) for p in adapter}
    return [p for p in model.parameters() if id(p) not in skip]


def shard_base(model: nn.Module, adapter: list[nn.Parameter], ctx: Dist) -> int:
    """Shard every parameter of ``model`` but ``adapter`` over the ranks (FSDP2); returns the number of units.

    Call it after injecting, freezing and enabling gradient checkpointing, and after the adapter was
    broadcast; ``model`` and the adapter must already be on ``ctx.device`` (FSDP does not move ignored
    parameters).
    """
    if ctx.world < 2:
        raise UsageError("--fsdp shards the base over the processes of a torchrun run, and this run has one process",
                         found=f"WORLD_SIZE={ctx.world}",
                         hint="start it with torchrun --nproc_per_node N -m adapterkit train ... --fsdp (N >= 2), "
                              "or drop --fsdp", code="fsdp_single_process")
    lists = block_lists(model)
    if not lists:
        raise UsageError(f"--fsdp found no stack of repeated layers in {type(model).__name__} to shard by "
                         "(an nn.ModuleList of two or more blocks of one class)",
                         hint="train this base without --fsdp (data-parallel under torchrun)", code="fsdp_no_layers")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    ignored = set(adapter)  # adapter stays whole on every rank: summed by dist.sync_gradients
    units = 0
    for _, blocks in lists:
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored)
            units += 1
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return units + 1


def describe(model: nn.Module, adapter: list[nn.Parameter], ctx: Dist, kind: str, units: int = 0) -> Sharding:
    """The base's bytes, whole and as held by each rank (a collective when ``ctx.world`` > 1)."""
    local, whole = parameter_bytes(base_parameters(model, adapter))
    per_rank = [local]
    if ctx.world > 1:
        import torch.distributed as dist

        mine = torch.tensor([local], dtype=torch.int64, device=ctx.device)
        gathered = [torch.zeros_like(mine) for _ in range(ctx.world)]
        dist.all_gather(gathered, mine)
        per_rank = [int(t.item()) for t in gathered]
    return Sharding(kind, whole, per_rank, units)
