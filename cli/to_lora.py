"""``adapterkit to-lora``."""

from __future__ import annotations

import click

from .output import echo_json

from adapterkit.core.check.targets import TARGETS


@click.command("to-lora")
@click.argument("src", type=click.Path(exists=True, path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--rank", type=int, help="One rank for every module (>= 1; clamped to a module's min(out, in)).")
@click.option("--energy", type=float,
              help="Instead of --rank: each module's smallest rank keeping this fraction of its squared singular "
                   "values, in (0, 1], e.g. 0.99.")
@click.option("--target", type=click.Choice(TARGETS),
              help="The serving runtime: vllm rounds each rank up to one vLLM accepts; every target's "
                   "validate --target rules must pass on the result.")
@click.option("--base", type=click.Path(exists=True, file_okay=False),
              help="Local HF model folder of the base: needed when the update depends on the base weight "
                   "(DoRA, IA3), read one tensor at a time.")
@click.option("--to", "to_format", default="adapterkit", show_default=True, metavar="FMT",
              help="Output format (peft, gguf, ...; adapterkit plugins lists them).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(src: str, dst: str, rank: int | None, energy: float | None, target: str | None, base: str | None,
            to_format: str, overwrite: bool, as_json: bool) -> None:
    """Lower the adapter SRC to a plain LoRA in DST by truncated SVD of each
    module's weight delta, module by module.

    Any method whose delta is computable lowers: low-rank factors (LoRA, QLoRA;
    a lower rank without forming the delta), an additive delta, or a merged
    weight computed from the base (DoRA, IA3: pass --base). Without --rank or
    --energy every module keeps the full rank of its delta (exact). The report
    gives each module's rank and relative Frobenius error of its delta, the
    worst and the total. A method without a delta (bottleneck, prompt and
    prefix tuning) is refused and nothing is written.

    Exit status: 0 written, 1 refused (nothing written), 2 usage error.
    """
    from adapterkit.core.ops.lower import to_lora
    from adapterkit.core.plugin.registry import default_registry
    from adapterkit.core.store.adapters import save

    lowering = to_lora(src, rank, energy, target=target, base=base)
    writer = default_registry().format(to_format)
    options = {"base": base} if base is not None and (writer.write_options is None
                                                      or "base" in writer.write_options) else {}
    save(lowering.adapter, dst, to_format, overwrite=overwrite, **options)
    if as_json:
        echo_json({"path": dst, "format": to_format, **lowering.to_dict()})
        return
    ranks = sorted({m.rank for m in lowering.modules})
    worst = lowering.worst
    click.echo(f"wrote {dst} ({lowering.adapter.method} from {lowering.source_method}, {to_format}, "
               f"{len(lowering.modules)} modules, rank {', '.join(map(str, ranks))})")
    width = max(len(m.module) for m in lowering.modules)
    for m in lowering.modules:
        click.echo(f"  {m.module:<{width}}  rank {m.rank:>4}  error {m.error:.3e}")
    click.echo(f"  worst: {worst.module} (rank {worst.rank}, error {worst.error:.3e}); "
               f"total error {lowering.total_error:.3e}")
    if lowering.validation is not None:
        click.echo(f"  {target} rules: passed")
        for warning in lowering.validation.warnings:
            if warning.code == "vllm_format":  # the folder's format is --to's business
                if to_format != "peft":
                    click.echo("  warning: vLLM loads PEFT folders: pass --to peft")
                continue
            click.echo(f"  warning: {warning.message}" + (f". {warning.hint}" if warning.hint else ""))
