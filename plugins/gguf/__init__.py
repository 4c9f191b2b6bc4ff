"""Format plugin ``gguf`` (entry point ``gguf``): llama.cpp GGUF LoRA adapters, read and written.

``format`` reads and writes the file (docs in its module docstring), ``names`` maps Hugging Face
module paths to llama.cpp tensor names (and the rotary row order of q/k), ``layout`` walks a GGUF
header before gguf-py reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterkit.core.plugin.hookspecs import hookimpl

from .format import GgufFormat, read_gguf, write_gguf

__all__ = ["GgufFormat", "adapterkit_register_formats", "read_gguf", "write_gguf"]


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(GgufFormat())
