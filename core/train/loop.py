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

With a sharded base (``sharded``: FSDP, :mod:`.sharding`) each forward and
backward pass is a collective, so every rank runs exactly ``grad_accum`` passes
per step and one forward per validation batch: a rank whose share is empty runs
a pass on a row of the global batch with its loss multiplied by 0 (its gradient
is exactly zero, and a parameter that only such a pass touched keeps
``grad = None``, as in an unsharded run).

Checkpoints (``checkpoints``, :class:`.resume.Checkpointer`) are written after a
step's periodic evaluation and before the extra evaluation at the end of a run,
so a checkpoint at the last step of a run resumes into a longer run exactly.
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

from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.train.data import IGNORE, Encoded, collate, units
from adapterkit.core.train.dist import Dist, all_reduce_sum, sync_gradients
from adapterkit.core.train.hooks import MethodHooks

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
    sharded: bool = False  # the base is sharded (FSDP): every rank runs the same passes


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
    since_best: int = 0  # evaluations since the best one (early stopping)
    pending: list[float] = field(default_factory=list)  # training losses since the last evaluation
    resumed_from: int | None = None  # the checkpoint's step, when the run resumed from one


def global_batches(count: int, batch_size: int, seed: int, skip: int = 0) -> Iterator[list[int]]:
    """Endless global batches of example indices: a seeded permutation per epoch, cut in order.

    ``skip``: start after that many batches (a resumed run), without drawing the epochs before.
    """
    per_epoch = -(-count // batch_size)
    epoch, first = divmod(skip, per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(count).tolist()
        for start in range(first * batch_size, count, batch_size):
            yield order[start:start + batch_size]
        epoch, first = epoch + 1, 0


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
             bf16: bool = False, sharded: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) per unit over ``rows`` (each rank computes its share; the sums are reduced).

    ``sharded``: every rank runs one forward per batch (a rank with nothing to score runs one and drops it).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = list(rows[start:start + batch_size])
                mine = [r for r in batch[ctx.rank::ctx.world] if r.units]
                if not mine:
                    if sharded:  # the other ranks' forward passes all-gather with this one
                        with autocast(ctx.device, bf16):
                            model(**{k: v for k, v in _to(collate(batch[:1], pad), ctx.device).items()
                                     if k in ("input_ids", "attention_mask")})
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


def _micro_batches(rows: list[Encoded], parts: int, keep_empty: bool = False) -> list[list[Encoded]]:
    """``rows`` cut into ``parts`` consecutive, near-equal chunks (numpy.array_split's sizes).

    Empty chunks are dropped, or kept (``keep_empty``: a sharded base needs the same passes on every rank).
    """
    size, extra = divmod(len(rows), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start or keep_empty:
            chunks.append(rows[start:end])
        start = end
    return chunks


def _backward(model: torch.nn.Module, params: list[torch.nn.Parameter], chunk: list[Encoded],
              rows: list[Encoded], total: int, pad: int, ctx: Dist, bf16: bool) -> torch.Tensor:
    """Backward of ``chunk``'s summed loss / ``total``; returns the detached value.

    An empty ``chunk`` (sharded base only) runs the first row of the global batch with weight 0: every gradient it
    adds is exactly zero, a parameter that had no gradient before keeps none, and the RNG states are restored after
    it, so the result is the unsharded one bit for bit.
    """
    if chunk:
        with autocast(ctx.device, bf16):
            loss = batch_loss(model, _to(collate(chunk, pad), ctx.device))
        (loss / total).backward()
        return loss.detach().float() / total
    untouched = [p for p in params if p.grad is None]
    # the RNG comes out as it went in: dropout in this pass must not shift the masks of the real ones
    cuda = ctx.device.type == "cuda"
    with torch.random.fork_rng(devices=[ctx.device] if cuda else [], device_type="cuda" if cuda else None):
        with autocast(ctx.device, bf16):
            loss = batch_loss(model, _to(collate(rows[:1], pad), ctx.device))
        (loss * 0.0).backward()
    for param in untouched:
        param.grad = None
    return torch.zeros((), dtype=torch.float32, device=ctx.device)


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
    checkpoints: Any = None,
    hooks: MethodHooks | None = None,
) -> LoopResult:
    """Train ``params`` (the adapter) for ``options.steps`` optimizer steps; keep the best by validation loss.

    ``snapshot()`` returns a detached copy of the adapter's tensors (the best one is kept in memory).
    ``checkpoints`` (a :class:`.resume.Checkpointer` or None) restores a checkpoint before the first step and
    writes one every ``checkpoints.every`` steps and at the last step. ``hooks`` (the method's
    :class:`adapterkit.TrainingHooks`, :mod:`.hooks`) adds its loss term to every step and runs after each
    optimizer step, before the gradients are cleared.
    """
    if options.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {options.schedule!r}", expected=list(SCHEDULES), code="bad_option")
    say = echo if (echo is not None and ctx.main) else (lambda _: None)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, options.warmup, options.steps, options.schedule))
    result = LoopResult(steps=0, train_losses=[])
    start, cpu_start = time.perf_counter(), time.process_time()
    show = (sys.stderr.isatty() if options.progress is None else options.progress) and ctx.main
    bar = _bar(options.steps) if show else None
    write = (lambda line: bar.write(line, file=sys.stderr)) if bar is not None else say
    every = getattr(checkpoints, "every", None)

    def check(step: int) -> bool:
        """Evaluate, keep the best; True when early stopping says stop."""
        loss, accuracy = evaluate(model, val_rows, options.batch_size, pad, ctx, options.bf16, options.sharded)
        train_loss = sum(result.pending) / len(result.pending) if result.pending else None
        result.pending = []
        result.evaluations.append(Evaluation(step, loss, train_loss, accuracy))
        improved = result.best_loss is None or loss < result.best_loss
        if improved:
            result.best_loss, result.best_step, result.since_best = loss, step, 0
            result.best_accuracy = accuracy
            result.best_state = {k: v.detach().clone() for k, v in snapshot().items()}
        else:
            result.since_best += 1
        shown = f"train loss {train_loss:.4f}  " if train_loss is not None else ""
        write(f"  step {step:>5}/{options.steps}  {shown}val loss {loss:.4f}  val acc {100 * accuracy:.1f}%"
              f"{'  (best)' if improved else ''}")
        if bar is not None:
            bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}" if result.train_losses else "-",
                            val=f"{loss:.3f}", refresh=False)
        return options.patience is not None and result.since_best >= options.patience

    def show_train_loss(step: int) -> None:
        write(f"  step {step:>5}/{options.steps}  train loss {sum(result.pending) / len(result.pending):.4f}")
        result.pending = []

    restored = checkpoints.restore(optimizer, scheduler) if checkpoints is not None else None  # RNG: last
    if restored is not None:
        result = restored
        result.resumed_from = result.steps
        write(f"  resumed at step {result.steps}/{options.steps}")
        if bar is not None:
            bar.update(result.steps)
    model.train()
    batches = global_batches(len(train_rows), options.batch_size, options.seed, skip=result.steps)
    try:
        if val_rows and restored is None:
            check(0)
        for step in range(result.steps + 1, options.steps + 1):
            if result.stopped_early:
                break
            rows = [train_rows[i] for i in next(batches)]
            total = units(rows)
            local = torch.zeros(1, dtype=torch.float32, device=ctx.device)
            if total:
                mine = rows[ctx.rank::ctx.world]
                for chunk in _micro_batches(mine, options.grad_accum, keep_empty=options.sharded):
                    local += _backward(model, params, chunk, [r for r in rows if r.units], total, pad, ctx,
                                       options.bf16)
                if hooks is not None:
                    term = hooks.backward_term(ctx.world)
                    if term is not None:
                        local += term
                step_loss = float(sync_gradients(ctx, params, local).item())
                if not math.isfinite(step_loss):
                    raise AdapterkitError(f"training diverged: the loss is {step_loss} at step {step}",
                                          hint="lower --lr (or use --warmup)", code="diverged")
                if options.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                if hooks is not None:
                    hooks.after_step(step, options.steps)
                optimizer.zero_grad(set_to_none=True)
                result.train_losses.append(step_loss)
                result.pending.append(step_loss)
            scheduler.step()
            result.steps = step
            if bar is not None:
                bar.update(1)
                if result.train_losses:
                    bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}", refresh=False)
            stop = False
            if step % options.eval_every == 0:
                if val_rows:
                    stop = check(step)
                    result.stopped_early = stop and step < options.steps
                elif result.pending:
                    show_train_loss(step)
            if every and (step % every == 0 or step == options.steps or result.stopped_early):
                checkpoints.save(step, result, optimizer, scheduler)
            if result.stopped_early:
                write(f"  early stop: no better validation loss in {options.patience} evaluation(s)")
        # the end of the run: evaluated unless its last step was (kept out of the checkpoint written just before)
        if val_rows and not result.stopped_early and result.evaluations[-1].step != result.steps:
            check(result.steps)
        if not val_rows and result.pending:
            show_train_loss(result.steps)
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
