"""Shared output helpers: JSON for machines, short aligned text for people."""

from __future__ import annotations

import json
from typing import Any

import click

from adapterkit.core.units import human_bytes, human_count  # noqa: F401  (the CLI modules import them from here)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
