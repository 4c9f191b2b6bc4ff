"""``adapterkit merge``."""

from __future__ import annotations


import click

DTYPES = ("auto", "float32", "bfloat16", "float16")


@click.command("merge")
@click.argument("adapter", type=click.Path(exists=True, path_type=str))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local Hugging Face model folder (config.json + safetensors) the adapter was made for.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str),
              help="New folder for the merged model.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="dtype of the merged model's float tensors (auto: keep the base's).")
@click.option("--from", "format_", metavar="FMT", help="Format of ADAPTER (default: detected).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def command(adapter: str, base: str, out_dir: str, dtype: str, format_: str | None, overwrite: bool) -> None:
    """Fold ADAPTER into the base model and write a full Hugging Face model
    folder (-o), ready for from_pretrained, vLLM or llama.cpp's converter.

    The merge streams shard by shard without torch: each adapted weight gets its
    update added in float32 and rounded once to the output dtype. The shard
    layout, the index, config, tokenizer and generation files are kept. The
    output appears atomically. Methods that cannot be merged are refused with
    the reason.
    """
    from adapterkit.core.api import load
    from adapterkit.core.ops.merge import merge_into_base

    loaded = load(adapter, format_, base=base)
    merge_into_base(loaded, base, out_dir, dtype=None if dtype == "auto" else dtype, overwrite=overwrite,
                    progress=True)
    click.echo(f"wrote {out_dir} ({loaded.method}, {len(loaded.targets)} modules merged into {base})")


