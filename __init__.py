"""adapterkit: a versioned, validated format and toolchain for PETL adapters.

The public API (docs/api.md)::

    import adapterkit
    adapter = adapterkit.load(path)                 # any known format, auto-detected
    report = adapterkit.validate(path, base=None)   # structured errors and warnings
    model = adapterkit.apply(adapter, model)        # inject into a torch model
    adapterkit.save(adapter, out_dir, format="peft")

Names are imported lazily so that ``import adapterkit`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # api
    "load": "adapterkit.core.api",
    "save": "adapterkit.core.api",
    "validate": "adapterkit.core.api",
    "convert": "adapterkit.core.api",
    "inspect": "adapterkit.core.api",
    "detect_format": "adapterkit.core.api",
    "merge": "adapterkit.core.merge",
    "compose": "adapterkit.core.compose",
    "apply": "adapterkit.core.session",
    "inject": "adapterkit.core.session",
    "InjectedAdapter": "adapterkit.core.session",
    "attached": "adapterkit.core.session",
    "activate": "adapterkit.core.activation",
    "deactivate": "adapterkit.core.activation",
    "apply_composition": "adapterkit.core.activation",
    "ActiveComposition": "adapterkit.core.activation",
    "Stack": "adapterkit.core.composition",
    "Average": "adapterkit.core.composition",
    "WeightedSum": "adapterkit.core.composition",
    "save_composition": "adapterkit.core.composition_folder",
    "load_composition": "adapterkit.core.composition_folder",
    "export_onnx": "adapterkit.core.onnx_export",
    "bench_adapter": "adapterkit.core.bench",
    "BenchReport": "adapterkit.core.bench",
    "AdapterPool": "adapterkit.core.pool",
    "train": "adapterkit.core.train",
    # data model
    "Adapter": "adapterkit.core.adapter",
    "Manifest": "adapterkit.core.manifest",
    "ValidationReport": "adapterkit.core.validate",
    # plugin authors
    "Method": "adapterkit.core.method",
    "Format": "adapterkit.core.formats",
    "hookimpl": "adapterkit.core.hookspecs",
    "PLUGIN_API_VERSION": "adapterkit.core.hookspecs",
    "get_plugin_manager": "adapterkit.core.plugins",
    "default_registry": "adapterkit.core.plugins",
    "Registry": "adapterkit.core.plugins",
    "targets_fingerprint": "adapterkit.core.base_model",
    "read_safetensors": "adapterkit.core.safetensors_io",
    "read_safetensors_header": "adapterkit.core.safetensors_io",
    "write_safetensors": "adapterkit.core.safetensors_io",
    # errors
    "AdapterkitError": "adapterkit.core.errors",
    "ManifestError": "adapterkit.core.errors",
    "TensorFileError": "adapterkit.core.errors",
    "IntegrityError": "adapterkit.core.errors",
    "BaseModelError": "adapterkit.core.errors",
    "FormatError": "adapterkit.core.errors",
    "LossyConversionError": "adapterkit.core.errors",
    "UnsafeFileError": "adapterkit.core.errors",
    "PluginError": "adapterkit.core.errors",
    "VersionError": "adapterkit.core.errors",
    "UsageError": "adapterkit.core.errors",
}

__all__ = sorted([*_LAZY, "__version__"])


_RENAMED = {"merge": "merge_into_base", "read_safetensors": "load", "read_safetensors_header": "read_header",
            "write_safetensors": "save"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
