"""What a checkpoint of ``adapterkit train`` holds, and resuming from one so the run ends as if never stopped.

A checkpoint (:mod:`.checkpoint` writes the folder) holds, after step N:

- ``adapter.safetensors``: the trainable parameters as they are (by parameter name);
- ``best.safetensors``: the best adapter so far (by validation loss), when there is one;
- ``optimizer.safetensors``: AdamW's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``);
- ``rng.safetensors``: every rank's torch RNG state (CPU, and CUDA when used): dropout draws a
  different number of values on each rank, so each rank gets its own state back;
- ``hooks.safetensors``: the arrays of the method's own training state, for a method with
  :class:`adapterkit.TrainingHooks` (its other values go under ``hooks`` in ``state.json``);
- ``state.json``: the step, the loop's bookkeeping (losses, evaluations, best loss and step, the
  patience counter, the losses since the last evaluation), the optimizer's parameter groups, the
  scheduler, every rank's Python and NumPy RNG states, the data position, and the options that
  decide the result (:data:`OPTIONS`), which a resumed run must repeat.

The data order needs no state of its own: each epoch's order is a permutation seeded with
``(seed, epoch)`` (:func:`.loop.global_batches`), so the step number says where the run is.

Resuming restores the trainable parameters, optimizer, scheduler and loop in place once the model
is built, and the RNG states last, just before the next step; on the CPU the run then ends bit for
bit where an uninterrupted run with the same options ends. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.core.errors import AdapterkitError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.torch_bridge import to_numpy, to_torch
from adapterkit.core.io import canonical_json, read_json, sha256_file
from adapterkit.core.train import checkpoint as folders
from adapterkit.core.train.checkpoint import CheckpointError
from adapterkit.core.train.hooks import MethodHooks
from adapterkit.core.train.dist import Dist, agree
from adapterkit.core.train.loop import Evaluation, LoopResult

STATE = "state.json"
HOOKS = "hooks.safetensors"  # the arrays of a TrainingHooks method's own state
#: the options that decide what a run computes, with the words that name them in a refusal
OPTIONS: dict[str, str] = {
    "base": "--base (its config.json and weight files)",
    "method": "--method",
    "config": "the method config (--rank, --alpha, --targets, --dropout, --config ...)",
    "task": "the task of the data",
    "data": "--data (the file's sha256)",
    "val_data": "--val-data (the file's sha256)",
    "val_fraction": "--val-fraction",
    "labels": "the labels",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "warmup": "--warmup",
    "schedule": "--schedule",
    "steps": "the total steps (--max-steps / --epochs), which a linear or cosine schedule decays over",
    "max_grad_norm": "--max-grad-norm",
    "max_length": "--max-length",
    "bf16": "--bf16",
    "eval_every": "--eval-every (its default depends on the run's length)",
    "patience": "--patience",
    "world_size": "the number of processes (torchrun --nproc_per_node)",
    "device": "--device",
}


def base_identity(base: Path) -> dict[str, Any]:
    """The base as far as a resume checks it, cheaply: config.json's sha256 and the weight files' sizes."""
    weights = {p.name: p.stat().st_size for p in sorted(base.iterdir())
               if p.name.endswith((".safetensors", ".safetensors.index.json", ".bin"))}
    return {"config_sha256": sha256_file(base / "config.json"), "weights": weights}


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), for comparing and storing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(now: Mapping[str, Any], then: Mapping[str, Any]) -> list[str]:
    """The options of :data:`OPTIONS` that differ, each as ``what: now vs the checkpoint's``."""
    out = []
    for key in [*OPTIONS, *sorted((set(now) | set(then)) - set(OPTIONS))]:
        a, b = _plain(now.get(key)), _plain(then.get(key))
        if a != b:
            out.append(f"{OPTIONS.get(key, key)}: {_show(a)} now, {_show(b)} in the checkpoint")
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


# ---- finding the checkpoint to resume from ---------------------------------------------------

