"""``adapterkit train``: a thin wrapper over :func:`adapterkit.core.train.run.train`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

SCHEDULES = ("constant", "linear", "cosine")


def _number(value: float | None) -> float | int | None:
    """16.0 -> 16, so the manifest's config reads as the user typed it."""
    return int(value) if value is not None and float(value).is_integer() else value


@click.command("train")
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local Hugging Face model folder with a tokenizer (config.json, safetensors, tokenizer files).")
@click.option("--method", required=True, help="Method id: lora, qlora, dora, prompt, prefix, bottleneck, "
                                              "or one a plugin adds (adapterkit plugins).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSON Lines: {"text"}, {"prompt", "completion"} (causal LM) or {"text", "label"} (classification).')
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="New folder for the adapter.")
# method options
@click.option("--rank", type=click.IntRange(min=1), help="Rank (LoRA-family r).")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="LoRA alpha (scale = alpha / r).")
@click.option("--targets", help='Modules to adapt: "all-linear", a comma list (q_proj,v_proj) or a regex.')
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), help="Adapter dropout.")
@click.option("--reduction-factor", type=click.FloatRange(min=0, min_open=True),
              help="Bottleneck: hidden size / bottleneck size.")
@click.option("--num-virtual-tokens", type=click.IntRange(min=1), help="Prompt / prefix tuning: virtual tokens.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]), help="Quantise the base to 4 bits: trains QLoRA.")
@click.option("--config", "config_pairs", multiple=True, metavar="KEY=VALUE",
              help="Any method config field (repeatable); VALUE is JSON when it parses, else a string. "
                   "Checked by the method, e.g. --config preset=par_bn --config use_rslora=true.")
# training options
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the data.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Examples per optimizer step, over all processes and accumulation steps.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step (same result, less memory).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
              help="AdamW learning rate.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warmup steps.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
              help="Learning rate after the warmup.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Gradient clipping (0: off).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, the order and the init.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Steps between evaluations "
              "(default: once an epoch, at least 10 times a run).")
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=0.1, show_default=True,
              help="Share of the data held out for validation (0: none).")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False), help="Validation file (instead of a split).")
@click.option("--patience", type=click.IntRange(min=1),
              help="Early stopping: stop after this many evaluations without a better validation loss.")
@click.option("--max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per example (longer ones are cut at the end).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward pass (weights stay float32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--head-base", type=click.Path(file_okay=False),
              help="Classification on a base without a head: write the base with a new, seeded, frozen head here "
                   "and train for it.")
@click.option("--base-name", help="Base model name to record in the manifest (default: the --base path).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and --head-base) if they exist.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the frozen base over the processes (FSDP2, one "
                                           "unit per layer); the adapter stays whole on each.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), metavar="N",
              help="Write a checkpoint to OUT/checkpoints/step-N every N steps (and at the last step).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True, metavar="K",
              help="How many of the newest checkpoints to keep.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its newest complete checkpoint "
                                             "(the same options; --max-steps may grow under the constant schedule).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(base: str, method: str, data: str, out: str, rank: int | None, alpha: float | None, targets: str | None,
            dropout: float | None, reduction_factor: float | None, num_virtual_tokens: int | None,
            quantize: str | None, config_pairs: tuple[str, ...], max_grad_norm: float, as_json: bool,
            **options: Any) -> None:
    """Train a new adapter of any method on a JSON Lines file and save it to OUT.

    A seeded share of the data is held out; the adapter with the best
    validation loss is kept, and training stops early with --patience. The
    output is a validated adapterkit adapter whose provenance.training holds the
    run's summary. Progress goes to stderr, the report to stdout.

    Data-parallel: torchrun --nproc_per_node N -m adapterkit train ... (docs/training.md);
    add --fsdp to shard the base. --checkpoint-every N writes resumable checkpoints; --resume continues.
    """
    from adapterkit.core.io import parse_pairs
    from adapterkit.core.train.config import method_config, parse_targets

    shortcuts = {"rank": rank, "alpha": _number(alpha), "targets": parse_targets(targets) if targets else None,
                 "dropout": dropout, "reduction_factor": _number(reduction_factor),
                 "num_virtual_tokens": num_virtual_tokens}
    method, config = method_config(method, parse_pairs(config_pairs), shortcuts=shortcuts, quantize=quantize)
    _quiet_import_noise()
    from adapterkit.core.train.run import train

    echo = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    result = train(base, method, data, out, config=config, echo=echo,
                   max_grad_norm=max_grad_norm or None, **options)
    if result.rank != 0:
        return
    if as_json:
        from .output import echo_json

        echo_json(result.to_dict())
    else:
        _report(result)


def _report(result: Any) -> None:
    from .output import human_bytes

    rows = [
        ("base", f"{result.base} ({result.task})"),
        ("data", f"{result.train_examples} training, {result.val_examples} validation examples"
                 + (f"; labels {', '.join(result.labels)}" if result.labels else "")),
        ("trainable", f"{result.trainable_parameters:,} parameters"),
        ("steps", f"{result.steps} ({result.epochs:.3g} epochs) in {result.seconds:.1f} s"
                  + (f" on {result.world_size} processes" if result.world_size > 1 else "")
                  + (f", resumed at step {result.resumed_from}" if result.resumed_from is not None else "")),
    ]
    if result.base_bytes is not None:
        held = " / ".join(human_bytes(b) for b in result.base_bytes_per_rank)
        rows.append(("base memory", f"{human_bytes(result.base_bytes)} of parameters; "
                             + {"fsdp": f"sharded (FSDP): {held} per rank",
                                "ddp": f"a whole copy on each of the {result.world_size} processes (data-parallel)",
                                }.get(result.sharding, "one process")))
    if result.checkpoint is not None:
        rows.append(("checkpoint", f"{result.checkpoint}"))
    if result.best_val_loss is not None:
        rows.append(("validation loss", f"{result.initial_val_loss:.4f} before, best {result.best_val_loss:.4f} at "
                                        f"step {result.best_step} (saved)"
                                        + ("; stopped early" if result.stopped_early else "")))
    if result.best_val_accuracy is not None:
        unit = "examples" if result.task != "causal-lm" else "next tokens of the completions"
        rows.append(("validation accuracy", f"{100 * result.initial_val_accuracy:.1f}% before, "
                                            f"{100 * result.best_val_accuracy:.1f}% at step {result.best_step} "
                                            f"(right {unit})"))
    if result.final_train_loss is not None:
        rows.append(("training loss", f"{result.final_train_loss:.4f} at the last step"))
    memory = f"{human_bytes(result.peak_rss_bytes)} RSS"
    if result.peak_device_bytes is not None:
        memory += f", {human_bytes(result.peak_device_bytes)} on the GPU"
    rows.append(("peak memory", memory))
    if result.head_base is not None:
        rows.append(("head base", f"{result.head_base} (apply the adapter to this folder)"))
    click.echo(f"Trained a {result.method} adapter: {result.path}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"  {name:<{width}}  {value}")


def _quiet_import_noise() -> None:
    """Optional torch extensions (torchao, bitsandbytes) log load failures that say nothing about training."""
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")
