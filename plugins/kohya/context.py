"""What the ``kohya`` format hands a codec: the parsed file and kohya's naming rules, so that a codec never
imports this plugin (docs/plugins.md, "The kohya codec context", is the reference: these are public API).

:class:`KohyaReadContext` goes to ``Codec.read``, :class:`KohyaWriteContext` to ``Codec.write``; both share
the fields and helpers of :class:`KohyaContext`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapterkit.core.errors import FormatError, LossyConversionError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import BaseModelInfo, read_base_model, targets_fingerprint
from adapterkit.core.format.manifest import Manifest

from . import files, names

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.core.plugin.registry import Registry

#: leaf prefix -> (network key, what it is): the tensors that tell which network a module is (LyCORIS'
#: ``weight_list_det``); the key is the codec key (``registry.codec("kohya", key)``)
NETWORKS: dict[str, tuple[str, str]] = {
    "lora_up.": ("LORA", "LoRA"), "lora_down.": ("LORA", "LoRA"), "lora_mid.": ("LORA", "LoRA"),
    "hada_": ("LOHA", "LoHa (LyCORIS)"), "lokr_": ("LOKR", "LoKr (LyCORIS)"),
    "on_input": ("IA3", "(IA)^3 (LyCORIS)"), "diff": ("FULL", "full weight-difference (LyCORIS full)"),
    "w_norm": ("NORM", "norm-layer (LyCORIS norms)"), "oft_blocks": ("OFT", "OFT / BOFT (LyCORIS)"),
    "a1.": ("GLORA", "GLoRA (LyCORIS)"), "lambda_layer": ("TLORA", "T-LoRA (LyCORIS)"),
}
#: what a leaf a codec does not hold is, for :meth:`KohyaReadContext.check_leaves` (first matching prefix)
LEAVES: dict[str, str] = {
    "dora_scale": "DoRA (a magnitude vector: LyCORIS dora_wd / weight decomposition)",
    "lora_mid": "LoCon with a mid tensor (LyCORIS Tucker decomposition)",
    "hada_t": "LoHa with Tucker tensors (hada_t1 / hada_t2: LyCORIS use_tucker on a conv layer)",
    "lokr_t": "LoKr with a Tucker tensor (lokr_t1 / lokr_t2: LyCORIS use_tucker on a conv layer)",
    "scalar": "a learned scalar (LyCORIS use_scalar)", "diff_b": "a bias difference", "bias": "a bias",
    "diff": "a full weight difference", "oft_": "OFT", "rescale": "an OFT rescale vector",
}
#: the network keys of the method packages that read them, for the error when none is installed
PLUGINS = {"LOHA": "adapterkit-loha", "LOKR": "adapterkit-lokr"}


def network_of(leaves: Iterable[str]) -> set[str]:
    """The network keys a module's leaves mark (empty when none does)."""
    return {key for leaf in leaves for marker, (key, _) in NETWORKS.items() if leaf.startswith(marker)}


def describe(key: str) -> str:
    return next((what for k, what in NETWORKS.values() if k == key), key)


@dataclass
class KohyaContext:
    """The fields and helpers every kohya codec gets."""

    #: the ``.safetensors`` file (reading: the source; writing: the file being written)
    file: Path
    #: the network read or written: the codec's key (``"LORA"``, ``"LOHA"``, ``"LOKR"``)
    network: str
    #: the registry in use
    registry: Registry
    #: the ``base`` option: a local Hugging Face model folder, a ``BaseModelInfo``, or None
    base: Any = None

    @functools.cached_property
    def base_info(self) -> BaseModelInfo | None:
        """The base model's weight names and shapes (``adapterkit.BaseModelInfo``), None without ``base``."""
        if self.base is None:
            return None
        return self.base if isinstance(self.base, BaseModelInfo) else read_base_model(self.base)

    def base_shape(self, module: str) -> list[int] | None:
        """The shape of ``<module>.weight`` in the base, None without ``base`` (or when it has none)."""
        info = self.base_info
        found = None if info is None else info.weight_shape(module)
        return None if found is None else [int(n) for n in found]

    def check_shape(self, module: str, shape: Iterable[int], location: str | None = None) -> None:
        """Refuse (``FormatError``, code ``wrong_base``) a module whose ``[out, in]`` differs from its base weight."""
        found = self.base_shape(module)
        if found is not None and found != [int(n) for n in shape]:
            raise FormatError("the adapter's shapes do not fit the base weight", file=str(self.file),
                              location=location or module, expected=found, found=[int(n) for n in shape],
                              hint="is this the adapter's base?", code="wrong_base")


