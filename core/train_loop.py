"""The optimisation loop of ``adapterkit train``: steps, evaluation, best adapter, early stopping.

One optimizer step consumes one *global* batch of ``batch_size`` examples (a
seeded permutation per epoch; the last batch of an epoch may be shorter). Rank
``r`` of ``world`` takes rows ``r, r + world, ...`` of it (DistributedSampler's
interleaving), cuts its share into ``grad_accum`` micro-batches, and divides
each micro-batch's summed loss by the loss units of the whole global batch
(predicted tokens for a causal LM, examples for classification). Summing the
gradients over ranks (:mod:`.train_dist`) then gives the gradient of the
single-process loss exactly, so the result does not depend on the number of
processes or on ``grad_accum``.

The loss is token-level cross-entropy computed here from the logits (never
the model's own ``labels`` path), so virtual-token methods, which add
positions inside the model and strip them from the output, need nothing special.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import AdapterkitError, UsageError
from .train_data import IGNORE, Encoded, collate, units
from .train_dist import Dist, all_reduce_sum, sync_gradients

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LoopOptions:
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    eval_every: int = 1
    patience: int | None = None
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    progress: bool | None = None


@dataclass
class Evaluation:
    step: int
    val_loss: float
    train_loss: float | None = None  # mean training loss since the previous evaluation
    #: share of validation units predicted right: examples (classification) or completion tokens (argmax)
    val_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "val_loss": round(self.val_loss, 6)}
        if self.val_accuracy is not None:
            out["val_accuracy"] = round(self.val_accuracy, 6)
        if self.train_loss is not None:
            out["train_loss"] = round(self.train_loss, 6)
        return out


@dataclass
class LoopResult:
    steps: int
    train_losses: list[float]
    evaluations: list[Evaluation] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float | None = None
    best_accuracy: float | None = None  # validation accuracy at best_step
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    seconds: float = 0.0  # wall time of the loop (evaluations included)
    cpu_seconds: float = 0.0  # CPU time of this process (all threads) over the loop


def global_batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless global batches of example indices: a seeded permutation per epoch, cut in order."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(count).tolist()
        for start in range(0, count, batch_size):
            yield order[start:start + batch_size]
        epoch += 1


def lr_factor(index: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the learning rate at optimizer step ``index`` (0-based): linear warmup, then the schedule."""
    if index < warmup:
        return (index + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (index - warmup) / (total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of a collated batch (float32): next-token targets, or class labels."""
    scores, truth = _scores(model, batch)
    return torch.nn.functional.cross_entropy(scores, truth, reduction="sum")


def batch_loss_and_hits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`batch_loss` and how many of its units the model's argmax gets right."""
    scores, truth = _scores(model, batch)
    hits = int((scores.argmax(dim=-1) == truth).sum())
    return torch.nn.functional.cross_entropy(scores, truth, reduction="sum"), hits


def _scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, targets) of the scored units: completion tokens (next-token), or examples."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if "targets" in batch:
        targets = batch["targets"][:, 1:]
        mask = targets != IGNORE
        return logits[:, :-1][mask].float(), targets[mask]
    return logits.float(), batch["labels"]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(model: torch.nn.Module, rows: Sequence[Encoded], batch_size: int, pad: int, ctx: Dist,
             bf16: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) per unit over ``rows`` (each rank computes its share; the sums are reduced)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                mine = list(rows[start:start + batch_size])[ctx.rank::ctx.world]
                mine = [r for r in mine if r.units]
                if not mine:
                    continue
                with autocast(ctx.device, bf16):
                    loss, hits = batch_loss_and_hits(model, _to(collate(mine, pad), ctx.device))
                totals[0] += loss.double()
                totals[1] += units(mine)
                totals[2] += hits
    finally:
        model.train(was_training)
    all_reduce_sum(ctx, totals)
    if totals[1] == 0:
        raise AdapterkitError("no validation example has a token to score within --max-length", code="bad_data")
    return float(totals[0] / totals[1]), float(totals[2] / totals[1])


def _micro_batches(rows: list[Encoded], parts: int) -> list[list[Encoded]]:
    """``rows`` cut into ``parts`` consecutive, near-equal chunks (numpy.array_split's sizes), empty ones dropped."""
    size, extra = divmod(len(rows), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            chunks.append(rows[start:end])
        start = end
    return chunks


def run(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    snapshot: Callable[[], dict[str, torch.Tensor]],
    train_rows: Sequence[Encoded],
    val_rows: Sequence[Encoded],
    pad: int,
    options: LoopOptions,
    ctx: Dist,
    echo: Callable[[str], Any] | None = None,
) -> LoopResult:
    """Train ``params`` (the adapter) for ``options.steps`` optimizer steps; keep the best by validation loss.

    ``snapshot()`` returns a detached copy of the adapter's tensors (the best one is kept in memory).
    """
    if options.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {options.schedule!r}", expected=list(SCHEDULES), code="bad_option")
    say = echo if (echo is not None and ctx.main) else (lambda _: None)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, options.warmup, options.steps, options.schedule))
    result = LoopResult(steps=0, train_losses=[])
    since_best = 0
    pending: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    show = (sys.stderr.isatty() if options.progress is None else options.progress) and ctx.main
    bar = _bar(options.steps) if show else None
    write = (lambda line: bar.write(line, file=sys.stderr)) if bar is not None else say

    def check(step: int) -> bool:
        """Evaluate, keep the best; True when early stopping says stop."""
        nonlocal since_best, pending
        loss, accuracy = evaluate(model, val_rows, options.batch_size, pad, ctx, options.bf16)
        train_loss = sum(pending) / len(pending) if pending else None
        pending = []
        result.evaluations.append(Evaluation(step, loss, train_loss, accuracy))
        improved = result.best_loss is None or loss < result.best_loss
        if improved:
            result.best_loss, result.best_step, since_best = loss, step, 0
            result.best_accuracy = accuracy
            result.best_state = {k: v.detach().clone() for k, v in snapshot().items()}
        else:
            since_best += 1
        shown = f"train loss {train_loss:.4f}  " if train_loss is not None else ""
        write(f"  step {step:>5}/{options.steps}  {shown}val loss {loss:.4f}  val acc {100 * accuracy:.1f}%"
              f"{'  (best)' if improved else ''}")
        if bar is not None:
            bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}" if result.train_losses else "-",
                            val=f"{loss:.3f}", refresh=False)
        return options.patience is not None and since_best >= options.patience

    model.train()
    batches = global_batches(len(train_rows), options.batch_size, options.seed)
    try:
        if val_rows:
            check(0)
        for step in range(1, options.steps + 1):
            rows = [train_rows[i] for i in next(batches)]
            total = units(rows)
            local = torch.zeros(1, dtype=torch.float32, device=ctx.device)
            if total:
                for chunk in _micro_batches(rows[ctx.rank::ctx.world], options.grad_accum):
                    with autocast(ctx.device, options.bf16):
                        loss = batch_loss(model, _to(collate(chunk, pad), ctx.device))
                    (loss / total).backward()
                    local += loss.detach().float() / total
                step_loss = float(sync_gradients(ctx, params, local).item())
                if not math.isfinite(step_loss):
                    raise AdapterkitError(f"training diverged: the loss is {step_loss} at step {step}",
                                          hint="lower --lr (or use --warmup)", code="diverged")
                if options.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                result.train_losses.append(step_loss)
                pending.append(step_loss)
            scheduler.step()
            result.steps = step
            if bar is not None:
                bar.update(1)
                if result.train_losses:
                    bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}", refresh=False)
            if val_rows and (step % options.eval_every == 0 or step == options.steps) and check(step):
                result.stopped_early = step < options.steps
                if result.stopped_early:
                    write(f"  early stop: no better validation loss in {options.patience} evaluation(s)")
                break
            if not val_rows and (step % options.eval_every == 0 or step == options.steps) and pending:
                write(f"  step {step:>5}/{options.steps}  train loss {sum(pending) / len(pending):.4f}")
                pending = []
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


def _bar(steps: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="training", unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
