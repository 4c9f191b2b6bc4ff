"""``adapterkit compose``."""

from __future__ import annotations

import click

from adapterkit.core.plugin.capabilities import LOW_RANK_STRATEGIES as STRATEGIES


def _weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter("expected comma-separated numbers, e.g. 0.7,0.3") from None


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str), help="New adapter folder (with --runtime: composition folder).")
@click.option("--strategy", metavar="NAME",
              help=f"How to combine (docs/compose.md). Methods with low-rank factors (LoRA, ...): "
                   f"{', '.join(STRATEGIES)}; another method: the ones its plugin declares (an unknown name lists "
                   "them).")
@click.option("--weights", callback=_weights, metavar="W1,W2,...", help="One weight per adapter (default 1 each).")
@click.option("--density", type=float, help="Fraction of entries kept (ties, dare_*, magnitude_prune).")
@click.option("--rank", type=int, help="Rank of the result (svd; default: the largest input rank).")
@click.option("--seed", type=int, help="Random seed (dare_*; default: drawn and recorded).")
@click.option("--majority-sign", type=click.Choice(("total", "frequency")), default="total", show_default=True,
              help="Sign election of ties / dare_ties.")
@click.option("--to", "to_format", default="adapterkit", show_default=True, metavar="FMT", help="Output format.")
@click.option("--runtime", metavar="BLOCK",
              help="Instead of --strategy: write a runtime composition folder (composition.json + the adapters) "
                   "for adapterkit.apply_composition: stack, average, weighted_sum, or a JSON block tree.")
@click.option("--names", callback=lambda ctx, param, value: value.split(",") if value else None, metavar="N1,N2,...",
              help="Member names of a --runtime composition (default: the adapter folders' names).")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local HF base model folder, for input formats whose reader needs it (torchtune, ...).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def command(adapters: tuple[str, ...], out_dir: str, strategy: str | None, weights: list[float] | None,
            density: float | None, rank: int | None, seed: int | None, majority_sign: str, to_format: str,
            runtime: str | None, names: list[str] | None, base: str | None, overwrite: bool) -> None:
    """Combine adapters of one method, made for one base model, into a new adapter.

    LoRA: linear, ties, dare_linear, dare_ties and magnitude_prune combine the A
    and B factors as PEFT's add_weighted_adapter does (equal ranks per module);
    cat concatenates them (exact; ranks add up); svd keeps the best rank --rank
    approximation of the weighted sum. Modules missing from an adapter count as
    zero. Another method composes when its plugin declares strategies (its
    compose hook does the math). The result records its sources and settings
    in its provenance.

    With --runtime BLOCK instead, nothing is combined: the adapters are written
    into a composition folder that adapterkit.apply_composition runs on a model
    (stack: one after another; average / weighted_sum: their outputs mixed by
    --weights) and that validate and inspect check (docs/compose.md).
    """
    if (strategy is None) == (runtime is None):
        raise click.UsageError("pass exactly one of --strategy (a new adapter) and --runtime (a composition folder)")
    if runtime is not None:
        given = [flag for flag, used in (("--density", density is not None), ("--rank", rank is not None),
                                         ("--seed", seed is not None), ("--majority-sign", majority_sign != "total"),
                                         ("--to", to_format != "adapterkit")) if used]
        if given:
            raise click.UsageError(f"{', '.join(given)}: not used with --runtime (they set --strategy's math)")
        _write_runtime(adapters, out_dir, runtime, weights, names, base, overwrite)
        return
    assert strategy is not None
    if names is not None:
        raise click.UsageError("--names names the members of a --runtime composition")
    from adapterkit.core.api import save
    from adapterkit.core.ops.compose import compose

    adapter = compose(list(adapters), strategy, weights, density, rank, seed, majority_sign=majority_sign, base=base)
    save(adapter, out_dir, to_format, overwrite=overwrite, **({"base": base} if base and _writer_takes_base(to_format)
                                                                else {}))
    ranks = sorted({t["r"] for t in adapter.targets.values() if "r" in t})
    rank_text = f", rank {', '.join(map(str, ranks))}" if ranks else ""
    click.echo(f"wrote {out_dir} ({adapter.method} {strategy} of {len(adapters)} adapters, "
               f"{len(adapter.targets)} modules{rank_text})")


def _writer_takes_base(to_format: str) -> bool:
    from adapterkit.core.plugin.registry import default_registry
    from adapterkit.core.store.adapters import takes_option

    return takes_option(default_registry().format(to_format).write_options, "base")


def _write_runtime(adapters: tuple[str, ...], out_dir: str, runtime: str, weights: list[float] | None,
                   names: list[str] | None, base: str | None, overwrite: bool) -> None:
    """``compose --runtime``: a composition folder through :func:`adapterkit.save_composition`."""
    import json
    from pathlib import Path

    from adapterkit.core.api import load
    from adapterkit.core.format.composition import KINDS, parse

    names = names or [Path(path).resolve().name for path in adapters]
    if len(names) != len(adapters):
        raise click.UsageError(f"{len(names)} name(s) given for {len(adapters)} adapter(s)")
    if len(set(names)) != len(names):
        raise click.UsageError(f"two adapters are named alike ({', '.join(names)}); name them with --names")
    if runtime in KINDS:
        tree: dict = {"type": runtime, "children": names}
        if weights is not None:
            tree["weights"] = weights
    else:
        try:
            tree = json.loads(runtime)
        except json.JSONDecodeError:
            raise click.BadParameter(f"expected one of {', '.join(KINDS)} or a JSON block tree such as "
                                     '\'{"type": "stack", "children": ["a", "b"]}\'', param_hint="--runtime") from None
        if weights is not None:
            raise click.UsageError("--weights applies to a flat --runtime block; put weights in the JSON tree")
    block = parse(tree)
    from adapterkit.core.store.composition_folder import save_composition

    members = {name: load(path, base=base) for name, path in zip(names, adapters)}
    save_composition(out_dir, block, members, overwrite=overwrite)
    click.echo(f"wrote {out_dir} (runtime {block.kind} composition of {', '.join(block.members())})")
