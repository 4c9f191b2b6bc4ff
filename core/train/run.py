"""``adapterkit train`` as a library function: fine-tune any registered method on a JSON Lines file.

:func:`train` loads a local base folder (model and tokenizer), reads and
checks the data (:mod:`.data`), injects a new adapter, trains it
(:mod:`.loop`, data-parallel under torchrun: :mod:`.dist`), keeps
the adapter with the best validation loss, and saves it with
:func:`adapterkit.save` (atomic) with the run's summary in
``provenance.training``. The CLI is a thin wrapper.

Classification heads (the base's own, frozen, or a new seeded one written to
``head_base``): :mod:`.heads`. Sharding the base over the ranks (``fsdp``):
:mod:`.sharding`. Checkpoints every ``checkpoint_every`` steps in
``OUT/checkpoints`` and resuming from the newest (``resume``): :mod:`.resume`
and :mod:`.checkpoint`.
"""

from __future__ import annotations

from adapterkit.core.runtime.models import load_base

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterkitError, BaseModelError, UsageError
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.core.runtime.models import load_tokenizer
from adapterkit.core.train.data import CAUSAL, CLASSIFICATION, DataError, Dataset, read_jsonl, split, steps_per_epoch

Echo = Callable[[str], Any]


@dataclass
class TrainOptions:
    """Everything but the method config; the CLI options of the same names (docs/training.md)."""

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    val_fraction: float = 0.1
    val_data: str | os.PathLike[str] | None = None
    patience: int | None = None
    max_length: int = 512
    gradient_checkpointing: bool = False
    bf16: bool = False
    device: str = "auto"
    head_base: str | os.PathLike[str] | None = None
    base_name: str | None = None
    progress: bool | None = None
    overwrite: bool = False
    fsdp: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False

    def check(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length}
        positive["keep_checkpoints"] = self.keep_checkpoints
        for name in ("max_steps", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be an integer >= 1", found=value, code="bad_option")
        if not self.lr > 0:
            raise UsageError("lr must be > 0", found=self.lr, code="bad_option")
        if self.warmup < 0 or self.weight_decay < 0:
            raise UsageError("warmup and weight_decay must be >= 0", found=[self.warmup, self.weight_decay],
                             code="bad_option")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UsageError("max_grad_norm must be > 0 (or None to switch clipping off)", found=self.max_grad_norm,
                             code="bad_option")
        if self.patience is not None and self.val_fraction == 0 and self.val_data is None:
            raise UsageError("early stopping (patience) needs validation data",
                             hint="keep --val-fraction above 0 or pass --val-data", code="bad_option")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in OUT, --overwrite replaces OUT: pass one of them",
                             code="bad_option")


