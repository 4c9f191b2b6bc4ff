"""``adapterkit inspect``."""

from __future__ import annotations

import click

from .options import format_options, parse_format_options
from .output import echo_json, human_bytes, human_count


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Local HF base model folder, for formats whose reader needs it (torchtune, PEFT prompt tuning, ...).")
@click.option("--from", "format_", metavar="FMT", help="Format of PATH (default: detected).")
@format_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(path: str, base: str | None, format_: str | None, format_option: tuple[str, ...], as_json: bool) -> None:
    """Summarise an adapter: method, targets, ranks, parameters, file size and size relative to the base."""
    from adapterkit.core.api import inspect

    summary = inspect(path, base, format=format_, **parse_format_options(format_option))
    if as_json:
        echo_json(summary)
        return
    if "composition" in summary:
        _echo_rows(_composition_rows(summary))
        return
    base = summary["base_model"]
    rows = [
        ("format", summary["format"]),
        ("method", f"{summary['method']} {_config_text(summary['config'])}".strip()),
        ("base model", " ".join(str(base[k]) for k in ("name", "architecture") if base.get(k)) or "-"),
        ("task", summary["task"] or "-"),
        ("dtype", summary["dtype"]),
        ("targets", f"{summary['targets']} modules: {', '.join(summary['modules'])}"),
        ("ranks", _counts(summary["ranks"])),
        ("alphas", _counts(summary["alphas"])),
        ("parameters", f"{summary['parameters']:,} ({human_count(summary['parameters'])})"),
        ("file size", human_bytes(summary["file_bytes"])),
    ]
    experts = summary.get("expert_parameters") or {}
    if experts:
        shapes = sorted({f"{p.rsplit('.', 1)[-1]} {'x'.join(map(str, e['shape']))}" for p, e in experts.items()})
        rows.append(("experts", f"{len(experts)} expert parameters ({max(e['experts'] for e in experts.values())} "
                                f"experts, one rank-r pair each): {', '.join(shapes)}"))
    if "parameters_relative_to_base" in summary:
        rows.append(("vs base", f"{100 * summary['parameters_relative_to_base']:.3f}% of "
                                f"{human_count(summary['base_parameters'])} base parameters"))
    rows.extend(("warning", text) for text in summary.get("warnings", ()))
    _echo_rows(rows)


def _composition_rows(summary: dict) -> list[tuple[str, str]]:
    """A composition folder: its block tree, the mixing coefficients, then one line per member."""
    base = summary["base_model"]
    rows = [
        ("format", f"{summary['format']} {summary['format_version']}"),
        ("composition", _block_text(summary["composition"])),
        ("method", summary["method"]),
        ("base model", " ".join(str(base[k]) for k in ("name", "architecture") if base.get(k)) or "-"),
        ("parameters", f"{summary['parameters']:,} ({human_count(summary['parameters'])}) in "
                       f"{len(summary['members'])} members"),
    ]
    for block in summary["coefficients"]:
        mix = ", ".join(f"{c} x{k:.4g}" for c, k in zip(block["children"], block["coefficients"]))
        rows.append((f"{block['type']}", f"output = {mix}"))
    for name, member in summary["members"].items():
        rows.append((f"member {name}", f"{member['path']} ({member['format']}, {member['targets']} modules, "
                                       f"{human_count(member['parameters'])} parameters)"))
    return rows


def _block_text(block: dict) -> str:
    """``stack(a, average(b, c; weights 1, 3))``: the tree on one line."""
    children = ", ".join(c if isinstance(c, str) else _block_text(c) for c in block["children"])
    extra = f"; weights {', '.join(f'{w:g}' for w in block['weights'])}" if block.get("weights") else ""
    return f"{block['type']}({children}{extra})"


def _echo_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in counts.items()) or "-"


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(config.items()) if not isinstance(v, (dict, list)))
