"""The PEFT ``OFT`` codec: OFT adapters inside adapterkit's ``peft`` format (PEFT 0.21's layout, since 0.16).

One tensor per adapted module (``peft/tuners/oft/layer.py``: ``OFTLayer.update_layer`` makes an
``OFTRotationModule`` under ``oft_R``; the adapter name is stripped from the key on save)::

    base_model.model.<module>.oft_R.weight    [r (1 with block_share), block_size * (block_size - 1) / 2]

the canonical ``<module>.oft.R`` byte for byte. ``r`` and ``block_size`` per module come from the
config's ``r`` / ``oft_block_size`` and the module's input size (PEFT adjusts a size that does not
divide it); the tensor gives the block size but not the module's output size, so reading needs the
base model (``--base``). PEFT 0.21 adapts ``nn.Linear`` (and Conv2d / Embedding, which adapterkit's
OFT does not), never transformers' ``Conv1D``: a GPT-2 Conv1D target cannot be written. Older
layouts (``oft_r`` before PEFT 0.16, configs without ``oft_block_size`` before 0.14) are refused,
as PEFT 0.21 refuses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, Codec, FormatError, LossyConversionError, check_tensor_dims, in_out_features,
   
)

from .method import DEFAULTS, PARAM, block_size_of, blocks_for

LEAF = "oft_R.weight"
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
#: OFT fields of PEFT's OFTConfig adapterkit's method config holds, under the same names
METHOD_FIELDS = ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
                 "num_cayley_neumann_terms", "init_weights")
#: every field of PEFT 0.21.2's OFTConfig besides PeftConfig's
KNOWN_FIELDS = frozenset({*METHOD_FIELDS, "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                          "fan_in_fan_out", "bias", "modules_to_save"})
_BASE_HINT = ("PEFT OFT folders do not record the adapted modules' output sizes: pass the base model "
              "(--base <local model folder>, or base=<folder or torch model>)")
_OLD = re.compile(r"\.(oft_r|oft_s|oft_embedding_R|oft_R)(\.|$)")


class OftPeftCodec(Codec):
    """PEFT's OFT layout for the ``oft`` method."""

    format = "peft"
    key = "OFT"
    methods = ("oft",)
    description = "PEFT OFT (PEFT >= 0.16 layout; reading needs the base model)"

    # ---- read -------------------------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, file = context.config, context.config_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "oft")
        _check_config(config, file)
        raw = context.tensors
        check_tensor_dims(raw, context.tensors_file)
        vectors, other = {}, []
        for key, value in raw.items():
            module = context.module_of(key, LEAF)
            if module is not None:
                vectors[module] = value
                continue
            found = _OLD.search(key)
            if found and found.group(1) in ("oft_r", "oft_s"):
                raise FormatError(f"{key} is the OFT layout of PEFT before 0.16; PEFT 0.21 refuses it too",
                                  file=context.tensors_file, location=key, expected=context.key("<module>", LEAF),
                                  hint="retrain the adapter with PEFT >= 0.16, or load it with the PEFT that made it",
                                  code="old_layout")
            if found and found.group(1) == "oft_embedding_R":
                raise LossyConversionError(f"{key} rotates an embedding; adapterkit's OFT adapts linear modules only",
                                           file=context.tensors_file, location=key, code="unsupported")
            other.append(key)
        if other:
            raise LossyConversionError(f"the file holds {len(other)} tensors that are not OFT rotations; they "
                                       "would be lost", file=context.tensors_file, found=sorted(other)[:5],
                                       hint="modules_to_save, a trained bias or saved embeddings have no place in an "
                                            "OFT adapter", code="unsupported")
        if not vectors:
            raise FormatError(f"the file holds no OFT rotation ({context.key('<module>', LEAF)})",
                              file=context.tensors_file, code="no_targets")
        if context.base is None:
            raise FormatError("the base model is needed to read this adapter", file=str(context.folder),
                              hint=_BASE_HINT, code="needs_base")
        r, block = int(config.get("r", 0)), int(config.get("oft_block_size", 0))
        share = bool(config.get("block_share", False))
        targets, tensors, dtypes = {}, {}, set()
        for module, value in sorted(vectors.items()):
            location = context.key(module, LEAF)
            size = block_size_of(value.shape[1]) if value.ndim == 2 else None
            if size is None or size < 2 or (share and value.shape[0] != 1):
                raise FormatError(f"OFT tensor has shape {list(value.shape)}, PEFT stores [r or 1, s(s-1)/2]",
                                  file=context.tensors_file, location=location, code="tensor_shape")
            shape = context.base_module(module, kinds=("linear",)).shape  # PEFT OFT adapts nn.Linear
            fan_in = in_out_features("linear", shape)[0]
            blocks, want, _ = blocks_for(fan_in, r, block)
            if want != size or (not share and value.shape[0] != blocks):
                raise BaseModelError(f"OFT tensor of {module} {list(value.shape)} does not fit the base module's "
                                     f"{fan_in} inputs under r={r}, oft_block_size={block} ({blocks} blocks of {want})",
                                     location=location, hint="is this the right base model (a GPT-2 Conv1D cannot "
                                                             "hold a PEFT OFT adapter)?", code="wrong_base")
            targets[module] = {"kind": "linear", "shape": list(shape), "r": blocks, "block_size": size}
            tensors[f"{module}.oft.{PARAM}"] = np.ascontiguousarray(value)
            dtypes.add(str(value.dtype))
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
            raise FormatError("the OFT tensors must share one float dtype", file=context.tensors_file,
                              found=sorted(dtypes), code="dtype")
        target_rule = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in targets})
        method_config: dict[str, Any] = {
            "target_modules": target_rule if isinstance(target_rule, str) else sorted(set(target_rule)),
            **{k: config[k] for k in METHOD_FIELDS if k in config},
        }
        for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            value = config.get(key)
            if value not in (None, [], ""):
                method_config[key] = sorted(set(value)) if key == "exclude_modules" and isinstance(value, list) else value
        warnings = []
        if config.get("use_cayley_neumann", DEFAULTS["use_cayley_neumann"]) and _older(config.get("peft_version"), (0, 18)):
            warnings.append("use_cayley_neumann: this adapter was saved by a PEFT before 0.18, whose Cayley-Neumann "
                            "series differed slightly; it is read (as PEFT 0.21 reads it) with the current one")
        method = context.registry.method("oft")
        resolved = method.resolve_config(method_config)
        return context.adapter("oft", method.minimal_config(resolved), targets, tensors, dtypes.pop(),
                               base_model=context.base_fields(), warnings=warnings)

    # ---- write ------------------------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        expected = {f"{module}.oft.{PARAM}" for module in adapter.targets}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT OFT file and would be lost"
        config = {**DEFAULTS, **adapter.config}
        for module, target in sorted(adapter.targets.items()):
            if target.get("kind") != "linear":
                return (f"{module} is a {target.get('kind')!r} target; PEFT 0.21's OFT adapts nn.Linear only "
                        "(it refuses transformers' Conv1D, e.g. GPT-2)")
            blocks, size, _ = blocks_for(in_out_features("linear", target["shape"])[0], int(config["r"]),
                                         int(config["oft_block_size"]))
            if (blocks, size) != (target.get("r"), target.get("block_size")):
                return (f"{module} has {target.get('r')} blocks of {target.get('block_size')}, PEFT would make "
                        f"{blocks} of {size} from r={config['r']}, oft_block_size={config['oft_block_size']} "
                        "(PEFT's OFT has no per-module block sizes)")
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        release = context.release
        config = {**DEFAULTS, **adapter.config}
        if release is not None and release.before("0.16.0"):
            raise release.refusal("peft_type", "OFT", "0.16.0", what="OFT's oft_R.weight layout (it stores OFT in "
                                  "another layout (oft_r))")
        if release is not None and release.before("0.18.0") and config["use_cayley_neumann"]:
            raise release.refusal("use_cayley_neumann", True, "0.18.0", what="the Cayley-Neumann series "
                                  "(use_cayley_neumann) of this adapter (its own series differs; an exact-Cayley "
                                  "adapter, use_cayley_neumann=false, writes for 0.16.0)")
        modules = sorted(adapter.targets)
        tensors = {context.key(m, LEAF): np.asarray(adapter.tensors[f"{m}.oft.{PARAM}"]) for m in modules}
        selection = context.selection(modules, wanted=adapter.config.get("target_modules"),
                                      layers=adapter.config.get("layers_to_transform"))
        fields: dict[str, Any] = {
            **selection,
            **{k: config[k] for k in METHOD_FIELDS},
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
        }
        if release is None:  # PEFT warns about the Cayley-Neumann series of a config with no (or an old) version
            fields["peft_version"] = context.original.get("peft_version") or "0.21.2"
        if "auto_mapping" not in context.original:
            fields["auto_mapping"] = None
        return fields, tensors


