"""QLoRA (Dettmers et al., 2023) as an adapterkit :class:`Method`: method id ``qlora``.

LoRA on top of a base whose linear layers are quantised to 4 bits (NF4 by
default, double-quantised absmax, blocksize 64) through bitsandbytes. The
adapter math is LoRA's (``scale * B @ A``, rsLoRA, rank / alpha patterns);
canonical tensors are ``M.qlora.A`` ``[r, in]`` and ``M.qlora.B`` ``[out, r]``.

The manifest's ``method.config`` records the quantisation (``quant_type``,
``double_quant``, ``blocksize``, ``compute_dtype``, ``quantize``), so ``apply``
quantises a full-precision base exactly as it was during training
(quantisation is deterministic) before it injects the adapter:

- ``quantize: "all-linear"`` (default, as in the paper): every linear / Conv1D
  layer except the output head (``lm_head``, classifier...; the rule of LoRA's
  ``all-linear``) becomes 4-bit, targeted or not; targets outside that set
  (a head named in ``target_modules``) are quantised too.
- ``quantize: "targets"``: only the adapted layers.

A base that is already 4-bit (a model quantised by an earlier ``qlora``
adapter, or loaded with transformers' ``BitsAndBytesConfig``) is used as it is
when its settings match; different settings are refused.

Merging: the adapter was trained against ``Q(W)``, the dequantised 4-bit base,
so :meth:`QloraMethod.merged_weight` writes ``Q(W) + scale * B @ A`` in full
precision (the model that was trained, exactly). :func:`quantization_error`
says how far ``Q(W)`` is from the float base. In a model, ``merge`` swaps each
adapted ``Linear4bit`` for a dense ``nn.Linear`` (``Q(W)`` + the update) and
``unmerge`` puts the same 4-bit module back, bit for bit.

Torch-free at import; torch and bitsandbytes are imported when a model is touched.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from adapterkit import config_error
from adapterkit.core.errors import UsageError
from adapterkit.core.plugin.capabilities import MergedWeight, QuantizedBase, TraceExport

from .config import ALIASES, CONFIG_SCHEMA, DEFAULTS, validate_config
from .method import KINDS, LoraMethod

QUANT_DEFAULTS: dict[str, Any] = {
    "quant_type": "nf4",
    "double_quant": True,
    "blocksize": 64,
    "compute_dtype": "float32",
    "quantize": "all-linear",
}
QUANT_SCOPES = ("all-linear", "targets")
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("float32", "bfloat16")

QLORA_CONFIG_SCHEMA: dict[str, Any] = {
    **CONFIG_SCHEMA,
    "title": "QLoRA config (method.config of a qlora adapter): the LoRA fields plus the base quantisation",
    "properties": {
        **CONFIG_SCHEMA["properties"],
        "quant_type": {"enum": list(QUANT_TYPES), "default": "nf4",
                       "description": "4-bit data type of the base weights: NormalFloat4 (nf4) or FP4."},
        "double_quant": {"type": "boolean", "default": True,
                         "description": "Quantise the per-block absmax statistics again (8-bit, blocks of 256): "
                                        "bitsandbytes' compress_statistics."},
        "blocksize": {"enum": list(BLOCKSIZES), "default": 64,
                      "description": "Weights per quantisation block (one absmax each)."},
        "compute_dtype": {"enum": list(COMPUTE_DTYPES), "default": "float32",
                          "description": "dtype of the 4-bit matmul (the input is cast to it). float32 by default: "
                                         "exact on CPU; bfloat16 as in the paper on a GPU."},
        "quantize": {"enum": list(QUANT_SCOPES), "default": "all-linear",
                     "description": 'Which base layers are 4-bit: "all-linear" = every linear / Conv1D layer but the '
                                    'output head (the paper), "targets" = only the adapted layers.'},
    },
}


def validate_qlora_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The full QLoRA config (defaults filled); UsageError says how to fix bad input."""
    if not isinstance(config, Mapping):
        raise UsageError("QLoRA config must be a mapping of options", found=type(config).__name__, code="bad_config")
    known = {**DEFAULTS, **QUANT_DEFAULTS}
    for key in config:
        if key not in known:
            suggestion = ALIASES.get(key) or {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant":
                                             "double_quant", "bnb_4bit_compute_dtype": "compute_dtype"}.get(key) \
                or next(iter(difflib.get_close_matches(str(key), known, n=1)), None)
            raise UsageError(f"unknown QLoRA option {key!r}", location=f"$.method.config.{key}", expected=sorted(known),
                             hint=f"did you mean {suggestion!r}?" if suggestion else "remove it", code="bad_config")
    lora = validate_config({k: v for k, v in config.items() if k in DEFAULTS})
    quant = {**QUANT_DEFAULTS, **{k: v for k, v in config.items() if k in QUANT_DEFAULTS}}
    _choice("quant_type", quant["quant_type"], QUANT_TYPES, 'quant_type="nf4" (the paper\'s NormalFloat4)')
    if not isinstance(quant["double_quant"], bool):
        raise config_error("double_quant", "double_quant must be true or false", quant["double_quant"], "pass double_quant=True")
    blocksize = quant["blocksize"]
    if isinstance(blocksize, float) and blocksize.is_integer():
        blocksize = int(blocksize)
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise config_error("blocksize", f"blocksize must be one of {list(BLOCKSIZES)}", quant["blocksize"], "pass blocksize=64")
    quant["blocksize"] = int(blocksize)
    _choice("compute_dtype", quant["compute_dtype"], COMPUTE_DTYPES, 'compute_dtype="float32" on CPU')
    _choice("quantize", quant["quantize"], QUANT_SCOPES, 'quantize="all-linear" (every base linear but the head)')
    return {**lora, **quant}



