"""Format plugin ``kohya``: kohya-ss / sd-scripts and LyCORIS network files (one ``*.safetensors``), read and written.

Read from kohya-ss/sd-scripts (``networks/lora.py``, ``networks/lora_anima.py``,
``library/anima_utils.py``) and LyCORIS (``lycoris/kohya.py``, ``lycoris/modules/*.py``):

- ``lora_name = (prefix + "." + module path + "." + child).replace(".", "_")`` with
  prefix ``lora_unet``, ``lora_te`` (SD1/2, Qwen3 / LLM text encoders), ``lora_te1`` /
  ``lora_te2`` (SDXL, SD3, Flux CLIP) or ``lora_te3`` (T5). An LLM text encoder's root is
  its inner model (``Qwen3ForCausalLM(...).model``): ``lora_te_layers_0_self_attn_q_proj``
  is module ``model.layers.0.self_attn.q_proj`` of the causal-LM checkpoint (:mod:`.names`).
- Each module's tensors are ``<lora_name>.<leaf>``; the leaves say which network the module is
  (:data:`.context.NETWORKS`: ``lora_down`` / ``lora_up`` LoRA, ``hada_*`` LoHa, ``lokr_*`` LoKr, ...).
- ``save_weights`` casts every tensor, alpha included, to the save dtype;
  ``__metadata__`` holds ``ss_*`` / ``sshs_*`` / ``modelspec.*`` strings.

The format owns the file, the names and the alpha / metadata rules; what a network's tensors mean
is a codec's (``adapterkit_register_codecs``, format ``"kohya"``, key = the network: ``LORA`` is built
in (:mod:`.lora_codec`), ``LOHA`` and ``LOKR`` come from the adapterkit-loha / adapterkit-lokr method
plugins). A codec gets a :class:`KohyaReadContext` / :class:`KohyaWriteContext` (docs/plugins.md,
"The kohya codec context"). Importing this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit import default_registry, require_consistent
from adapterkit.core.errors import FormatError, LossyConversionError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter, check_tensor_dims
from adapterkit.core.io import atomic_write_bytes
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl

from . import files, names
from .context import PLUGINS, KohyaContext, KohyaReadContext, KohyaWriteContext, describe, network_of, save_dtype
from .files import tensors_digest
from .lora_codec import KohyaLoraCodec
from .names import KNOWN_PARTS, PREFIXES

__all__ = ["KNOWN_PARTS", "PREFIXES", "KohyaContext", "KohyaFormat", "KohyaLoraCodec", "KohyaReadContext",
           "KohyaWriteContext", "adapterkit_register_codecs", "adapterkit_register_formats", "tensors_digest"]

FORMAT = "kohya"
_PLUGIN_KIND = "a method plugin that registers a kohya codec (adapterkit_register_codecs: format 'kohya', key {key!r})"


class KohyaFormat(Format):
    name = FORMAT
    read_options = ("base", "root")
    write_options = ("prefix", "root", "filename", "base", "round_alpha")
    file_suffix = ".safetensors"
    description = ("kohya-ss / sd-scripts LoRA and LyCORIS networks (.safetensors with lora_te_* / lora_unet_* modules "
                   "and alpha tensors); each network is read and written by a codec")

    def detect(self, path: Path) -> bool:
        try:
            file = files.find_file(Path(path))
            if file is None:
                return False
            keys = safetensors_io.read_header(file).tensors
            return bool(keys) and all(names.split_prefix(key.split(".", 1)[0]) is not None for key in keys)
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        """Options: ``base`` (resolves module names exactly), ``root`` (module-path prefix of the kohya root)."""
        opts = self.options_for(options, "read")
        registry = options.get("registry") or default_registry()
        file = files.find_file(Path(path))
        if file is None:
            raise FormatError("no single .safetensors file here", file=str(path), hint="point at the kohya .safetensors file",
                              code="missing_file")
        raw, metadata = safetensors_io.load(file)
        check_tensor_dims(raw, str(file))
        modules = files.group(raw, str(file))
        network = _network(modules, str(file))
        codec = registry.codec(FORMAT, network)
        if codec is None:
            installed = sorted(registry.codecs_of(FORMAT))
            plugin = PLUGINS.get(network)
            raise FormatError(
                f"no installed plugin reads kohya {describe(network)} files", file=str(file), found=network,
                expected=installed,
                hint=(f"install the {plugin} plugin (it registers the kohya:{network} codec)" if plugin else
                      f"install {_PLUGIN_KIND.format(key=network)}") + "; `adapterkit plugins` lists the installed codecs",
                code="unsupported",
            )
        context = KohyaReadContext(file=file, network=network, registry=registry, base=opts.get("base"), modules=modules,
                                   metadata=dict(metadata), tensors=dict(raw), root=opts.get("root"))
        adapter = codec.read(context)
        return require_consistent(adapter, registry, str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``prefix`` (default lora_te), ``root``, ``filename``, ``base``, ``round_alpha``."""
        opts = self.options_for(options, "write")
        registry = options.get("registry") or default_registry()
        write_kohya(adapter, Path(path), registry, **opts)

    def checks(self, path: Path) -> list[str]:
        return ["which model each prefix (lora_te*, lora_unet) belongs to: kohya files do not name their base"]


