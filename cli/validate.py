"""``adapterkit validate``."""

from __future__ import annotations

import click

from .options import format_options, parse_format_options
from .output import echo_json

#: adapterkit.core.runtime_targets.TARGETS (not imported: keeps --help light; a test checks they agree)
TARGETS = ("vllm", "llama.cpp", "onnxruntime")


@click.command("validate")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--base", type=click.Path(exists=True, file_okay=False), help="Local HF model folder to check the adapter against.")
@click.option("--from", "format_", metavar="FMT", help="Format of PATH (default: detected).")
@click.option("--target", type=click.Choice(TARGETS),
              help="Also check what this serving runtime would reject (vLLM, llama.cpp, ONNX Runtime).")
@format_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(path: str, base: str | None, format_: str | None, target: str | None, format_option: tuple[str, ...],
            as_json: bool) -> None:
    """Check an adapter: manifest schema, method config, expected tensors and
    shapes, dtypes, checksums, NaN/Inf, and with --base that every target exists
    in the base with the recorded shape (read from headers; weights are not loaded).

    With --target, also what that runtime would reject or serve wrong: vllm
    (method, rank vs --max-lora-rank, per-module scales, modules, PEFT fields),
    llama.cpp (method; with --base, a dry-run GGUF conversion: architecture,
    tensor names, pairing), onnxruntime (low-rank factors, .onnx_adapter names
    and dtypes).

    Exit status: 0 valid, 1 invalid, 2 usage error.
    """
    from adapterkit.core.api import validate

    report = validate(path, base=base, format=format_, target=target, **parse_format_options(format_option))
    if as_json:
        echo_json(report.to_dict())
    else:
        status = click.style("valid", fg="green") if report.valid else click.style("invalid", fg="red")
        what = ", ".join(x for x in (report.format, report.method) if x)
        click.echo(f"{status}: {path}" + (f" ({what})" if what else ""))
        for error in report.errors:
            click.echo(f"  error: {error}")
        for warning in report.warnings:
            click.echo(f"  warning: {warning}")
        if report.checks:
            click.echo("  checked: " + "; ".join(report.checks))
        if report.not_checked:
            click.echo("  not checked: " + "; ".join(report.not_checked))
    raise SystemExit(0 if report.valid else 1)
