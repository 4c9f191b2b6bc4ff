"""``adapterkit convert``."""

from __future__ import annotations

import click

from .options import format_options, parse_format_options


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--from", "from_format", metavar="FMT", help="Source format (default: detected from the files).")
@click.option("--to", "to_format", metavar="FMT", required=True, help="Target format (adapterkit plugins lists them).")
@click.option("--base", type=click.Path(exists=True, file_okay=False),
              help="Local HF base model folder, for formats that need the base's config or module names.")
@click.option("--peft-version", metavar="X",
              help="With --to peft: write an adapter_config.json PEFT release X loads (fields it does not know left "
                   "out), or refuse an adapter it cannot hold. Same as -O peft_version=X.")
@format_options
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def command(src: str, dst: str, from_format: str | None, to_format: str, base: str | None, peft_version: str | None,
            format_option: tuple[str, ...], overwrite: bool) -> None:
    """Convert the adapter SRC into DST (a new folder) in format --to.

    The output is written to a temporary folder and renamed into place, so DST
    is either absent or complete. A conversion the target cannot express
    exactly is refused with a message saying what would be lost.
    """
    from adapterkit.core.api import convert

    options = parse_format_options(format_option)
    if peft_version is not None:
        if "peft_version" in options:
            raise click.UsageError("give the PEFT release once: --peft-version or -O peft_version")
        options["peft_version"] = peft_version
    convert(src, dst, to_format, from_format=from_format, base=base, overwrite=overwrite, **options)
    click.echo(f"wrote {dst} ({to_format})")
