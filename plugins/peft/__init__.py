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

from adapterkit.plugins import peft_prompts

from . import detect as _detect


class PeftFormat(Format):
    name = "peft"
    read_options = ("base",)
    write_options = ("base",)
    description = ("Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors/.bin): "
                   "LoRA, prompt tuning, prefix tuning")

    def detect(self, path: Path) -> bool:
        path = Path(path)
        return _detect.detect(path) or peft_prompts.detect(path)

    def read(self, path: Path, **options: Any) -> Adapter:
        path = Path(path)
        if peft_prompts.detect(path):
            return peft_prompts.read(path, base=options.get("base"))
        from .reader import read

        return read(path)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (a local base model folder) makes the target_modules check exact."""
        if adapter.method in peft_prompts.METHODS:
            peft_prompts.write(adapter, Path(path))
            return
        from .writer import write

        write(adapter, Path(path), base=options.get("base"))

    def checks(self, path: Path) -> list[str]:
        return [
            "checksums (PEFT folders carry none)",
            "base fingerprint (PEFT records only base_model_name_or_path; pass --base to check shapes)",
        ]


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(PeftFormat())
