"""Built-in format plugin ``adapterhub``: AdapterHub (``adapters`` 1.x) LoRA and bottleneck adapter folders.

Reads and writes ``adapter_config.json`` + ``pytorch_adapter.bin`` (read only
through torch's weights-only unpickler) or ``adapter.safetensors``. Importing
this package never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit import require_consistent
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl

from . import layout as _layout

__all__ = ["AdapterHubFormat", "adapterkit_register_formats"]


class AdapterHubFormat(Format):
    name = "adapterhub"
    read_options = ()
    write_options = ("base", "name", "weights")
    description = ("AdapterHub adapters folder (adapter_config.json + pytorch_adapter.bin / adapter.safetensors): "
                   "LoRA, seq_bn, double_seq_bn, par_bn")

    def detect(self, path: Path) -> bool:
        return _layout.detect(Path(path))

    def read(self, path: Path, **options: Any) -> Adapter:
        from .reader import read

        return require_consistent(read(Path(path)), options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (local base model folder: exact layer count and hidden size), ``name`` (the adapter
        name in the keys), ``weights`` ("bin", AdapterHub's default, or "safetensors")."""
        from .writer import write

        write(adapter, Path(path), base=options.get("base"), name=options.get("name"),
              weights=options.get("weights", "bin"))

    def checks(self, path: Path) -> list[str]:
        return [
            "AdapterHub's model head files (head_config.json, pytorch_model_head.bin) are not read",
            "that AdapterHub places the adapter on the same modules as adapterkit is known for BERT, Llama and GPT-2 "
            "layers only",
        ]


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    """Register the ``adapterhub`` format."""
    register(AdapterHubFormat())
