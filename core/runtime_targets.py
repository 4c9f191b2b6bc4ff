"""``validate --target``: what a serving runtime would reject, found before production does.

Each checker adds errors (the runtime refuses the adapter, or would serve it
wrong) and warnings (it serves it, given a flag or a conversion) to a
:class:`~adapterkit.core.validate.ValidationReport` whose adapter has already
passed the format checks. The rules restate the runtimes' own loaders:

- **vllm**: ``vllm/lora/peft_helper.py`` (``PEFTHelper.validate_legal``: rank
  above ``--max-lora-rank``, ``bias``, ``modules_to_save``, DoRA) and
  ``vllm/config/lora.py`` (``--max-lora-rank`` takes 1, 8, 16, 32, 64, 128, 256,
  320 or 512; default 16). vLLM keeps only ``r``, ``lora_alpha`` and
  ``use_rslora`` of the PEFT config and applies that one scale to every module
  (``rank_pattern`` / ``alpha_pattern`` are dropped), and it adapts only the
  modules the model class lists (packed into ``qkv_proj`` / ``gate_up_proj``).
- **llama.cpp**: the adapter must convert to a GGUF LoRA exactly (the same
  writer as ``convert --to gguf``: architecture, tensor names in the base,
  A/B pairing, rotary row order, one global alpha with per-module scales folded).
- **onnxruntime**: the adapter must be expressible as ``.onnx_adapter``
  parameters (``<module>.lora_A.weight`` ``[in, r]`` / ``lora_B`` ``[r, out]``,
  float32 or float16): its method must give low-rank factors
  (:meth:`Method.export_factors`), so a swappable ONNX export can take it.

Torch-free.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import AdapterkitError
from .plugins import Registry
from .validate import ValidationReport

#: vLLM's accepted values of --max-lora-rank (vllm/config/lora.py: MaxLoRARanks) and its default
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
#: module names vLLM adapts, per model class (their packed_modules_mapping, unpacked); others: not known here
_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE, "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE, "Qwen3ForCausalLM": _LLAMA_LIKE,
}
LORA_METHODS = ("lora", "qlora")  # a QLoRA adapter is LoRA tensors; the 4-bit base is the server's business


def check_runtime(report: ValidationReport, target: str, registry: Registry, base: str | Path | None = None) -> None:
    """Add ``target``'s findings to ``report`` (whose ``adapter`` is set); see the module docstring."""
    checker = CHECKERS.get(target)
    if checker is None:
        raise AdapterkitError(f"unknown runtime target {target!r}", expected=sorted(CHECKERS), code="bad_option")
    if report.adapter is None:
        report.not_checked.append(f"{target} rules (the adapter did not load)")
        return
    checker(report, report.adapter, registry, base)
    report.checks.append(f"{target} rules")


def _error(report: ValidationReport, message: str, location: str | None = None, *, code: str, **fields: Any) -> None:
    report.error(AdapterkitError(message, file=report.path, location=location, code=code, **fields))


def _warn(report: ValidationReport, message: str, location: str | None = None, *, code: str, **fields: Any) -> None:
    report.warn(AdapterkitError(message, file=report.path, location=location, code=code, **fields))


# ---- vLLM ---------------------------------------------------------------------------------

def _vllm(report: ValidationReport, adapter: Adapter, registry: Registry, base: str | Path | None) -> None:
    manifest = adapter.manifest
    method = manifest.method
    if method == "dora":
        _error(report, "vLLM does not support DoRA adapters (PEFTHelper: 'vLLM does not yet support DoRA')",
               "$.method.name", found=method, code="vllm_dora",
               hint="merge it into the base (adapterkit merge) and serve the merged model, or train a LoRA")
        return
    if method not in LORA_METHODS:
        _error(report, "vLLM serves LoRA adapters only", "$.method.name", expected=list(LORA_METHODS), found=method,
               code="vllm_method", hint="merge it into the base (adapterkit merge) where the method can merge")
        return
    if report.format == "peft":
        _vllm_peft_config(report)
    ranks = {name: t["r"] for name, t in manifest.targets.items()}
    top = max(ranks.values())
    needed = next((r for r in VLLM_MAX_RANKS if r >= top), None)
    where = f"$.targets[{max(ranks, key=lambda n: ranks[n])!r}].r"
    if needed is None:
        _error(report, f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANKS[-1]})", where,
               expected=f"<= {VLLM_MAX_RANKS[-1]}", found=top, code="vllm_rank",
               hint="compose --strategy svd --rank N lowers the rank (approximately), or merge the adapter")
    elif needed > VLLM_DEFAULT_MAX_RANK:
        _warn(report, f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: "
              f"vLLM refuses it unless started with --max-lora-rank {needed}", where, found=top, code="vllm_rank_flag",
              hint=f"serve with: vllm serve BASE --enable-lora --max-lora-rank {needed}")
    _vllm_scales(report, adapter)
    _vllm_modules(report, adapter, base)
    if report.format != "peft":
        _warn(report, "vLLM loads PEFT folders (adapter_config.json + adapter_model.safetensors)", code="vllm_format",
              found=report.format, hint=f"adapterkit convert {report.path} OUT --to peft")


