"""``adapterkit bench``."""

from __future__ import annotations

import sys

import click

from .output import echo_json


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter("a comma-separated list of integers >= 1, e.g. 1,8", ctx=ctx, param=param)
    return sizes


@click.command("bench")
@click.argument("adapter", type=click.Path(exists=True, path_type=str))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local Hugging Face model folder the adapter was made for.")
@click.option("--from", "format_", metavar="FMT", help="Format of ADAPTER (default: detected).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Measured runs of every timing (after one warm-up run).")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per row of the forward and training inputs.")
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_batch_sizes, metavar="B1,B2,...",
              help="Comma-separated batch sizes of the forward latency.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads while measuring (default: every core).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="Also write a PNG chart of the report.")
def command(adapter: str, base: str, format_: str | None, repeats: int, seq_len: int, batch_sizes: list[int],
            threads: int | None, as_json: bool, plot_path: str | None) -> None:
    """Measure ADAPTER on the base model on this machine: parameters and sizes
    (and what storing 10 fine-tuned copies costs against 10 adapters), load and
    apply time, forward latency of the base, the adapter unmerged and merged
    (where the method can merge) per batch size, one training step (AdamW) and
    the memory it adds, and for LoRA hot-swap latency and mixed-batch
    throughput through the adapter pool.

    Every time is the median of --repeats runs after a warm-up, with min and max.
    """
    from adapterkit.core.bench.measure import bench_adapter
    from adapterkit.core.bench.render import format_text, plot

    def progress(text: str) -> None:
        if sys.stderr.isatty():
            click.echo(f"... {text}", err=True)

    report = bench_adapter(adapter, base, repeats=repeats, seq_len=seq_len, batch_sizes=batch_sizes, threads=threads,
                           format=format_, progress=progress)
    if plot_path:
        plot(report, plot_path)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(format_text(report))
        if plot_path:
            click.echo(f"\nwrote {plot_path}")