def _choice(key: str, value: Any, choices: tuple[str, ...], hint: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise config_error(key, f"{key} must be one of {list(choices)}", value, f"pass {hint}")


class QloraMethod(LoraMethod, MergedWeight, QuantizedBase, TraceExport):
    """LoRA on a 4-bit quantised base (bitsandbytes NF4 / FP4).

    Its update is LoRA's (:class:`~adapterkit.LowRank`: served, composed and lowered as LoRA);
    merging writes ``Q(W) + scale * B @ A``, the model that was trained.
    """

    name = "qlora"
    version = "1"
    description = "QLoRA: LoRA on a 4-bit (NF4/FP4, bitsandbytes) quantised base; merges as Q(W) + scale * B @ A"
    carried_config = tuple(QUANT_DEFAULTS)
    kinds = KINDS  # a 4-bit base holds linear layers only
    #: unmerge restores the 4-bit base bit for bit (the Linear4bit is kept while merged)
    exact_unmerge = True

    def config_schema(self) -> dict[str, Any]:
        return QLORA_CONFIG_SCHEMA

    def default_config(self) -> dict[str, Any]:
        return {**super().default_config(), **QUANT_DEFAULTS}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return validate_qlora_config(config)

    def minimal_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """LoRA fields only when not default; the quantisation fields always (a reader sees how the base was made)."""
        lora = super().minimal_config({k: v for k, v in config.items() if k not in QUANT_DEFAULTS})
        quant = {k: config.get(k, v) for k, v in QUANT_DEFAULTS.items()}
        return dict(sorted({**lora, **quant}.items()))

    def merged_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], base_weight: np.ndarray) -> np.ndarray:
        """``Q(W) + scale * B @ A`` (float32, stored orientation): the dequantised 4-bit base plus the update.

        ``Q`` is the quantisation recorded in ``config``, applied to ``base_weight`` exactly as
        ``apply`` does in a model. For ``W + scale * B @ A`` (the float base) use :meth:`delta_weight`.
        """
        return self.base_weight(module, target, config, base_weight) + self.delta_weight(module, target, config, tensors)

    def base_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                    weight: np.ndarray) -> np.ndarray:
        """``Q(W)``: a float base weight (stored orientation) as the 4-bit model sees it, float32.

        For a merge into a float base folder: every module :meth:`quantized_modules` lists
        that the adapter does not adapt should be written as this, so the merged model is the
        trained model (adapted ones are :meth:`merged_weight`).
        """
        from .quant import QuantSpec, roundtrip_array

        spec = QuantSpec.from_config(validate_qlora_config(config))
        return roundtrip_array(np.asarray(weight, dtype=np.float32), target.get("kind", "linear"), spec)

    def quantized_modules(self, config: Mapping[str, Any], base_dir: Any) -> dict[str, dict[str, Any]]:
        """Every module ``apply`` quantises in the base at ``base_dir``: path -> ``{"kind", "shape"}``.

        The base's architecture is built on the meta device (no weights read) and the
        ``quantize`` rule is applied to it; the adapted modules are added by the caller.
        """
        from .layer import describe
        from .targeting import select_modules

        config = validate_qlora_config(config)
        model = _meta_model(base_dir)
        rule = {"target_modules": "all-linear", "layers_to_transform": None} if config["quantize"] == "all-linear" \
            else config
        out = {}
        for path, module in select_modules(model, rule).items():
            kind, shape = describe(module)
            out[path] = {"kind": kind, "shape": shape}
        return out

    def prepare_model(self, model: Any, config: Mapping[str, Any], paths: list[str]) -> None:
        """Quantise the base layers ``config["quantize"]`` names (the adapted ``paths`` always)."""
        quantize_base(model, config, paths)

    @contextlib.contextmanager
    def prepare_export(self, model: Any, mode: str = "merged", adapter_name: str = "default") -> Iterator[Any]:
        """Merge the adapter and stand a dense ``nn.Linear`` holding ``Q(W)`` in for every other 4-bit layer.

        bitsandbytes' 4-bit matmul cannot be traced to ONNX; the dense stand-ins compute the
        same function in float32. Everything is put back on exit.
        """
        import adapterkit

        from .layer import LoraLayer, replace_module
        from .quant import dense_linear, dequantize, is_quantized

        if mode != "merged":
            raise UsageError(f"method {self.name!r} has no ONNX export mode {mode!r}", expected="merged",
                             code="bad_mode")
        handle = adapterkit.attached(model).get(adapter_name)
        merge, unmerge = ((handle.merge, handle.unmerge) if handle is not None
                          else (lambda: self.merge(model, adapter_name), lambda: self.unmerge(model, adapter_name)))
        merge()
        traced, swapped = model, []
        try:
            for path, module in list(traced.named_modules()):
                if is_quantized(module) and path:
                    parent = traced.get_submodule(path.rpartition(".")[0]) if "." in path else traced
                    if isinstance(parent, LoraLayer) and path.endswith(".base_layer"):
                        parent.base_layer = dense_linear(module, dequantize(module))
                        swapped.append((parent, module, None))
                    else:
                        replace_module(traced, path, dense_linear(module, dequantize(module)))
                        swapped.append((traced, module, path))
            yield traced
        finally:
            for owner, module, path in reversed(swapped):
                if path is None:
                    owner.base_layer = module
                else:
                    replace_module(owner, path, module)
            unmerge()