@dataclass
class KohyaReadContext(KohyaContext):
    """A kohya file being read: its tensors, grouped per lora_name, and metadata, untouched."""

    #: lora_name -> {leaf: tensor}, e.g. ``{"lora_te_layers_0_self_attn_q_proj": {"hada_w1_a": ..., "alpha": ...}}``
    modules: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: the safetensors ``__metadata__`` (sd-scripts' ``ss_*``, ``sshs_*``, ``modelspec.*`` strings)
    metadata: dict[str, str] = field(default_factory=dict)
    #: every tensor of the file under its own key (``<lora_name>.<leaf>``)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    #: the ``root`` option: the module-path prefix of the kohya root (one for all prefixes, or per prefix)
    root: str | Mapping[str, str] | None = None
    #: what :meth:`alpha` found, kept in the adapter's provenance so that writing restores it exactly
    alpha_record: dict[str, Any] = field(default_factory=lambda: {"missing": [], "zero": [], "dtypes": {}})

    @functools.cached_property
    def _resolved(self) -> tuple[dict[str, str], dict[str, str]]:
        return names.resolve(self.modules, self.base_info, self.root, str(self.file))

    def module_of(self, lora_name: str) -> str:
        """The module path of a lora_name (``lora_te_layers_0_self_attn_q_proj`` -> ``model.layers.0.self_attn.q_proj``):
        resolved against the base's weight names with ``base``, else by adapterkit's naming heuristic (the adapter
        then carries a warning); a ``FormatError`` when the name cannot be resolved."""
        return self._resolved[0][lora_name]

    @property
    def roots(self) -> dict[str, str]:
        """kohya prefix -> the module-path prefix it stands for (``{"lora_te": "model"}``)."""
        return self._resolved[1]

    def alpha(self, lora_name: str, r: int) -> int | float:
        """The module's alpha as sd-scripts and LyCORIS read it (``<lora_name>.alpha``; 0 or missing means ``r``),
        recorded so that the writer restores a missing or zero alpha and its dtype."""
        return files.read_alpha(self.modules[lora_name].get("alpha"), r, lora_name, str(self.file), self.alpha_record)

    def dtype(self, arrays: Mapping[str, np.ndarray], what: str = "the weights") -> str:
        """The one float dtype (``"float16"``, ...) of ``arrays`` (alpha excluded by the caller), else a
        ``TensorFileError``."""
        return files.float_dtype(arrays, str(self.file), what)

    def check_leaves(self, lora_name: str, allowed: Iterable[str], method: str) -> None:
        """Refuse the first leaf of ``lora_name`` not in ``allowed``: ``LossyConversionError`` naming what it is
        (``dora_scale`` -> DoRA, ``hada_t1`` -> Tucker, ...), or ``FormatError`` (code ``unknown_key``)."""
        allowed = set(allowed)
        for leaf in sorted(self.modules[lora_name]):
            if leaf in allowed:
                continue
            key = f"{lora_name}.{leaf}"
            what = next((v for k, v in LEAVES.items() if leaf.startswith(k)), None)
            if what:
                raise LossyConversionError(f"{what} has no place in adapterkit's {method!r} adapter; converting would lose it",
                                           file=str(self.file), location=key,
                                           hint="use the file with a tool that supports it (ComfyUI, LyCORIS)",
                                           code="unsupported")
            raise FormatError(f"not a kohya {describe(self.network)} key", file=str(self.file), location=key,
                              expected=sorted(f"<lora_name>.{a}" for a in allowed), code="unknown_key")

    def adapter(self, method: str, config: dict[str, Any], targets: dict[str, dict[str, Any]],
                tensors: dict[str, np.ndarray], dtype: str, *, warnings: Iterable[str] = ()) -> Adapter:
        """An :class:`adapterkit.Adapter` with what every kohya reader fills: ``base_model`` (fingerprint of the
        targets; ``model_type`` / ``architecture`` with ``base``), ``provenance.converted_from`` (``format:
        "kohya"``, the metadata as ``config``, the file name, the prefix ``roots``, the :meth:`alpha` record, a
        digest of the file's tensors), source and source format, and the naming-heuristic warning."""
        record = {k: v for k, v in self.alpha_record.items() if k != "dtypes"}
        alpha_dtypes = Counter(self.alpha_record.get("dtypes", {}).values())
        weights_dtype = {v: k for k, v in files.DTYPES.items()}.get(dtype)
        if alpha_dtypes and (common := max(alpha_dtypes, key=lambda d: alpha_dtypes[d])) != weights_dtype:
            record["dtype"] = common  # unusual (sd-scripts saves alpha in the weights' dtype): keep it
        source = {"format": "kohya", "config": dict(self.metadata), "file": self.file.name, "roots": dict(self.roots),
                  "alpha": {k: v for k, v in record.items() if v}, "tensors_sha256": files.tensors_digest(self.tensors)}
        base_model: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
        info = self.base_info
        if info is not None:
            base_model.update({k: v for k, v in (("model_type", info.model_type), ("architecture", info.architecture)) if v})
        notes = list(warnings)
        if info is None:
            notes.append(names.HEURISTIC_WARNING)
        manifest = Manifest(method=method, config=config, targets=targets, dtype=dtype, base_model=base_model,
                            provenance={"converted_from": source})
        return Adapter(manifest, tensors, source=self.file, source_format="kohya", warnings=notes)


@dataclass
class KohyaWriteContext(KohyaContext):
    """A kohya file being written."""

    #: the ``provenance.converted_from`` record when the adapter was read from a kohya file (else ``{}``):
    #: its ``config`` (the original metadata), ``roots`` and ``alpha`` record
    original: dict[str, Any] = field(default_factory=dict)
    #: module path -> lora_name of every target (the recorded roots, or the ``prefix`` / ``root`` options)
    names: dict[str, str] = field(default_factory=dict)
    #: the safetensors dtype alpha tensors are saved in (sd-scripts' ``save_weights`` casts alpha to the
    #: weights' dtype): the recorded alpha dtype, else the adapter's
    save_dtype: str = "F32"
    #: the ``round_alpha`` option: store float32(alpha) when the save dtype cannot hold alpha exactly
    round_alpha: bool = False

    def lora_name(self, module: str) -> str:
        """The kohya name of a target module (``model.layers.0.self_attn.q_proj`` -> ``lora_te_layers_0_self_attn_q_proj``)."""
        return self.names[module]

    def alpha_tensor(self, lora_name: str, alpha: float, r: int) -> np.ndarray | None:
        """The ``<lora_name>.alpha`` tensor to write, or None to write none: None where the source file had no alpha
        and ``alpha == r`` still; 0 where it had 0 and ``alpha == r``; else ``alpha`` in :attr:`save_dtype`
        (float32 where that dtype would round it; a ``LossyConversionError`` when neither is exact, unless
        ``round_alpha``)."""
        record = self.original.get("alpha") if isinstance(self.original.get("alpha"), Mapping) else {}
        if lora_name in (record.get("missing") or ()) and alpha == r:
            return None
        value = 0.0 if lora_name in (record.get("zero") or ()) and alpha == r else alpha
        return files.alpha_tensor(value, self.save_dtype, lora_name, self.round_alpha)


def save_dtype(adapter: Adapter, original: Mapping[str, Any]) -> str:
    """The dtype alpha tensors are written in: the recorded one, else the adapter's float dtype, else float32."""
    record = original.get("alpha") if isinstance(original.get("alpha"), Mapping) else {}
    if isinstance(record.get("dtype"), str) and record["dtype"] in safetensors_io.DTYPES:
        return record["dtype"]
    by_name = {v: k for k, v in files.DTYPES.items()}
    if adapter.manifest.dtype in by_name:
        return by_name[adapter.manifest.dtype]
    first = next(iter(adapter.tensors.values()), None)
    return safetensors_io.dtype_name(first) if first is not None else "F32"
