"""Built-in format plugin: Hugging Face PEFT folders, one codec per ``peft_type``.

The format owns the files (``adapter_config.json`` + ``adapter_model.safetensors``, or
``adapter_model.bin`` read through :func:`adapterkit.read_torch_tensors`) and PEFT's
rules; what the tensors and the method's fields mean is the codec's, registered by the
method plugin through ``adapterkit_register_codecs`` for format ``"peft"`` and key =
the ``peft_type`` (``LORA`` from the lora plugin, ``PROMPT_TUNING`` / ``PREFIX_TUNING``
from prompts, ``IA3`` from the adapterkit-ia3 example, ...). Importing this module
never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapterkit import Adapter, FormatError, LossyConversionError, default_registry, require_consistent
from adapterkit.core.io import read_json
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl

from . import releases
from .context import PeftContext, PeftReadContext, PeftWriteContext, finish
from .files import CONFIG_NAME, adapter_folder, read_config, require_weights, weights_file, write_folder
from .rules import bad_config, check_selection, peft_task_type, peft_type_of, same

__all__ = ["PeftContext", "PeftFormat", "PeftReadContext", "PeftWriteContext", "adapterkit_register_formats"]

FORMAT = "peft"
_PLUGIN_KIND = ("a method plugin that registers a PEFT codec (adapterkit_register_codecs: an adapterkit.Codec "
                "with format 'peft' and key = the peft_type)")


class PeftFormat(Format):
    name = FORMAT
    read_options = ("base",)
    write_options = ("base", "peft_version")
    description = ("Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors/.bin); "
                   "each peft_type is read and written by a method plugin's codec")

    def detect(self, path: Path) -> bool:
        """A folder with adapter_config.json naming a peft_type (or LoRA's fields without one) and a tensor file."""
        try:
            path = Path(path)
            if not path.is_dir() or not (path / CONFIG_NAME).is_file() or weights_file(path) is None:
                return False
            return peft_type_of(read_json(path / CONFIG_NAME)) is not None
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        """Options: ``base`` (the codec may need it: prompt and prefix tuning, IA3 do)."""
        registry = options.get("registry") or default_registry()
        folder = adapter_folder(Path(path))
        config = read_config(folder)
        config_file = str(folder / CONFIG_NAME)
        peft_type = _peft_type(config, config_file, registry)
        codec = registry.codec(FORMAT, peft_type)
        if codec is None:
            installed = sorted(registry.codecs_of(FORMAT))
            raise FormatError(
                f"no installed plugin reads PEFT {peft_type} adapters", file=config_file, location="$.peft_type",
                expected=installed, found=peft_type,
                hint=f"install {_PLUGIN_KIND} for {peft_type!r}; `adapterkit plugins` lists the installed codecs",
                code="unsupported",
            )
        check_selection(config, config_file)
        tensors_file = require_weights(folder)
        context = PeftReadContext(folder=folder, peft_type=peft_type, registry=registry, base=options.get("base"),
                                  config=config, config_file=config_file, tensors_file=str(tensors_file))
        adapter = finish(codec.read(context), context)
        return require_consistent(adapter, registry, str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (a local base model folder) makes the target_modules check exact; ``peft_version``
        (``"0.14.0"``) writes a config that PEFT release accepts (:mod:`.releases`), or refuses the adapter
        when that release cannot hold it."""
        registry = options.get("registry") or default_registry()
        version = self.options_for(options, "write").get("peft_version")
        release = releases.release(version) if version is not None else None
        method = adapter.manifest.method
        codec = registry.codec_for(FORMAT, method)
        if codec is None:
            writable = sorted({m for c in registry.codecs_of(FORMAT).values() for m in c.methods})
            raise LossyConversionError(
                f"no installed plugin writes {method!r} adapters in PEFT's format", location="$.method.name",
                expected=writable, found=method,
                hint=f"save it in the adapterkit format (or another format that holds {method!r}), or install "
                     f"{_PLUGIN_KIND} for this method",
                code="unsupported",
            )
        if release is not None:
            release.check_type(codec.key)  # before the codec's own rules for the release
        refusal = codec.refusal(adapter)
        if refusal:
            raise LossyConversionError(f"PEFT's {codec.key} layout cannot hold this {method!r} adapter: {refusal}",
                                       location="$.method.name", found=method, code="unsupported")
        manifest = adapter.manifest
        source = manifest.provenance.get("converted_from") or {}
        original = source.get("config") if source.get("format") == FORMAT else None
        original = dict(original) if isinstance(original, dict) and peft_type_of(original) == codec.key else {}
        context = PeftWriteContext(folder=Path(path), peft_type=codec.key, registry=registry, base=options.get("base"),
                                   original=original, release=release)
        fields, tensors = codec.write(adapter, context)
        common = {
            "peft_type": codec.key,
            "task_type": peft_task_type(manifest.task, original.get("task_type")),
            "base_model_name_or_path": manifest.base_model.get("name", original.get("base_model_name_or_path")),
            "revision": manifest.base_model.get("revision", original.get("revision")),
            "inference_mode": True,
        }
        config = _merged(original, {**fields, **common})
        if release is not None:
            config = release.config(codec.key, config)
        write_folder(Path(path), config, tensors, context.metadata)

    def checks(self, path: Path) -> list[str]:
        return [
            "checksums (PEFT folders carry none)",
            "base fingerprint (PEFT records only base_model_name_or_path: --base checks module shapes, not that "
            "the weights are the same model's)",
        ]


def _peft_type(config: dict[str, Any], file: str, registry: Any) -> str:
    peft_type = peft_type_of(config)
    if peft_type is not None:
        return peft_type
    installed = sorted(registry.codecs_of(FORMAT))
    if "peft_type" in config:
        raise bad_config("peft_type must name a PEFT method (a string such as 'LORA')", file, "$.peft_type",
                         config["peft_type"])
    raise FormatError("is not a PEFT adapter config: it has no peft_type (and not LoRA's r and lora_alpha)",
                      file=file, location="$.peft_type", expected=installed, found=None,
                      hint="PeftModel.save_pretrained writes peft_type; point at a PEFT adapter folder", code="unsupported")


def _merged(original: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """The original config with ``fields`` set, keeping the original's value where PEFT reads it as equal."""
    config = dict(original)
    for key, value in fields.items():
        if not (key in original and same(original[key], value)):
            config[key] = value
    return config


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(PeftFormat())
