"""``adapterkit schema``."""

from __future__ import annotations

import click

from .output import echo_json


@click.command("schema")
@click.option("--version", "major", type=int, default=1, show_default=True, help="Major format version.")
@click.option("--method", metavar="NAME", help="Print the config schema of a method instead.")
def command(major: int, method: str | None) -> None:
    """Print the JSON Schema of the adapter manifest (adapter.json), or of a method's config."""
    if method:
        from adapterkit.core.plugin.registry import default_registry

        plugin = default_registry().method(method)
        echo_json({"config": plugin.config_schema(), "target": plugin.target_schema()})
        return
    from adapterkit.core.format.manifest import schema

    echo_json(schema(major))