def _vllm_peft_config(report: ValidationReport) -> None:
    """The PEFT fields vLLM refuses, read from the file vLLM reads (the reader may have refused them already)."""
    path = Path(report.path)
    config_file = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text("utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    if config.get("modules_to_save"):
        _error(report, "vLLM only supports modules_to_save being None", "$.modules_to_save",
               found=config["modules_to_save"], code="vllm_modules_to_save",
               hint="merge the adapter into the base (the saved modules are full weights)")
    if config.get("bias", "none") != "none":
        _error(report, "vLLM refuses adapter biases unless bias_enabled", "$.bias", found=config["bias"],
               code="vllm_bias")


def _vllm_scales(report: ValidationReport, adapter: Adapter) -> None:
    """vLLM applies the config's one lora_alpha / r (or / sqrt(r)) to every module."""
    rslora = bool(adapter.manifest.config.get("use_rslora", False))
    scales = {name: t["alpha"] / (math.sqrt(t["r"]) if rslora else t["r"]) for name, t in adapter.manifest.targets.items()}
    distinct = sorted(set(scales.values()))
    if len(distinct) > 1 and distinct[-1] - distinct[0] > 1e-6 * max(abs(s) for s in distinct):
        first = min(scales, key=lambda n: scales[n])
        last = max(scales, key=lambda n: scales[n])
        _error(report, "modules have different LoRA scales, but vLLM applies one lora_alpha / r to every module "
               "(it drops rank_pattern and alpha_pattern): the served outputs would be wrong", "$.targets",
               found=f"{first}: {scales[first]:g}, {last}: {scales[last]:g}", code="vllm_scales",
               hint="give every module the same alpha / r, or merge the adapter into the base")


def _vllm_modules(report: ValidationReport, adapter: Adapter, base: str | Path | None) -> None:
    architecture = adapter.manifest.base_model.get("architecture")
    if base is not None:
        from .base_model import read_base_model

        try:
            architecture = read_base_model(base).architecture or architecture
        except AdapterkitError:
            pass  # check_base reported it
    allowed = VLLM_MODULES.get(architecture or "")
    if allowed is None:
        report.not_checked.append(f"which modules vLLM adapts for {architecture or 'an unknown architecture'} "
                                  "(see its supported-models list)")
        return
    outside = sorted(name for name in adapter.manifest.targets if name.rsplit(".", 1)[-1] not in allowed)
    if outside:
        _error(report, f"vLLM does not adapt these modules of {architecture}", outside[0],
               expected=sorted(allowed), found=f"{len(outside)} modules: {', '.join(outside[:3])}"
               + (" ..." if len(outside) > 3 else ""), code="vllm_modules",
               hint="drop them from the adapter, or merge the adapter into the base")


# ---- llama.cpp ------------------------------------------------------------------------------

def _llama_cpp(report: ValidationReport, adapter: Adapter, registry: Registry, base: str | Path | None) -> None:
    if adapter.manifest.method not in LORA_METHODS:
        _error(report, "llama.cpp applies LoRA adapters only (lora_a / lora_b pairs)", "$.method.name",
               expected=list(LORA_METHODS), found=adapter.manifest.method, code="llama_cpp_method",
               hint="merge it into the base (adapterkit merge), then convert the merged model to GGUF")
        return
    if base is None:
        report.not_checked.append("llama.cpp architecture and tensor names (pass --base)")
        return
    _dry_run(report, "gguf", adapter, registry, base=base)


# ---- ONNX Runtime ---------------------------------------------------------------------------

def _onnxruntime(report: ValidationReport, adapter: Adapter, registry: Registry, base: str | Path | None) -> None:
    try:
        method = registry.method(adapter.manifest.method)
    except AdapterkitError as exc:
        report.error(exc)
        return
    config = method.resolve_config(adapter.manifest.config)
    for module, target in sorted(adapter.manifest.targets.items()):
        if method.export_factors(module, target, config, adapter.module_tensors(module)) is None:
            _error(report, f"a {adapter.manifest.method} adapter has no low-rank factors for ONNX Runtime's "
                   "LoRA inputs (an .onnx_adapter holds lora_A / lora_B pairs only)", f"$.targets[{module!r}]",
                   code="onnxruntime_method",
                   hint="export it merged instead: adapterkit export onnx ADAPTER --base BASE -o OUT --mode merged")
            return
    _dry_run(report, "onnx-adapter", adapter, registry, **({"base": base} if base is not None else {}))


def _dry_run(report: ValidationReport, fmt: str, adapter: Adapter, registry: Registry, **options: Any) -> None:
    """Write the adapter in ``fmt`` to a throwaway folder: every refusal of the writer is an error here."""
    try:
        writer = registry.format(fmt)
    except AdapterkitError as exc:
        report.error(exc)
        return
    with tempfile.TemporaryDirectory(prefix="adapterkit-target-") as tmp:
        try:
            writer.write(adapter, Path(tmp) / "out", **options)
        except AdapterkitError as exc:  # LossyConversionError, FormatError, ...: what the writer refuses
            exc.file = exc.file or report.path
            report.error(exc)


CHECKERS: dict[str, Callable[[ValidationReport, Adapter, Registry, str | Path | None], None]] = {
    "vllm": _vllm,
    "llama.cpp": _llama_cpp,
    "onnxruntime": _onnxruntime,
}
TARGETS = tuple(CHECKERS)
