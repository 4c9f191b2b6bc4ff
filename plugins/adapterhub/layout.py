"""AdapterHub (``adapters`` 1.x) on-disk layout: file names, config fields, key <-> module rules, detection.

Torch-free. Restated from adapters 1.3 (``utils.py``, ``loading.py``,
``configuration/adapter_config.py``, ``models/{bert,llama,gpt2}/mixin_*.py``):

- files: ``adapter_config.json`` (``indent=2, sort_keys=True``) and
  ``pytorch_adapter.bin`` (what ``load_adapter`` reads by default) or
  ``adapter.safetensors`` (``use_safetensors=True``); a static model's head is
  saved beside them as ``head_config.json`` + ``pytorch_model_head.bin`` /
  ``model_head.safetensors``.
- LoRA keys: ``<module>.loras.<name>.lora_A`` ``[r, in]`` / ``lora_B`` ``[out, r]``
  on the modules AdapterHub wraps (table :data:`LORA_MODULES`); one r, alpha and
  module selection per adapter (``selfattn_lora`` + ``attn_matrices``,
  ``intermediate_lora``, ``output_lora``, ``leave_out``); scale ``alpha / r``.
- bottleneck keys: ``<container>.adapters.<name>.adapter_down.0.weight`` ...
  where the container is per layer and site (table :data:`BOTTLENECK_SITES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.core.io import read_json

CONFIG_NAME = "adapter_config.json"
BIN_NAME = "pytorch_adapter.bin"
SAFETENSORS_NAME = "adapter.safetensors"
HEAD_FILES = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors")
VERSION = "adapters.1.3.0"  # the release whose layout this plugin writes (and was tested against)


@dataclass(frozen=True)
class LoraModule:
    family: str
    pattern: re.Pattern[str]  # full match on the module path; group "layer" is the layer index
    location: str  # "selfattn" | "intermediate" | "output"
    attn: str | None  # "q" | "k" | "v" for selfattn
    kind: str  # "linear" | "conv1d"


@dataclass(frozen=True)
class BottleneckSite:
    family: str
    site: str  # "attention" | "ffn"
    container: str  # AdapterHub's BottleneckLayer path, relative to the layer
    anchor: str  # adapterkit's target (the site's layer norm), relative to the layer


_PREFIX = r"(?P<prefix>(?:[A-Za-z0-9_]+\.)*?)"
LAYER_PATTERNS = {
    "llama": _PREFIX + r"layers\.(?P<layer>0|[1-9][0-9]*)",
    "gpt2": _PREFIX + r"h\.(?P<layer>0|[1-9][0-9]*)",
    "bert": _PREFIX + r"encoder\.layer\.(?P<layer>0|[1-9][0-9]*)",
}
MODEL_TYPES = {"llama": "llama", "gpt2": "gpt2", "bert": "bert"}

# module inside a layer -> (location, attention matrix, kind, which side is the hidden size);
# AdapterHub's LoRALinear.wrap calls in the model mixins
_LORA_TABLE: dict[str, dict[str, tuple[str, str | None, str, str]]] = {
    "llama": {
        "self_attn.q_proj": ("selfattn", "q", "linear", "in"), "self_attn.k_proj": ("selfattn", "k", "linear", "in"),
        "self_attn.v_proj": ("selfattn", "v", "linear", "in"),
        # sic: AdapterHub wraps down_proj as "intermediate" and up_proj as "output" (mixin_llama.py)
        "mlp.down_proj": ("intermediate", None, "linear", "out"), "mlp.up_proj": ("output", None, "linear", "in"),
    },
    "bert": {
        "attention.self.query": ("selfattn", "q", "linear", "in"), "attention.self.key": ("selfattn", "k", "linear", "in"),
        "attention.self.value": ("selfattn", "v", "linear", "in"),
        "intermediate.dense": ("intermediate", None, "linear", "in"), "output.dense": ("output", None, "linear", "out"),
    },
    "gpt2": {
        # c_attn is a LoRAMergedLinear (one fused q/k/v LoRA) in AdapterHub; not handled here
        "mlp.c_fc": ("intermediate", None, "conv1d", "in"), "mlp.c_proj": ("output", None, "conv1d", "out"),
    },
}
# modules AdapterHub could wrap but whose layout this converter does not handle, with the reason
LORA_UNSUPPORTED = {
    ("gpt2", "attn.c_attn"): "AdapterHub puts a merged q/k/v LoRA (LoRAMergedLinear) on GPT-2's fused c_attn; "
                             "that layout is not converted yet",
}

BOTTLENECK_TABLE: dict[str, tuple[BottleneckSite, ...]] = {
    "llama": (BottleneckSite("llama", "attention", "attention_adapters", "input_layernorm"),
              BottleneckSite("llama", "ffn", "output_adapters", "post_attention_layernorm")),
    "gpt2": (BottleneckSite("gpt2", "attention", "attention_adapters", "ln_1"),
             BottleneckSite("gpt2", "ffn", "output_adapters", "ln_2")),
    "bert": (BottleneckSite("bert", "attention", "attention.output", "attention.output.LayerNorm"),
             BottleneckSite("bert", "ffn", "output", "output.LayerNorm")),
}


@dataclass(frozen=True)
class Located:
    """A module path split into (family, prefix, layer, rest-of-path-inside-the-layer)."""

    family: str
    prefix: str
    layer: int
    inner: str

    def path(self, inner: str | None = None) -> str:
        """The full path of ``inner`` (default: this one) in the same layer."""
        return f"{self.prefix}{_layer_path(self.family, self.layer)}.{inner if inner is not None else self.inner}"


def _layer_path(family: str, layer: int) -> str:
    return {"llama": f"layers.{layer}", "gpt2": f"h.{layer}", "bert": f"encoder.layer.{layer}"}[family]


def locate(path: str, families: tuple[str, ...] | None = None) -> list[Located]:
    """Every way ``path`` splits into a layer of a known family and a path inside it."""
    out = []
    for family, pattern in LAYER_PATTERNS.items():
        if families is not None and family not in families:
            continue
        match = re.match(pattern + r"\.(?P<inner>.+)$", path)
        if match:
            out.append(Located(family, match["prefix"], int(match["layer"]), match["inner"]))
    return out


def lora_location(
    path: str, families: tuple[str, ...] | None = None,
) -> tuple[Located, tuple[str, str | None, str, str]] | None:
    """(where, (location, attn key, kind, hidden side)) of a module AdapterHub's LoRA wraps, or None."""
    for where in locate(path, families):
        entry = _LORA_TABLE[where.family].get(where.inner)
        if entry is not None:
            return where, entry
    return None