def find(out: Path, ctx: Dist) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint in ``out`` (rank 0 decides, every rank reads it) and its state.

    Later, broken ``step-N`` folders and stale temporaries are removed (rank 0).
    """
    root = out / folders.FOLDER
    failure: BaseException | None = None
    step = -1
    if ctx.main:
        found = folders.latest(root)
        if found is None:
            broken = [f"step-{s}: {folders.problem(folders.folder(root, s))}" for s in folders.steps(root)]
            failure = CheckpointError("no complete checkpoint to resume from", file=str(root),
                                      found=broken or None,
                                      hint="run without --resume (add --overwrite to replace OUT) to start over",
                                      code="no_checkpoint")
        else:
            step = int(found.name.split("-", 1)[1])
            folders.discard_after(root, step)
            folders.remove_temporaries(root)
    step = _broadcast_int(ctx, step)
    agree(ctx, failure is None, "looking for a checkpoint")
    if failure is not None:
        raise failure
    path = folders.folder(root, step)
    state: dict[str, Any] | None = None
    try:
        state = read_json(path / STATE)
        ok = isinstance(state, dict) and state.get("step") == step
    except (OSError, AdapterkitError):
        ok = False
    agree(ctx, ok, f"reading {path / STATE}")
    if not ok or state is None:
        raise CheckpointError("the checkpoint's state cannot be read on this rank", file=str(path / STATE),
                              hint="every process must see OUT (a shared file system on several machines)",
                              code="bad_checkpoint")
    return path, state


def check(path: Path, state: Mapping[str, Any], options: Mapping[str, Any], steps: int) -> None:
    """Refuse to resume a run whose result-deciding options differ from the checkpoint's, naming each."""
    changed = differences(options, state.get("options", {}))
    if changed:
        raise CheckpointError(f"cannot resume: {len(changed)} option(s) differ from the checkpoint's: "
                              + "; ".join(changed), file=str(path),
                              hint="resume with the checkpoint's options (only --max-steps / --epochs may grow, "
                                   "and only under the constant schedule), or start over without --resume",
                              code="resume_mismatch")
    if state["step"] > steps:
        raise CheckpointError(f"the checkpoint is at step {state['step']}, past this run's {steps} steps",
                              file=str(path), hint=f"resume with --max-steps {state['step']} or more",
                              code="resume_mismatch")


def _broadcast_int(ctx: Dist, value: int) -> int:
    if ctx.world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


# ---- writing and restoring ---------------------------------------------------------------------