def _meta_model(base_dir: Any) -> Any:
    """The model class of the HF folder ``base_dir``, built on the meta device from its config.json."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)


def quantize_base(model: Any, config: Mapping[str, Any], paths: list[str] | None = None) -> list[str]:
    """Quantise ``model``'s base layers in place as a qlora ``config`` says; returns the quantised paths.

    ``paths`` (the adapted modules; by default those the config's ``target_modules`` selects) are
    always included. Modules that are already 4-bit
    are kept when their settings match ``config`` and refused otherwise.
    """
    from adapterkit.core.errors import BaseModelError

    from .layer import LoraLayer, describe, replace_module
    from .quant import QuantSpec, is_quantized, quantize_module, spec_of
    from .targeting import select_modules

    config = validate_qlora_config(config)
    spec = QuantSpec.from_config(config)
    chosen = list(paths) if paths is not None else list(select_modules(model, config))
    if config["quantize"] == "all-linear":
        everything = select_modules(model, {"target_modules": "all-linear", "layers_to_transform": None})
        chosen = list(dict.fromkeys([*everything, *chosen]))
    for path in chosen:
        module = model.get_submodule(path)
        wrapper = module if isinstance(module, LoraLayer) else None
        base = wrapper.base_layer if wrapper is not None else module
        if wrapper is not None and wrapper.quantized_base is not None:
            base = wrapper.quantized_base
        if is_quantized(base):
            if spec_of(base) != spec:
                raise BaseModelError(
                    f"module {path} is already 4-bit with other settings", location=path,
                    expected=spec.describe(), found=spec_of(base).describe(),
                    hint="apply the adapter to the full-precision base, or to one quantised the same way",
                    code="quantization_mismatch",
                )
            base.support_avx512bf16_for_cpu = False  # see quant: keep the layout (transformers' modules repack)
            continue
        if wrapper is not None:
            if wrapper.merged:
                raise UsageError(f"module {path} holds merged adapters; unmerge them before quantising the base",
                                 location=path, code="merged_adapters")
            found = describe(base)
            wrapper.base_layer = quantize_module(base, found[0], spec)
            continue
        found = describe(base)
        if found is None:  # select_modules lets only linear / Conv1D modules through
            raise UsageError(f"module {path} cannot be quantised", location=path, code="bad_target")
        replace_module(model, path, quantize_module(base, found[0], spec))
    return chosen


def quantization_error(weight: Any, config: Mapping[str, Any] | None = None, kind: str = "linear") -> dict[str, float]:
    """How far the 4-bit base ``Q(W)`` is from ``W`` for one weight (stored orientation), under a qlora config.

    Returns ``max_abs``, ``mean_abs``, ``relative_max`` (max |Q(W) - W| / max |W|) and
    ``relative_fro`` (||Q(W) - W||_F / ||W||_F). This is the rounding a QLoRA merge keeps.
    """
    from .quant import QuantSpec
    from .quant import quantization_error as _error

    return _error(weight, QuantSpec.from_config(validate_qlora_config(config or {})), kind)


def model_quantization_error(model: Any, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`quantization_error` over every layer a qlora ``config`` quantises in a full-precision ``model``.

    Returns ``{"modules": {path: error}, "max_abs": ..., "relative_max": ..., "relative_fro": ...}``
    (worst over the modules; ``relative_fro`` over all quantised weights together).
    """
    from .layer import describe
    from .targeting import select_modules

    config = validate_qlora_config(config or {})
    if config["quantize"] == "all-linear":
        modules = select_modules(model, {"target_modules": "all-linear", "layers_to_transform": None})
    else:
        modules = select_modules(model, config)
    errors: dict[str, dict[str, float]] = {}
    sq_diff = sq_norm = 0.0
    for path, module in modules.items():
        kind, _ = describe(module)
        weight = module.weight.detach().float().cpu().numpy()
        error = quantization_error(weight, config, kind)
        errors[path] = error
        norm = float(np.linalg.norm(weight.astype(np.float64)))
        sq_norm += norm ** 2
        sq_diff += (error["relative_fro"] * norm) ** 2
    return {
        "modules": errors,
        "max_abs": max((e["max_abs"] for e in errors.values()), default=0.0),
        "relative_max": max((e["relative_max"] for e in errors.values()), default=0.0),
        "relative_fro": (sq_diff / sq_norm) ** 0.5 if sq_norm else 0.0,
    }