def lora_unsupported(path: str, families: tuple[str, ...] | None = None) -> str | None:
    for where in locate(path, families):
        reason = LORA_UNSUPPORTED.get((where.family, where.inner))
        if reason:
            return reason
    return None


def lora_module(where: Located, location: str, attn: str | None) -> str | None:
    """The module path of (layer, location, attn key) in ``where``'s family."""
    for inner, (loc, key, _kind, _side) in _LORA_TABLE[where.family].items():
        if loc == location and key == attn:
            return where.path(inner)
    return None


def bottleneck_by_container(container: str, families: tuple[str, ...] | None = None) -> tuple[Located, BottleneckSite] | None:
    for where in locate(container, families):
        for site in BOTTLENECK_TABLE[where.family]:
            if where.inner == site.container:
                return where, site
    return None


def bottleneck_by_anchor(anchor: str, families: tuple[str, ...] | None = None) -> tuple[Located, BottleneckSite] | None:
    for where in locate(anchor, families):
        for site in BOTTLENECK_TABLE[where.family]:
            if where.inner == site.anchor:
                return where, site
    return None


def lora_modules(family: str) -> list[str]:
    """The module names (inside a layer) AdapterHub's LoRA can wrap in ``family``."""
    return list(_LORA_TABLE[family])


def families_for(model_type: Any) -> tuple[str, ...] | None:
    """The families a base ``model_type`` allows (None: unknown, decide from the paths)."""
    if not isinstance(model_type, str):
        return None
    return tuple(f for f, t in MODEL_TYPES.items() if t == model_type)


# ---- files --------------------------------------------------------------------------

def adapter_folder(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, BIN_NAME, SAFETENSORS_NAME):
        return path.parent
    return path


def weights_file(folder: Path) -> Path | None:
    """The tensor file: safetensors first (torch-free), then AdapterHub's default pickle."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def is_adapterhub_config(data: Any) -> bool:
    """AdapterHub's ``build_full_config`` output: a ``config`` (dict or preset name) and a ``name``."""
    if not isinstance(data, dict) or "config" not in data or "name" not in data:
        return False
    version = data.get("version")
    return (isinstance(version, str) and version.startswith("adapters.")) or "model_type" in data or "hidden_size" in data


def detect(path: Path) -> bool:
    """True for a folder holding an AdapterHub adapter. Never raises."""
    try:
        folder = adapter_folder(Path(path))
        if not folder.is_dir() or not (folder / CONFIG_NAME).is_file() or weights_file(folder) is None:
            return False
        return is_adapterhub_config(read_json(folder / CONFIG_NAME))
    except Exception:
        return False


# ---- config defaults (adapters 1.3 dataclasses), to write complete configs --------------

LORA_DEFAULTS: dict[str, Any] = {
    "architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
    "leave_out": [], "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
    "init_weights": "lora", "init_weights_seed": None, "use_gating": False, "use_dora": False,
    "vera_d": None, "vera_b": None, "dtype": None,
}

BN_DEFAULTS: dict[str, Any] = {  # BnConfig's defaults for the optional fields
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}

# AdapterHub's preset names (ADAPTER_CONFIG_MAP) that map onto what adapterkit reads
BN_PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {"original_ln_before": True, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
               "reduction_factor": 16},
    "double_seq_bn": {"mh_adapter": True, "output_adapter": True, "non_linearity": "swish", "reduction_factor": 16},
    "par_bn": {"mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "reduction_factor": 2,
               "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0},
}
BN_PRESETS["pfeiffer"] = BN_PRESETS["seq_bn"]
BN_PRESETS["houlsby"] = BN_PRESETS["double_seq_bn"]
BN_PRESETS["parallel"] = BN_PRESETS["par_bn"]