class Checkpointer:
    """Writes checkpoints every ``every`` steps (and at the last step) and restores one (:func:`find`).

    ``params`` are the trainable parameters by name; ``options`` the result-deciding options (:data:`OPTIONS`).
    Both methods are collectives: every rank calls them.
    """

    def __init__(self, out: Path, every: int | None, keep: int, ctx: Dist, params: Mapping[str, torch.nn.Parameter],
                 options: Mapping[str, Any], info: Mapping[str, Any], per_epoch: int,
                 resume_from: Path | None = None, state: Mapping[str, Any] | None = None,
                 hooks: MethodHooks | None = None) -> None:
        self.root = out / folders.FOLDER
        self.every, self.keep, self.ctx = every, keep, ctx
        self.params = dict(params)
        self.options, self.info, self.per_epoch = dict(options), dict(info), per_epoch
        self.resume_from, self.state = resume_from, state
        self.hooks = hooks
        self.written: list[Path] = []

    def save(self, step: int, result: LoopResult, optimizer: Any, scheduler: Any) -> None:
        rngs = _gather(self.ctx, _rng_state(self.ctx))
        failure: BaseException | None = None
        if self.ctx.main:
            try:
                files = self._files(step, result, optimizer, scheduler, rngs)
                self.written.append(folders.write(self.root, step, files, self.keep))
            except OSError as exc:
                failure = CheckpointError(f"writing checkpoint step-{step} failed: {exc.strerror or exc}",
                                          file=str(self.root), hint="check the free space and permissions of OUT",
                                          code="checkpoint_write")
            except Exception as exc:  # a bug: the other ranks must not wait for rank 0 forever
                failure = exc
        agree(self.ctx, failure is None, f"writing checkpoint step-{step}")
        if failure is not None:
            raise failure

    def _files(self, step: int, result: LoopResult, optimizer: Any, scheduler: Any,
               rngs: list[dict[str, Any]]) -> dict[str, bytes]:
        opt_tensors, opt_plain = _optimizer_state(optimizer)
        rng_tensors = {f"{kind}.{rank}": to_numpy(entry[kind]) for rank, entry in enumerate(rngs)
                       for kind in ("torch", "cuda", "python", "numpy") if entry.get(kind) is not None}
        state = {
            "format": folders.FORMAT, "format_version": folders.FORMAT_VERSION, "step": step,
            "world_size": self.ctx.world, **self.info, "options": _plain(self.options),
            "data": {"epoch": step // self.per_epoch, "batch": step % self.per_epoch,
                     "batches_per_epoch": self.per_epoch},
            "loop": _loop_state(result), "optimizer": opt_plain, "scheduler": _plain(scheduler.state_dict()),
            "rng": [entry["plain"] for entry in rngs],
        }
        files = {"adapter.safetensors": safetensors_io.serialize({k: to_numpy(p) for k, p in self.params.items()})}
        if result.best_state is not None:
            files["best.safetensors"] = safetensors_io.serialize({k: to_numpy(v) for k, v in result.best_state.items()})
        files["optimizer.safetensors"] = safetensors_io.serialize(opt_tensors)
        files["rng.safetensors"] = safetensors_io.serialize(rng_tensors)
        if self.hooks is not None:
            plain, arrays = self.hooks.state()
            state["hooks"] = plain
            files[HOOKS] = safetensors_io.serialize(arrays)
        files[STATE] = canonical_json(state)
        return files

    def restore(self, optimizer: Any, scheduler: Any) -> LoopResult | None:
        """Put the checkpoint's adapter, optimizer, scheduler and loop back; the RNG states last."""
        if self.resume_from is None or self.state is None:
            return None
        path, state = self.resume_from, self.state
        current = _load(path / "adapter.safetensors")
        if sorted(current) != sorted(self.params):
            raise CheckpointError("the checkpoint's adapter parameters are not this run's", file=str(path),
                                  expected=sorted(self.params)[:4], found=sorted(current)[:4], code="resume_mismatch")
        with torch.no_grad():
            for name, param in self.params.items():
                value = current[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError("a parameter of the checkpoint has another shape", file=str(path),
                                          location=name, expected=list(param.shape), found=list(value.shape),
                                          code="resume_mismatch")
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        optimizer.load_state_dict(_decode_optimizer(optimizer, _load(path / "optimizer.safetensors"),
                                                    state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        best = _load(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
        result = _loop_result(state["loop"], best)
        if self.hooks is not None:
            arrays, _ = safetensors_io.load(path / HOOKS) if (path / HOOKS).is_file() else ({}, None)
            self.hooks.load_state(state.get("hooks", {}), arrays)
        _set_rng_state(self.ctx, state["rng"][self.ctx.rank], _load(path / "rng.safetensors"))
        return result


def _load(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = safetensors_io.load(path)
    return {k: to_torch(v) for k, v in tensors.items()}


def _loop_state(result: LoopResult) -> dict[str, Any]:
    return {"steps": result.steps, "train_losses": list(result.train_losses),
            "evaluations": [asdict(e) for e in result.evaluations], "best_step": result.best_step,
            "best_loss": result.best_loss, "best_accuracy": result.best_accuracy, "since_best": result.since_best,
            "pending": list(result.pending), "stopped_early": result.stopped_early}


def _loop_result(data: Mapping[str, Any], best: dict[str, torch.Tensor] | None) -> LoopResult:
    return LoopResult(steps=data["steps"], train_losses=list(data["train_losses"]),
                      evaluations=[Evaluation(**e) for e in data["evaluations"]], best_step=data["best_step"],
                      best_loss=data["best_loss"], best_accuracy=data["best_accuracy"], best_state=best,
                      stopped_early=data["stopped_early"], since_best=data["since_best"],
                      pending=list(data["pending"]))


def _optimizer_state(optimizer: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors by ``<index>.<name>``, the rest as plain data) of ``optimizer.state_dict()``."""
    state = optimizer.state_dict()
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = to_numpy(value)
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": _plain(state["param_groups"]), "scalars": _plain(scalars)}


def _decode_optimizer(optimizer: Any, tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for saved, current in zip(plain["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _rng_state(ctx: Dist) -> dict[str, Any]:
    """This rank's RNG states: tensors (torch, CUDA, the Mersenne Twister words of Python and NumPy) and the rest."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None,
        "python": torch.from_numpy(np.asarray(internal, dtype=np.int64)),  # 32-bit words (and the index)
        "numpy": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "plain": {"python": {"version": version, "gauss": gauss},
                  "numpy": {"bit_generator": numpy_state["bit_generator"], "pos": int(numpy_state["state"]["pos"]),
                            "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])}},
    }


def _set_rng_state(ctx: Dist, plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    rank = ctx.rank
    python = plain["python"]
    random.setstate((python["version"], tuple(int(v) for v in to_numpy(tensors[f"python.{rank}"])), python["gauss"]))
    numpy_plain = plain["numpy"]
    np.random.set_state({"bit_generator": numpy_plain["bit_generator"],
                         "state": {"key": to_numpy(tensors[f"numpy.{rank}"]).astype(np.uint32),
                                   "pos": numpy_plain["pos"]},
                         "has_gauss": numpy_plain["has_gauss"], "gauss": numpy_plain["gauss"]})
    torch.set_rng_state(tensors[f"torch.{rank}"])
    if ctx.device.type == "cuda" and f"cuda.{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda.{rank}"], ctx.device)


def _gather(ctx: Dist, value: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``value``, on rank 0 (the job's own processes: torch.distributed's object collective)."""
    if ctx.world == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out
