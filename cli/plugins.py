"""``adapterkit plugins``."""

from __future__ import annotations

import click

from .output import echo_json


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def command(as_json: bool) -> None:
    """List each plugin: distribution, version, hooks, methods, formats, and load failures.

    Exit status 1 when a plugin failed to load (the others keep working).
    """
    from adapterkit.core.plugin.capabilities import summary
    from adapterkit.core.plugin.registry import default_registry

    registry = default_registry()
    infos = sorted(registry.plugins.values(), key=lambda i: (i.distribution != "adapterkit", i.name))
    if as_json:
        echo_json([{**info.to_dict(), "method_capabilities": {m: summary(registry.methods[m])
                                                              for m in info.methods}} for info in infos])
        raise SystemExit(1 if registry.failures else 0)
    for info in infos:
        dist = f"{info.distribution} {info.version}" if info.distribution else "(not installed)"
        mark = click.style("ok", fg="green") if info.ok else click.style("FAILED", fg="red")
        click.echo(f"{info.name}  [{mark}]  {dist}  ({info.module})")
        if info.methods:
            click.echo("  methods: " + ", ".join(f"{m} ({registry.methods[m].description})" for m in info.methods))
            for m in info.methods:
                click.echo(f"    {m}: {_capability_text(summary(registry.methods[m]))}")
        if info.formats:
            click.echo("  formats: " + ", ".join(f"{f} ({registry.formats[f].description})" for f in info.formats))
        if info.codecs:
            click.echo("  codecs:  " + ", ".join(f"{c} ({registry.codecs[c].description})" for c in info.codecs))
        if info.hooks:
            click.echo("  hooks:   " + ", ".join(info.hooks))
        for error in info.errors:
            click.echo(f"  error:   {error}")
    raise SystemExit(1 if registry.failures else 0)


def _capability_text(caps: dict) -> str:
    """``LowRank, ...: merge; compose linear, cat, ...; runtime weighted_sum, average; adapter pool``."""
    parts = ["merge" if caps["merge"] else "no merge"]
    parts.append(f"compose {', '.join(caps['compose'])}" if caps["compose"] else "no compose")
    if caps["runtime_composition"]:
        parts.append(f"runtime {', '.join(caps['runtime_composition'])}")
    if caps["adapter_pool"]:
        parts.append("adapter pool")
    return (", ".join(caps["capabilities"]) or "no capabilities") + ": " + "; ".join(parts)
