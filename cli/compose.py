"""``adapterkit compose``."""

from __future__ import annotations

import click

STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter("expected comma-separated numbers, e.g. 0.7,0.3") from None


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str), help="New adapter folder.")
@click.option("--strategy", required=True, metavar="NAME",
              help=f"How to combine (docs/compose.md). LoRA: {', '.join(STRATEGIES)}; another method: the ones "
                   "its plugin declares (an unknown name lists them).")
@click.option("--weights", callback=_weights, metavar="W1,W2,...", help="One weight per adapter (default 1 each).")
@click.option("--density", type=float, help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
@click.option("--rank", type=int, help="Rank of the result (svd; default: the largest input rank).")
@click.option("--seed", type=int, help="Random seed (dare_*; default: drawn and recorded).")
@click.option("--majority-sign", type=click.Choice(("total", "frequency")), default="total", show_default=True,
              help="Sign election of ties / dare_ties.")
@click.option("--to", "to_format", default="adapterkit", show_default=True, metavar="FMT", help="Output format.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def command(adapters: tuple[str, ...], out_dir: str, strategy: str, weights: list[float] | None, density: float | None,
            rank: int | None, seed: int | None, majority_sign: str, to_format: str, overwrite: bool) -> None:
    """Combine adapters of one method, made for one base model, into a new adapter.

    LoRA: linear, ties, dare_linear, dare_ties and magnitude_prune combine the A
    and B factors as PEFT's add_weighted_adapter does (equal ranks per module);
    cat concatenates them (exact; ranks add up); svd keeps the best rank --rank
    approximation of the weighted sum. Modules missing from an adapter count as
    zero. Another method composes when its plugin declares strategies (its
    compose hook does the math). The result records its sources and settings
    in its provenance.
    """
    from .merge import prefer_single_threaded_blas

    prefer_single_threaded_blas()
    from adapterkit.core.api import save
    from adapterkit.core.compose import compose

    adapter = compose(list(adapters), strategy, weights, density, rank, seed, majority_sign=majority_sign)
    save(adapter, out_dir, to_format, overwrite=overwrite)
    ranks = sorted({t["r"] for t in adapter.targets.values() if "r" in t})
    rank_text = f", rank {', '.join(map(str, ranks))}" if ranks else ""
    click.echo(f"wrote {out_dir} ({adapter.method} {strategy} of {len(adapters)} adapters, "
               f"{len(adapter.targets)} modules{rank_text})")