def _network(modules: dict[str, dict[str, Any]], file: str) -> str:
    """The one network key of the file's modules; a file mixing networks (LyCORIS module_algo_map) is refused."""
    found: dict[str, str] = {}
    for name, parts in sorted(modules.items()):
        keys = network_of(parts)
        if not keys:
            raise FormatError("module has none of the tensors that name a network (lora_down / lora_up, hada_*, lokr_*, ...)",
                              file=file, location=name, found=sorted(parts), code="unknown_key")
        for key in sorted(keys):
            found.setdefault(key, name)
    if len(found) > 1:
        mixed = " and ".join(describe(k) for k in sorted(found))
        raise LossyConversionError(f"the file mixes {mixed} modules; an adapterkit adapter holds one method",
                                   file=file, location=", ".join(found[k] for k in sorted(found)),
                                   hint="split the file per network (ComfyUI and LyCORIS read it as it is)", code="unsupported")
    return next(iter(found))


def write_kohya(adapter: Adapter, folder: Path, registry: Any = None, prefix: str | None = None, root: str | None = None,
                filename: str | None = None, base: Any = None, round_alpha: bool = False) -> Path:
    """Write ``adapter`` as one kohya ``.safetensors`` file in ``folder`` through its method's codec; returns the file."""
    registry = registry or default_registry()
    manifest = adapter.manifest
    method = manifest.method
    codec = registry.codec_for(FORMAT, method)
    if codec is None:
        writable = sorted({m for c in registry.codecs_of(FORMAT).values() for m in c.methods})
        raise LossyConversionError(f"no installed plugin writes {method!r} adapters as kohya files", location="$.method.name",
                                   expected=writable, found=method,
                                   hint="save it in a format that holds it, or install a method plugin with a kohya codec "
                                        "for this method", code="unsupported")
    refusal = codec.refusal(adapter)
    if refusal:
        raise LossyConversionError(f"kohya's {describe(codec.key)} layout cannot hold this {method!r} adapter: {refusal}",
                                   location="$.method.name", found=method, code="unsupported")
    source = manifest.provenance.get("converted_from") or {}
    source = dict(source) if isinstance(source, dict) and source.get("format") == FORMAT else {}
    recorded = source.get("file")
    file = folder / files.plain_name(filename or (recorded if files.is_plain(recorded) else None) or files.DEFAULT_FILE)
    context = KohyaWriteContext(file=file, network=codec.key, registry=registry, base=base, original=source,
                                names=names.lora_names(manifest.targets, source, prefix, root),
                                save_dtype=save_dtype(adapter, source), round_alpha=bool(round_alpha))
    fields, out = codec.write(adapter, context)
    for key in out:
        lora_name, dot, leaf = key.partition(".")
        if not dot or not leaf or names.split_prefix(lora_name) is None:
            raise LossyConversionError(f"the {codec.name} codec wrote a key that is not a kohya key", location=key,
                                       expected="<lora_name>.<leaf>", code="bad_codec")
    metadata = files.metadata(source, out, fields)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, safetensors_io.serialize(out, metadata))
    return file


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(KohyaFormat())


@hookimpl
def adapterkit_register_codecs(register: Callable[..., None]) -> None:
    """The built-in ``kohya:LORA`` codec (method ``lora``); LoHa / LoKr codecs come from their method plugins."""
    register(KohyaLoraCodec())
