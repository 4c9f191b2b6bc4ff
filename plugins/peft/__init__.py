"""Built-in format plugin: LoRA adapters in Hugging Face PEFT's on-disk layout.

Reads and writes ``adapter_config.json`` + ``adapter_model.safetensors`` (and
reads ``adapter_model.bin`` through torch's weights-only unpickler). Importing
this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.core.adapter import Adapter
from adapterkit.core.formats import Format
from adapterkit.core.hookspecs import hookimpl

from . import detect as _detect


class PeftFormat(Format):
    name = "peft"
    description = "Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors/.bin)"

    def detect(self, path: Path) -> bool:
        return _detect.detect(Path(path))

    def read(self, path: Path, **options: Any) -> Adapter:
        from .reader import read

        return read(Path(path))

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (a local base model folder) makes the target_modules check exact."""
        from .writer import write

        write(adapter, Path(path), base=options.get("base"))

    def checks(self, path: Path) -> list[str]:
        return [
            "PEFT decides per module whether fan_in_fan_out applies from the base model's layer types; "
            "the adapter records one flag for all modules",
        ]


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(PeftFormat())
