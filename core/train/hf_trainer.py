"""Train any adapterkit method with the Hugging Face ``transformers.Trainer``.

Two pieces fit an ordinary Trainer script::

    from adapterkit.core.train.hf_trainer import AdapterkitCallback, prepare

    model, handle = prepare(model, "lora", r=8, alpha=16, target_modules="all-linear")
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[AdapterkitCallback(handle, "out/adapter")])
    trainer.train()

- :func:`prepare` injects a new adapter and freezes every other parameter, so
  the Trainer's optimizer (which takes the parameters that require grad) trains
  the adapter alone, under the Trainer's own precision, accumulation and
  distributed setup (the tests run it in one CPU process).
- :class:`AdapterkitCallback` writes a valid adapterkit adapter into every
  checkpoint (``<output_dir>/checkpoint-<step>/adapterkit``) and, when training
  ends, into ``out_dir`` (after ``load_best_model_at_end`` has restored the best
  checkpoint, so that is the one saved). Only the main process writes.

The Trainer still saves the full model in its checkpoints (that is how it
resumes); the adapterkit folder beside it is the small artefact to ship.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from adapterkit.core.runtime.inject import InjectedAdapter, inject
from adapterkit.core.format.provenance import now_utc

SUBDIR = "adapterkit"


def prepare(model: Any, method: str, config: Mapping[str, Any] | None = None, *, name: str = "default",
            registry: Any = None, **options: Any) -> tuple[Any, InjectedAdapter]:
    """Inject a new ``method`` adapter into ``model`` and freeze everything else; returns ``(model, handle)``.

    ``config`` and keyword ``options`` are merged as in :func:`adapterkit.inject`.
    """
    handle = inject(model, method, config, name=name, registry=registry, **options)
    keep = {id(p) for p in handle.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return model, handle


class AdapterkitCallback(TrainerCallback):
    """Save the adapter of ``handle`` at every Trainer checkpoint and at the end of training.

    :param handle: what :func:`prepare` returned.
    :param out_dir: where the final adapter goes (None: checkpoints only).
    :param task: the manifest's ``task`` (default: guessed from the model class).
    :param base_name: the base model's name to record (default: the model config's ``name_or_path``).
    :param dtype: dtype of the saved tensors (default: the parameters').
    :param provenance: extra provenance fields (``training`` gets the Trainer's summary).
    """

    def __init__(self, handle: InjectedAdapter, out_dir: str | os.PathLike[str] | None = None, *,
                 task: str | None = None, base_name: str | None = None, dtype: str | None = None,
                 provenance: Mapping[str, Any] | None = None, registry: Any = None) -> None:
        self.handle = handle
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.task, self.base_name, self.dtype = task, base_name, dtype
        self.provenance = dict(provenance or {})
        self.registry = registry
        self.saved: list[Path] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.save(checkpoint / SUBDIR, args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.out_dir is not None:
            self.save(self.out_dir, args, state)

    def save(self, folder: Path, args: Any, state: Any) -> Path:
        """Write the adapter as it is now to ``folder`` (replacing it), with the Trainer's summary."""
        import adapterkit

        adapter = self.handle.to_adapter(dtype=self.dtype, task=self.task, base_name=self.base_name,
                                         provenance={"created_at": now_utc(), **self.provenance,
                                                     "training": summary(args, state)})
        path = adapterkit.save(adapter, folder, overwrite=True, registry=self.registry)
        self.saved.append(path)
        return path


def summary(args: Any, state: Any) -> dict[str, Any]:
    """The run so far, from the Trainer's arguments and state (``provenance.training``)."""
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    world = int(getattr(args, "world_size", 1) or 1)
    out: dict[str, Any] = {
        "trainer": "transformers.Trainer",
        "steps": int(state.global_step),
        "epochs": round(float(state.epoch or 0.0), 4),
        "lr": args.learning_rate,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "grad_accum": args.gradient_accumulation_steps,
        "world_size": world,
        "seed": args.seed,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "float32",
    }
    if losses:
        out["final_train_loss"] = round(float(losses[-1]), 6)
    if evals:
        out["final_val_loss"] = round(float(evals[-1]), 6)
    if state.best_metric is not None:
        out["best_metric"] = round(float(state.best_metric), 6)
        out["best_checkpoint"] = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
    return {k: v for k, v in out.items() if v is not None}
