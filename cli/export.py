"""``adapterkit export``: ship a base model with adapters for a runtime (``onnx``, ``check``)."""

from __future__ import annotations

from typing import Any

import click

from adapterkit.core.export.onnx import EXPORTERS, MODES


@click.group("export")
def command() -> None:
    """Export a base model with adapters for a runtime (ONNX Runtime)."""


@command.command("onnx")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local Hugging Face model folder (config.json + safetensors) the adapters were made for.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str),
              help="New folder: model.onnx, model.onnx.data, adapters/*.onnx_adapter, export.json.")
@click.option("--mode", type=click.Choice(MODES), default="merged", show_default=True,
              help="merged: one adapter folded into (or traced with) the graph. swappable: the base once, "
                   "LoRA factors as graph inputs, one .onnx_adapter file per ADAPTER.")
@click.option("--opset", type=click.IntRange(7), default=None, help="ONNX opset  [default: 18]")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="auto", show_default=True,
              help="torch.onnx exporter: torchscript (dynamo=False), dynamo, or auto (torchscript, then dynamo).")
@click.option("--batch", type=click.IntRange(2), default=2, show_default=True,
              help="Batch size of the traced example (the model takes any).")
@click.option("--seq-len", type=click.IntRange(2), default=8, show_default=True,
              help="Sequence length of the traced example (the model takes any).")
@click.option("--atol", type=click.FloatRange(0), default=1e-4, show_default=True,
              help="Absolute tolerance of the ONNX Runtime vs torch check.")
@click.option("--rtol", type=click.FloatRange(0), default=1e-5, show_default=True,
              help="Relative tolerance, times the largest |output| (float32 rounding grows with the logits).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs torch comparison.")
@click.option("--from", "format_", metavar="FMT", help="Format of the ADAPTERS (default: detected).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest as JSON.")
def onnx_command(adapters: tuple[str, ...], base: str, out_dir: str, mode: str, opset: int | None, exporter: str,
                 batch: int, seq_len: int, atol: float, rtol: float, no_verify: bool, format_: str | None,
                 overwrite: bool, as_json: bool) -> None:
    """Export BASE with ADAPTERS (one in merged mode, one or more in
    swappable mode) to ONNX, and check it in ONNX Runtime.

    Inputs input_ids and attention_mask (int64, any batch and length); output
    logits (float32, no KV cache). Unless --no-verify, the model runs in ONNX
    Runtime on inputs of another shape than the traced ones and must match the
    torch model with the adapter applied within --atol + --rtol * max|logit|
    of its float32 run, or of its float64 run with that bound widened by twice
    torch float32's own distance from float64 (swappable: every adapter and no
    adapter, switched in one session); otherwise nothing is written. The output
    folder appears atomically.
    """
    from adapterkit.core.api import load
    from adapterkit.core.export.onnx import export_onnx
    from adapterkit.core.export.files import read_manifest

    def progress(line: str) -> None:
        click.echo(line, err=True)

    loaded: list[Any] = [load(path, format_, base=base) for path in adapters] if format_ is not None else list(adapters)
    out = export_onnx(loaded, base, out_dir, mode=mode, opset=opset, exporter=exporter, batch=batch,
                      seq_len=seq_len, verify=not no_verify, atol=atol, rtol=rtol, overwrite=overwrite,
                      progress=progress)
    manifest = read_manifest(out)
    if as_json:
        from .output import echo_json

        echo_json(manifest)
        return
    _summary(str(out), manifest)


def _summary(path: str, manifest: dict[str, Any]) -> None:
    from .output import human_bytes

    files = manifest.get("files", {})
    click.echo(f"wrote {path} ({manifest['mode']}, {manifest['exporter']} exporter, opset {manifest['opset']}, "
               f"{human_bytes(sum(files.values()))})")
    for item in manifest.get("inputs", []):
        click.echo(f"  input   {item['name']} {item['dtype']} {item['shape']}")
    for item in manifest.get("outputs", []):
        click.echo(f"  output  {item['name']} {item['dtype']} {item['shape']}")
    factors = manifest.get("factor_inputs") or {}
    if factors:
        click.echo(f"  factor inputs: {2 * len(factors)} (<module>.lora_A.weight [in, r], "
                   "<module>.lora_B.weight [r, out]; rank 0 by default)")
    for name, entry in sorted((manifest.get("adapters") or {}).items()):
        click.echo(f"  adapter {entry['file']} ({entry['method']}, {entry['modules']} modules, ranks {entry['ranks']})")
    verification = manifest.get("verification")
    if verification:
        exact = verification.get("max_abs_diff_float64") or {}
        diffs = ", ".join(f"{k} {v:.2e}" + (f" (float64 {exact[k]:.2e})" if k in exact else "")
                          for k, v in verification["max_abs_diff"].items())
        shape = verification["inputs"]
        click.echo(f"  verified in ONNX Runtime on {shape['batch']}x{shape['sequence']} {shape.get('tokens', '')} "
                   f"tokens: max |diff| {diffs} (atol {verification['atol']:g}, rtol {verification['rtol']:g})")


@command.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--session", is_flag=True, help="Also open the model in ONNX Runtime and load every adapter file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check_command(ctx: click.Context, folder: str, session: bool, as_json: bool) -> None:
    """Check an export FOLDER: manifest and files, onnx.checker on the model,
    inputs and outputs, and each adapter file against the model's factor inputs.
    Exit 1 when something is wrong."""
    from adapterkit.core.export.files import check_export

    report = check_export(folder, session=session)
    if as_json:
        from .output import echo_json

        echo_json(report.to_dict())
    else:
        mode = report.manifest.get("mode")
        click.echo(f"{folder}: {'ok' if report.ok else 'INVALID'}" + (f" ({mode} export)" if mode else ""))
        for item in report.model.get("inputs", []):
            click.echo(f"  input   {item['name']} {item['dtype']} {item['shape']}")
        for item in report.model.get("outputs", []):
            click.echo(f"  output  {item['name']} {item['dtype']} {item['shape']}")
        overridable = report.model.get("overridable", [])
        if overridable:
            click.echo(f"  factor inputs with defaults: {len(overridable)}")
        for name, entry in sorted(report.adapters.items()):
            click.echo(f"  adapter {name}: {'ok' if entry.get('ok') else 'INVALID'}, "
                       f"{entry.get('modules', '?')} modules, ranks {entry.get('ranks', '?')}")
        for error in report.errors:
            click.echo(f"error: {error}", err=True)
    if not report.ok:
        ctx.exit(1)