@dataclass
class TrainResult:
    """What a run did. Every rank holds the (identical) ``adapter``; ``path`` is set on rank 0, the one that writes."""

    method: str
    task: str
    base: str
    path: Path | None
    adapter: Any
    trainable_parameters: int
    steps: int
    epochs: float
    seconds: float  # the whole call: loading, training, saving
    train_seconds: float  # the training loop alone (wall time, evaluations included)
    cpu_seconds: float  # CPU time of this process over the loop (all threads; less sensitive to machine load)
    train_examples: int
    val_examples: int
    initial_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    stopped_early: bool
    evaluations: list[dict[str, Any]]
    peak_rss_bytes: int | None
    peak_device_bytes: int | None
    world_size: int = 1
    rank: int = 0
    labels: list[str] | None = None
    head_base: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: validation accuracy before training and at best_step: right examples (classification) or right
    #: next tokens of the completions (causal LM, argmax)
    initial_val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    #: how the base was held: "none" (one process), "ddp" (a whole copy per rank) or "fsdp" (sharded)
    sharding: str = "none"
    base_bytes: int | None = None  # the base's parameters, unsharded
    base_bytes_per_rank: list[int] = field(default_factory=list)  # what each rank held of them
    resumed_from: int | None = None  # the step of the checkpoint the run resumed from
    checkpoint: Path | None = None  # the last checkpoint written (rank 0)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "adapter"}
        for key in ("path", "head_base", "checkpoint"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


def train(
    base: str | os.PathLike[str],
    method: str,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    config: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    echo: Echo | None = None,
    **options: Any,
) -> TrainResult:
    """Train a new ``method`` adapter on ``base`` (a local HF folder) with ``data`` (JSON Lines); save it to ``out``.

    ``options`` are :class:`TrainOptions` fields. ``out=None`` saves nothing (the adapter is in the result).
    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; only rank 0 writes.
    """
    try:
        opts = TrainOptions(**options)
    except TypeError as exc:
        known = sorted(f.name for f in dataclasses.fields(TrainOptions))
        raise UsageError(f"unknown training option: {exc}", expected=known, code="bad_option") from None
    opts.check()
    registry = registry or default_registry()
    plugin = registry.method(method)
    resolved = plugin.resolve_config(dict(config or {}))
    base_path = Path(base)
    if not (base_path / "config.json").is_file():
        raise BaseModelError("base is not a local Hugging Face model folder (no config.json)", file=str(base_path),
                             code="missing_base")
    dataset = read_jsonl(data)
    val_dataset = read_jsonl(opts.val_data) if opts.val_data is not None else None
    if val_dataset is not None and val_dataset.task != dataset.task:
        raise DataError(f"validation data is {val_dataset.task}, training data is {dataset.task}",
                        file=str(val_dataset.path), code="bad_data")
    out_path = Path(out) if out is not None else None
    if out_path is None and (opts.checkpoint_every or opts.resume):
        raise UsageError("checkpoints live in OUT/checkpoints: --checkpoint-every and --resume need an output folder",
                         code="bad_option")

    from adapterkit.core.train import dist as train_dist

    ctx = train_dist.setup(opts.device)
    say: Echo = echo if (echo is not None and ctx.main) else (lambda _: None)
    try:
        if opts.fsdp and ctx.world < 2:
            raise UsageError("--fsdp shards the base over the processes of a torchrun run, and this is one process",
                             found=f"WORLD_SIZE={ctx.world}",
                             hint="start it with torchrun --nproc_per_node N -m adapterkit train ... --fsdp "
                                  "(N >= 2), or drop --fsdp", code="fsdp_single_process")
        failure: BaseException | None = None
        if ctx.main and not opts.resume:
            try:
                _check_output(out_path, opts.overwrite)
                if opts.head_base is not None:
                    _check_output(Path(opts.head_base), opts.overwrite)
            except AdapterkitError as exc:
                failure = exc
        train_dist.agree(ctx, failure is None, "checking the outputs")
        if failure is not None:
            raise failure
        result = _train(base_path, plugin, resolved, dataset, val_dataset, out_path, opts, registry, ctx, say)
        train_dist.finish(ctx)
        return result
    finally:
        train_dist.teardown(ctx)


def _train(base: Path, plugin: Any, config: dict[str, Any], dataset: Dataset, val_dataset: Dataset | None,
           out: Path | None, opts: TrainOptions, registry: Registry, ctx: Any, say: Echo) -> TrainResult:
    import adapterkit
    from adapterkit.core.format.provenance import now_utc
    from adapterkit.core.train import checkpoint as train_checkpoint, data as train_data, dist as train_dist, \
        hooks as train_hooks, loop as train_loop, resume as train_resume, sharding as train_sharding
    from adapterkit.core.train.heads import classification_base

    started = time.perf_counter()
    # the plan (split, steps, evaluations) needs no model: a resume is checked against it before loading one
    if val_dataset is not None:
        train_idx, val_idx = list(range(len(dataset))), []
    else:
        train_idx, val_idx = split(len(dataset), opts.val_fraction, opts.seed)
    per_epoch = steps_per_epoch(len(train_idx), opts.batch_size)
    steps = opts.max_steps or opts.epochs * per_epoch
    eval_every = opts.eval_every or max(1, min(per_epoch, -(-steps // 10)))
    resume_from, state = train_resume.find(out, ctx) if opts.resume and out is not None else (None, None)

    tokenizer = load_tokenizer(base)
    labels: list[str] | None = None
    head_base: Path | None = None
    original = base
    if dataset.task == CLASSIFICATION:
        base, labels, head_base = classification_base(
            base, dataset, tokenizer, Path(opts.head_base) if opts.head_base is not None else None, opts.seed,
            opts.overwrite, opts.resume, ctx, say)
    decisive = _decisive_options(original, plugin.name, config, dataset, val_dataset, opts, labels, steps, eval_every,
                                 ctx)
    if resume_from is not None and state is not None:
        train_resume.check(resume_from, state, decisive, steps)
        say(f"Resuming from {resume_from} (step {state['step']} of {steps})")
    model = load_model(base, dataset.task, labels, tokenizer)
    say(f"Base: {base} ({type(model).__name__}, {_count(model)} parameters) on {ctx.device}"
        + (f", {ctx.world} processes ({ctx.backend})" if ctx.world > 1 else ""))

    max_length = effective_max_length(model, config, opts.max_length)
    encoded = train_data.encode(dataset, tokenizer, max_length, labels)
    if val_dataset is not None:
        val_rows = train_data.encode(val_dataset, tokenizer, max_length, labels)
    else:
        val_rows = [encoded[i] for i in val_idx]
    train_rows = [encoded[i] for i in train_idx]
    cut = train_data.check_trainable(train_rows, dataset.path, max_length)
    say(f"Data: {dataset.path.name}, {dataset.task}: {len(train_rows)} training, {len(val_rows)} validation examples"
        + (f" (labels {labels})" if labels else "")
        + (f"; {cut} carry no loss within {max_length} tokens" if cut else ""))

    import torch

    from adapterkit.core.plugin.capabilities import QuantizedBase

    # a float base to be sharded stays in host memory: fully_shard moves each unit to the device and keeps only
    # this rank's shard there. A quantised base goes to the device first (bitsandbytes quantises it there).
    whole_on_device = not opts.fsdp or isinstance(plugin, QuantizedBase)
    if whole_on_device:
        model.to(ctx.device)
    torch.manual_seed(opts.seed)
    handle = adapterkit.inject(model, plugin.name, config, registry=registry)
    params = handle.parameters()
    if whole_on_device:
        model.to(ctx.device)
    else:
        with torch.no_grad():  # FSDP leaves the ignored (adapter) parameters where they are
            for param in params:
                param.data = param.data.to(ctx.device)
    _freeze_all_but(model, params)
    trainable = sum(p.numel() for p in params)
    base_count = sum(p.numel() for p in model.parameters()) - trainable
    say(f"{plugin.name} on {len(handle.targets)} module(s): {trainable:,} trainable parameters "
        f"({100 * trainable / max(base_count, 1):.3g}% of the base). {steps} steps of {opts.batch_size} examples, "
        f"AdamW lr {opts.lr:g}" + (f", grad accumulation {opts.grad_accum}" if opts.grad_accum > 1 else ""))
    if opts.gradient_checkpointing:
        enable_checkpointing(model)
    train_dist.broadcast_parameters(ctx, params)
    names = {id(p): name for name, p in model.named_parameters()}  # before sharding wraps the model
    units = train_sharding.shard_base(model, params, ctx) if opts.fsdp else 0
    kind = "fsdp" if opts.fsdp else "ddp" if ctx.world > 1 else "none"
    held = train_sharding.describe(model, params, ctx, kind, units)
    if opts.fsdp:
        say(f"Sharded the base over {ctx.world} processes (FSDP, {units} units): "
            f"{' / '.join(f'{b:,}' for b in held.base_bytes_per_rank)} of its {held.base_bytes:,} bytes per rank")

    hooks = train_hooks.MethodHooks.of(plugin, model, handle.name)
    checkpointer = None
    if out is not None and (opts.checkpoint_every or resume_from is not None):
        checkpointer = train_resume.Checkpointer(
            out, opts.checkpoint_every, opts.keep_checkpoints, ctx, {names[id(p)]: p for p in params}, decisive,
            {"sharding": kind}, per_epoch, resume_from, state, hooks)
    loop = train_loop.LoopOptions(
        steps=steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum, lr=opts.lr,
        weight_decay=opts.weight_decay, warmup=opts.warmup, schedule=opts.schedule, eval_every=eval_every,
        patience=opts.patience, max_grad_norm=opts.max_grad_norm, bf16=opts.bf16, seed=opts.seed,
        progress=opts.progress, sharded=opts.fsdp,
    )
    result = train_loop.run(model, params, handle.state_dict, train_rows, val_rows, train_data.pad_id(tokenizer),
                            loop, ctx, say, checkpoints=checkpointer, hooks=hooks)
    if result.best_state is not None:
        handle.load_state_dict(result.best_state)
    divergence = train_dist.max_divergence(ctx, params)
    if divergence > 1e-4:
        raise AdapterkitError(f"the ranks ended with different adapters (max difference {divergence:.3g})",
                              hint="this is a bug in adapterkit's data-parallel training; please report it",
                              code="ranks_diverged")

    peak_rss, peak_device = peak_memory(ctx.device)
    evaluations = [e.to_dict() for e in result.evaluations]
    summary: dict[str, Any] = {
        "task": dataset.task,
        "data": dict(train_data.summary(dataset, train_idx, val_idx)),
        "steps": result.steps, "epochs": round(result.steps / per_epoch, 4), "batch_size": opts.batch_size,
        "grad_accum": opts.grad_accum, "optimizer": "AdamW", "lr": opts.lr, "weight_decay": opts.weight_decay,
        "schedule": opts.schedule, "warmup": opts.warmup, "max_grad_norm": opts.max_grad_norm,
        "max_length": max_length, "seed": opts.seed, "precision": "bf16-autocast" if opts.bf16 else "float32",
        "gradient_checkpointing": opts.gradient_checkpointing, "eval_every": eval_every, "patience": opts.patience,
        "trainable_parameters": trainable, "stopped_early": result.stopped_early,
        "seconds": round(time.perf_counter() - started, 1), "train_seconds": round(result.seconds, 1),
        "cpu_seconds": round(result.cpu_seconds, 1), "peak_rss_bytes": peak_rss,
        **train_dist.describe(ctx), **held.to_dict(),
        "checkpoint_every": opts.checkpoint_every, "resumed_from_step": result.resumed_from,
    }
    if ctx.world > 1:
        summary["ranks_max_difference"] = divergence  # every rank's adapter vs rank 0's, checked after training
    if val_dataset is not None:
        summary["validation_data"] = {"file": val_dataset.path.name, "sha256": val_dataset.sha256,
                                      "examples": len(val_dataset)}
    else:
        summary["data"]["val_fraction"] = opts.val_fraction
    if result.train_losses:
        summary["final_train_loss"] = round(result.train_losses[-1], 6)
    if result.evaluations:
        summary.update(initial_val_loss=round(result.evaluations[0].val_loss, 6),
                       best_val_loss=round(result.best_loss, 6), best_step=result.best_step, evaluations=evaluations,
                       initial_val_accuracy=_rounded(result.evaluations[0].val_accuracy),
                       best_val_accuracy=_rounded(result.best_accuracy))
    if labels is not None:
        summary["labels"] = labels
    if dataset.task == CLASSIFICATION:  # the head is part of the base, never trained (heads.py)
        summary["head"] = ({"frozen": True, "source": "new", "init_seed": opts.seed, "created_from": str(original)}
                           if head_base is not None else {"frozen": True, "source": "base"})
    summary = {k: v for k, v in summary.items() if v is not None}

    path = None
    adapter = handle.to_adapter(task=dataset.task, base_name=opts.base_name or str(base),
                                provenance={"created_at": now_utc(), "training": summary})
    if ctx.main and out is not None:
        if checkpointer is not None:  # OUT holds checkpoints/: keep them
            path = train_checkpoint.save_adapter_beside(adapter, out, registry)
        else:
            path = adapterkit.save(adapter, out, overwrite=opts.overwrite, registry=registry)
        say(f"Saved {path}")
    return TrainResult(
        method=plugin.name, task=dataset.task, base=str(base), path=path, adapter=adapter,
        trainable_parameters=trainable, steps=result.steps, epochs=result.steps / per_epoch,
        seconds=time.perf_counter() - started, train_seconds=result.seconds, cpu_seconds=result.cpu_seconds,
        train_examples=len(train_rows), val_examples=len(val_rows),
        initial_val_loss=result.evaluations[0].val_loss if result.evaluations else None,
        best_val_loss=result.best_loss, best_step=result.best_step,
        final_train_loss=result.train_losses[-1] if result.train_losses else None,
        stopped_early=result.stopped_early, evaluations=evaluations, peak_rss_bytes=peak_rss,
        peak_device_bytes=peak_device, world_size=ctx.world, rank=ctx.rank, labels=labels, head_base=head_base,
        config=plugin.minimal_config(handle.config),
        initial_val_accuracy=result.evaluations[0].val_accuracy if result.evaluations else None,
        best_val_accuracy=result.best_accuracy, sharding=kind, base_bytes=held.base_bytes,
        base_bytes_per_rank=held.base_bytes_per_rank, resumed_from=result.resumed_from,
        checkpoint=checkpointer.written[-1] if checkpointer is not None and checkpointer.written else None,
    )


def _decisive_options(base: Path, method: str, config: Mapping[str, Any], dataset: Dataset,
                      val_dataset: Dataset | None, opts: TrainOptions, labels: list[str] | None, steps: int,
                      eval_every: int, ctx: Any) -> dict[str, Any]:
    """The options that decide what the run computes (a resume must repeat them: :data:`.resume.OPTIONS`)."""
    from adapterkit.core.train.resume import base_identity

    return {
        "base": base_identity(base), "method": method, "config": dict(config), "task": dataset.task,
        "data": dataset.sha256, "val_data": val_dataset.sha256 if val_dataset is not None else None,
        "val_fraction": opts.val_fraction if val_dataset is None else None, "labels": labels, "seed": opts.seed,
        "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "lr": opts.lr,
        "weight_decay": opts.weight_decay, "warmup": opts.warmup, "schedule": opts.schedule,
        "steps": steps if opts.schedule != "constant" else None,  # the decay's length; constant has none
        "max_grad_norm": opts.max_grad_norm, "max_length": opts.max_length, "bf16": opts.bf16,
        "eval_every": eval_every, "patience": opts.patience, "world_size": ctx.world, "device": ctx.device.type,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# ---- loading ----------------------------------------------------------------------



def load_model(base: Path, task: str, labels: list[str] | None, tokenizer: Any) -> Any:
    """The base in float32 with the head the task needs; refuse weights the checkpoint does not hold."""
    from adapterkit.core.errors import AdapterkitError

    try:
        model = load_base(base, task="causal-lm" if task == CAUSAL else "sequence-classification",
                          require_all_weights=True)
    except AdapterkitError as exc:
        if exc.code == "missing_weights" and task == CLASSIFICATION:
            exc.hint = "use a base folder that holds them (or pass --head-base DIR)"
        raise
    if task == CLASSIFICATION and getattr(model.config, "pad_token_id", None) is None:
        from adapterkit.core.train.data import pad_id

        model.config.pad_token_id = pad_id(tokenizer)  # models that pool the last token find it through padding
    return model


def effective_max_length(model: Any, config: Mapping[str, Any], wanted: int) -> int:
    """``wanted`` capped by the model's positions, minus virtual tokens a method prepends."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return wanted
    virtual = config.get("num_virtual_tokens", 0)
    return max(2, min(wanted, limit - (virtual if isinstance(virtual, int) else 0)))


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing, non-reentrant (the inputs of a frozen base need no grad for it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise UsageError(f"{type(model).__name__} does not support gradient checkpointing", code="bad_option")
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # training needs no KV cache; transformers would warn that it drops it


def _freeze_all_but(model: Any, params: list[Any]) -> None:
    keep = {id(p) for p in params}
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)


def _check_output(out: Path | None, overwrite: bool) -> None:
    if out is None or overwrite:
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        from adapterkit.core.train.checkpoint import FOLDER

        resumable = (out / FOLDER).is_dir()
        raise AdapterkitError("output already exists and is not empty"
                              + (f" (it holds {FOLDER}/ of an earlier run)" if resumable else ""), file=str(out),
                              hint=("pass --resume to continue that run, or --overwrite to start over" if resumable
                                    else "choose another output path or pass --overwrite"), code="output_exists")


def peak_memory(device: Any) -> tuple[int | None, int | None]:
    """(peak resident set size of this process in bytes, peak CUDA memory allocated) where known."""
    rss: int | None = None
    try:
        import resource
        import sys

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = int(value if sys.platform == "darwin" else value * 1024)
    except (ImportError, OSError):
        try:
            import psutil

            rss = int(psutil.Process().memory_info().rss)
        except Exception:  # pragma: no cover - best effort
            rss = None
    gpu = None
    if getattr(device, "type", None) == "cuda":
        import torch

        gpu = int(torch.cuda.max_memory_allocated(device))
    return rss, gpu


def _count(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"
