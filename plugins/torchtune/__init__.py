"""Format plugin ``torchtune`` (entry point ``torchtune``): torchtune LoRA adapters (``adapter_model.pt``).

``format`` reads and writes the folder (docs in its module docstring), ``names`` maps torchtune's
module names to Hugging Face paths (and the rotary row order of q/k).
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.plugin.hookspecs import hookimpl

from .format import TorchtuneFormat, read_torchtune, write_torchtune

__all__ = ["TorchtuneFormat", "adapterkit_register_formats", "read_torchtune", "write_torchtune"]


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(TorchtuneFormat())
