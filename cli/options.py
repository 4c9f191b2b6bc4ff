"""Options shared by commands that read or write foreign formats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from adapterkit.core.io import parse_pairs


def format_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-O/--option KEY=VALUE`` (repeatable): options for a format's reader and writer."""
    return click.option(
        "-O", "--option", "format_option", multiple=True, metavar="KEY=VALUE",
        help="Option for the format reader/writer (repeatable), e.g. -O alpha=16 -O permute_qk=true. "
             "Values are JSON when they parse as JSON, else strings.",
    )(fn)


def parse_format_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    return parse_pairs(pairs, "-O", "alpha=16")
