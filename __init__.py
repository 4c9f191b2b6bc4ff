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

__version__ = "0.2.0"

_LAZY = {
    # api
    "load": "adapterkit.core.api",
    "save": "adapterkit.core.api",
    "validate": "adapterkit.core.api",
    "convert": "adapterkit.core.api",
    "inspect": "adapterkit.core.api",
    "detect_format": "adapterkit.core.api",
    "merge": "adapterkit.core.ops.merge",
    "compose": "adapterkit.core.ops.compose",
    "to_lora": "adapterkit.core.ops.lower",
    "apply": "adapterkit.core.runtime.inject",
    "inject": "adapterkit.core.runtime.inject",
    "InjectedAdapter": "adapterkit.core.runtime.inject",
    "attached": "adapterkit.core.runtime.inject",
    "activate": "adapterkit.core.runtime.composition",
    "deactivate": "adapterkit.core.runtime.composition",
    "apply_composition": "adapterkit.core.runtime.composition",
    "ActiveComposition": "adapterkit.core.runtime.composition",
    "Stack": "adapterkit.core.format.composition",
    "Average": "adapterkit.core.format.composition",
    "WeightedSum": "adapterkit.core.format.composition",
    "save_composition": "adapterkit.core.store.composition_folder",
    "load_composition": "adapterkit.core.store.composition_folder",
    "export_onnx": "adapterkit.core.export.onnx",
    "bench_adapter": "adapterkit.core.bench.measure",
    "BenchReport": "adapterkit.core.bench.measure",
    "AdapterPool": "adapterkit.core.runtime.pool",
    "WeightAdapterLayer": "adapterkit.core.runtime.weight_layer",
    "WeightAdapterMethod": "adapterkit.core.runtime.weight_method",
    "weight_layers": "adapterkit.core.runtime.weight_layer",
    "train": "adapterkit.core.train.run",
    # data model
    "Adapter": "adapterkit.core.format.adapter",
    "Manifest": "adapterkit.core.format.manifest",
    "ValidationReport": "adapterkit.core.format.report",
    # plugin authors
    "Method": "adapterkit.core.plugin.method",
    "LowRank": "adapterkit.core.plugin.capabilities",
    "DeltaWeight": "adapterkit.core.plugin.capabilities",
    "MergedWeight": "adapterkit.core.plugin.capabilities",
    "MergedBias": "adapterkit.core.plugin.capabilities",
    "QuantizedBase": "adapterkit.core.plugin.capabilities",
    "FromFactors": "adapterkit.core.plugin.capabilities",
    "Composable": "adapterkit.core.plugin.capabilities",
    "RuntimeComposable": "adapterkit.core.plugin.capabilities",
    "Quantizable": "adapterkit.core.plugin.capabilities",
    "TraceExport": "adapterkit.core.plugin.capabilities",
    "TrainingHooks": "adapterkit.core.plugin.capabilities",
    "Factors": "adapterkit.core.plugin.capabilities",
    "Codec": "adapterkit.core.plugin.codecs",
    "Format": "adapterkit.core.plugin.formats",
    "hookimpl": "adapterkit.core.plugin.hookspecs",
    "PLUGIN_API_VERSION": "adapterkit.core.plugin.hookspecs",
    "get_plugin_manager": "adapterkit.core.plugin.registry",
    "default_registry": "adapterkit.core.plugin.registry",
    "Registry": "adapterkit.core.plugin.registry",
    "targets_fingerprint": "adapterkit.core.format.base_model",
    "base_fields": "adapterkit.core.format.base_model",
    "read_safetensors": "adapterkit.core.format.safetensors_io",
    "read_safetensors_header": "adapterkit.core.format.safetensors_io",
    "write_safetensors": "adapterkit.core.format.safetensors_io",
    "check_tensor_dims": "adapterkit.core.format.adapter",
    "read_torch_tensors": "adapterkit.core.format.torch_files",
    "manifest_errors": "adapterkit.core.store.consistency",
    "onnx_adapter_parameters": "adapterkit.core.export.swappable",
    "detach": "adapterkit.core.runtime.inject",
    "shared_key": "adapterkit.core.format.adapter",
    "canonical_key": "adapterkit.core.format.adapter",
    "split_key": "adapterkit.core.format.adapter",
    "select_modules": "adapterkit.core.runtime.modules",
    "module_kind": "adapterkit.core.runtime.modules",
    "replace_module": "adapterkit.core.runtime.modules",
    "matches_target": "adapterkit.core.format.targeting",
    "pattern_value": "adapterkit.core.format.targeting",
    "layer_index": "adapterkit.core.format.targeting",
    "selects": "adapterkit.core.format.targeting",
    "in_out_features": "adapterkit.core.format.targeting",
    "config_error": "adapterkit.core.format.config_fields",
    "is_int": "adapterkit.core.format.config_fields",
    "is_number": "adapterkit.core.format.config_fields",
    "check_regex": "adapterkit.core.format.config_fields",
    "check_selection": "adapterkit.core.format.config_fields",
    "check_layers": "adapterkit.core.format.config_fields",
    "check_pattern_map": "adapterkit.core.format.config_fields",
    "require_consistent": "adapterkit.core.store.consistency",
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
