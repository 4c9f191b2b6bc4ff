"""Data-parallel plumbing for ``adapterkit train``: one process per device, started by torchrun.

``torchrun --nproc_per_node N -m adapterkit train ...`` sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous; :func:`setup` joins the group
(gloo on CPU, NCCL on CUDA) unless the caller already initialised one.

Gradient sync is done by hand, not by ``DistributedDataParallel``: after the
micro-batches of one optimizer step, the adapter's gradients (small: the base
is frozen) are flattened and summed across ranks in one ``all_reduce``. Each
rank's loss is already divided by the token count of the *global* batch, so
the sum is exactly the gradient of the single-process loss, whatever the split
of rows or tokens between ranks (DDP averages per-rank means instead, which
differs when ranks hold different token counts, and it cannot serve a rank
whose share of a short last batch is empty).

Leaving the group is as careful as joining it. A gloo group runs its collectives
on worker threads, and a worker drops its reference to a finished collective (and
with it the tensors, which takes the GIL) just after the waiting rank is woken: a
process that ends right after its last collective can reach interpreter shutdown
first, and the worker then aborts the process ("terminate called without an
active exception", exit -6; seen on rank 1 while rank 0 was still saving).
:func:`finish` ends a run with a barrier (whose work holds no tensors), and
:func:`teardown` frees the group so that its threads are joined before the
process exits (:func:`_release_group`).
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from adapterkit.core.errors import AdapterkitError, UsageError


@dataclass
class Dist:
    """This process's place in the group (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.world > 1 else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise UsageError(f"environment variable {name} is not an integer", found=value, code="bad_env") from None


def setup(device: str = "auto") -> Dist:
    """Join the process group named by torchrun's environment (or use one already initialised)."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError("device must be auto, cpu or cuda", found=device, code="bad_option")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device", code="no_cuda")
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if world > 1:
            if not dist.is_available():  # pragma: no cover - every official torch build has it
                raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed", code="no_dist")
            if use_cuda:
                torch.cuda.set_device(local_rank)
            _bind_defaults_before_the_group()
            try:
                dist.init_process_group("nccl" if use_cuda else "gloo")
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"WORLD_SIZE is {world} but joining the process group failed: {exc}",
                                 hint="start data-parallel runs with torchrun (docs/training.md)",
                                 code="no_process_group") from None
            owns = True
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return Dist(rank, world, local_rank, target, owns)


def _bind_defaults_before_the_group() -> None:
    """Import ``torch.distributed.nn`` before the group exists (transformers imports it while loading a model).

    Its functions take ``group=group.WORLD`` as a default argument, evaluated at import: imported after
    ``init_process_group`` they keep the group alive for the life of the process, and destroying it then
    cannot stop its threads.
    """
    import torch.distributed.nn  # noqa: F401


def _release_group() -> None:
    """Drop the references torch itself keeps to a destroyed group, so that it is freed and its threads joined.

    FSDP's sharded parameters are DTensors; DTensor's sharding propagation caches hold their specs, and
    through the device mesh, the group. Clearing them (with the helper torch keeps for that in
    ``torch.distributed.tensor.debug``) and collecting lets the group go.
    """
    if "torch.distributed.tensor" in sys.modules:
        try:
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache
        except ImportError:  # pragma: no cover - a torch without it keeps the caches; finish()'s barrier still holds
            pass
        else:
            _clear_sharding_prop_cache()
    gc.collect()


def finish(ctx: Dist) -> None:
    """Every rank has ended its last collective before any returns (the end of a successful run)."""
    if ctx.world > 1:
        dist.barrier()


def teardown(ctx: Dist) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _release_group()


def all_reduce_sum(ctx: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_gradients(ctx: Dist, params: list[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient and ``extra`` over the ranks, in one all_reduce.

    A rank without a gradient for a parameter (its share of the batch was empty) adds zeros; a parameter that no
    rank has a gradient for keeps ``grad = None``, as in a single process, so the optimizer skips it there too.
    """
    if ctx.world == 1:
        return extra
    dtype = params[0].dtype
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=dtype)
             for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device, dtype=dtype)
    flat = torch.cat([*parts, has_grad, extra.to(dtype).reshape(-1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param in params:
        chunk = flat[offset:offset + param.numel()].view_as(param)
        if param.grad is None:
            param.grad = chunk.clone()
        else:
            param.grad.copy_(chunk)
        offset += param.numel()
    for param, flag in zip(params, flat[offset:offset + len(params)].tolist(), strict=True):
        if flag == 0:
            param.grad = None
    return flat[offset + len(params):]


def broadcast_parameters(ctx: Dist, params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's initial adapter (seeded init is the same anyway; this makes it certain)."""
    if ctx.world > 1:
        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)


def agree(ctx: Dist, ok: bool, what: str) -> None:
    """A collective check: when any rank failed ``what``, the others stop too (instead of waiting forever)."""
    if ctx.world == 1:
        return
    flag = torch.tensor([1.0 if ok else 0.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if ok and flag.item() < 1:
        raise AdapterkitError(f"another rank failed while {what}; its message says why", code="rank_failed")


def max_divergence(ctx: Dist, params: list[torch.nn.Parameter]) -> float:
    """Largest |difference| between this rank's adapter and rank 0's (0.0 in a single process)."""
    if ctx.world == 1:
        return 0.0
    with torch.no_grad():
        mine = torch.cat([p.detach().reshape(-1).float() for p in params])
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        diff = (mine - reference).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def describe(ctx: Dist) -> dict[str, Any]:
    return {"world_size": ctx.world, "backend": ctx.backend, "device": str(ctx.device)}