def _older(version: Any, than: tuple[int, int]) -> bool:
    """Whether a PEFT version string (``"0.17.1"``, ``"0.18.0@abc"``) is before ``than``; a missing one is."""
    if isinstance(version, tuple):
        return version[:2] < than
    if not isinstance(version, str):
        return True
    parts = re.findall(r"\d+", version.partition("@")[0])[:2]
    return len(parts) < 2 or (int(parts[0]), int(parts[1])) < than


def _check_config(config: Mapping[str, Any], file: str) -> None:
    """PEFT config fields the ``oft`` method cannot hold are refused by name (never dropped)."""
    if "oft_block_size" not in config:
        raise FormatError("the config has no oft_block_size: OFT of PEFT before 0.14, whose adapters PEFT 0.21 "
                          "refuses", file=file, location="$.oft_block_size",
                          hint="retrain with PEFT >= 0.16, or load it with the PEFT that made it", code="old_layout")
    bias = config.get("bias", "none")
    if bias != "none":
        raise LossyConversionError(f"bias={bias!r}: adapterkit's OFT trains no bias, the trained biases would be lost",
                                   file=file, location="$.bias", found=bias, hint="only bias='none' converts",
                                   code="unsupported")
    if config.get("modules_to_save"):
        raise LossyConversionError("modules_to_save: fully trained modules have no place in an OFT adapter",
                                   file=file, location="$.modules_to_save", found=config["modules_to_save"],
                                   code="unsupported")
    for key in ("r", "oft_block_size", "num_cayley_neumann_terms"):
        value = config.get(key, DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FormatError(f"{key} must be an integer >= 0", file=file, location=f"$.{key}", found=value,
                              code="bad_config")
    if (config.get("r", 0) != 0) == (config.get("oft_block_size", 0) != 0):
        raise FormatError("exactly one of r and oft_block_size must be non-zero (PEFT refuses this config)", file=file,
                          location="$.r", found={"r": config.get("r"), "oft_block_size": config.get("oft_block_size")},
                          code="bad_config")
    for key in ("coft", "block_share", "use_cayley_neumann", "init_weights"):
        if key in config and not isinstance(config[key], bool):
            raise FormatError(f"{key} must be true or false", file=file, location=f"$.{key}", found=config[key],
                              code="bad_config")
