"""The native adapterkit format as a format plugin (adapter.json + safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterkit.core.format.adapter import Adapter
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl
from adapterkit.core.format.manifest import MANIFEST_NAME


class NativeFormat(Format):
    name = "adapterkit"
    read_options = ()
    write_options = ()
    description = "adapterkit folder: versioned adapter.json manifest + canonical safetensors"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / MANIFEST_NAME).is_file()

    def read(self, path: Path, **options: Any) -> Adapter:
        from adapterkit.core.store.native import read_native
        from adapterkit.core.plugin.registry import default_registry

        return read_native(path, options.get("registry") or default_registry())

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        from adapterkit.core.store.native import write_native
        from adapterkit.core.plugin.registry import default_registry

        write_native(adapter, path, options.get("registry") or default_registry())


@hookimpl
def adapterkit_register_formats(register) -> None:  # type: ignore[no-untyped-def]
    register(NativeFormat())
