"""The ``adapterkit`` command group.

Sub-commands live one per module and are imported only when used, so
``adapterkit --help`` stays fast and never imports torch. A user error
(:class:`AdapterkitError`) prints one line and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help shown by --help without importing the module)
    "validate": ("adapterkit.cli.validate", "Check an adapter (any format), optionally against a base model."),
    "inspect": ("adapterkit.cli.inspect", "Summarise an adapter: method, targets, ranks, parameters, sizes."),
    "convert": ("adapterkit.cli.convert", "Convert an adapter between formats (source auto-detected)."),
    "merge": ("adapterkit.cli.merge", "Fold an adapter into its base model: a full HF model folder (streaming, no torch)."),
    "compose": ("adapterkit.cli.compose", "Combine adapters of one base into a new one (linear, cat, svd, ties, dare_*, ...), or write a runtime composition."),
    "to-lora": ("adapterkit.cli.to_lora", "Lower an adapter with a computable delta (DoRA, IA3, LoRA, ...) to plain LoRA by truncated SVD, with per-module errors."),
    "schema": ("adapterkit.cli.schema", "Print the JSON Schema of the adapter manifest."),
    "plugins": ("adapterkit.cli.plugins", "List the loaded plugins, their hooks, methods and formats."),
    "train": ("adapterkit.cli.train", "Train a new adapter of any method on a JSON Lines file (causal LM or classification)."),
    "export": ("adapterkit.cli.export", "Export a base model with adapters to ONNX (merged or swappable), checked in ONNX Runtime."),
    "bench": ("adapterkit.cli.bench", "Measure an adapter on its base: sizes, load, forward latency, a training step, hot-swap."),
    "demo": ("adapterkit.cli.demo", "Run the end-to-end demo on the embedded SmolLM2-135M (no arguments)."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when the command runs.

    Plugin commands (hook ``adapterkit_register_commands``) are added the first
    time the full list is needed or an unknown name is asked for.
    """

    _plugins_added = False

    def _add_plugin_commands(self) -> None:
        if not self._plugins_added:
            self._plugins_added = True
            from adapterkit.core.plugin.registry import default_registry

            default_registry().register_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            return getattr(module, "command")
        self._add_plugin_commands()
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        self._add_plugin_commands()
        for name in super().list_commands(ctx):
            if name not in COMMANDS:
                cmd = super().get_command(ctx, name)
                rows.append((name, cmd.get_short_help_str(60) if cmd else ""))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))

    def invoke(self, ctx: click.Context) -> Any:
        from adapterkit.core.errors import AdapterkitError

        try:
            return super().invoke(ctx)
        except AdapterkitError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterkit", prog_name="adapterkit")
def cli() -> None:
    """adapterkit: check, convert, merge and ship parameter-efficient fine-tuning adapters."""


def main() -> None:
    try:
        cli(prog_name="adapterkit")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
