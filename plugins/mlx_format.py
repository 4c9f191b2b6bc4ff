"""Format plugin ``mlx``: Apple mlx-lm LoRA adapters (adapters.safetensors + adapter_config.json).

What mlx-lm 0.32 does (``mlx_lm/tuner/lora.py``, ``tuner/utils.py``, ``models/llama.py``):

- ``LoRALinear`` holds ``lora_a`` ``[in, r]`` and ``lora_b`` ``[r, out]`` and computes
  ``linear(x) + scale * (x @ lora_a) @ lora_b``: canonical A = ``lora_a.T``, B = ``lora_b.T``,
  and the stored ``scale`` is the scale itself (alpha = scale * r).
- ``lora_parameters`` holds one ``rank``, one ``scale``, one ``dropout`` for every module, and
  optional ``keys``: module paths relative to a block (absent: every Linear / Embedding of a
  block), also matched against whole-model paths (so ``lm_head`` can be adapted).
- ``linear_to_lora_layers`` adapts ``model.layers[-max(num_layers, 0):]``: the last
  ``num_layers`` blocks, every block when ``num_layers <= 0``.
- ``load_adapters`` accepts only ``lora_a`` / ``lora_b`` / ``m`` leaves of LoRA layers it
  created, with equal shapes, and loads with ``strict=False``: a LoRA layer the file does not
  fill keeps ``lora_b = 0`` and changes nothing.
- Parameter paths are the model's attribute paths; for Llama-family models they equal the
  Hugging Face module paths (``model.layers.N.self_attn.q_proj``), which this plugin uses as is.
- ``fine_tune_type`` ``dora`` adds ``m`` ``[out]`` (DoRA); ``full`` is a full fine-tune.

Writing pads ranks and folds per-module scales into B (:mod:`adapterkit.plugins.lora.uniform`); ``num_layers``
covers exactly the blocks from the first adapted one and ``keys`` lists the adapted modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import check_tensor_dims, require_consistent
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.errors import FormatError, LossyConversionError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl
from adapterkit.core.io import atomic_write_bytes, canonical_json, read_json

from adapterkit.plugins import lora as U

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
METADATA = {"format": "mlx"}  # what mx.save_safetensors writes
_LEAVES = ("lora_a", "lora_b")


class MlxFormat(Format):
    name = "mlx"
    read_options = ("base",)
    write_options = ("base",)
    description = "Apple mlx-lm LoRA adapter (adapters.safetensors + adapter_config.json)"

    def detect(self, path: Path) -> bool:
        try:
            folder, weights = _locate(Path(path))
            config = read_json(folder / CONFIG_NAME)
            return weights.is_file() and isinstance(config, dict) and "lora_parameters" in config
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        """Options: ``base`` (local HF folder): checks module shapes and ``num_layers``."""
        adapter = read_mlx(Path(path), **self.options_for(options, "read"))
        return require_consistent(adapter, options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (local HF folder): needed when the first adapted block is not block 0."""
        write_mlx(adapter, Path(path), **self.options_for(options, "write"))

    def checks(self, path: Path) -> list[str]:
        return ["that mlx-lm names this model's modules as Hugging Face does (true for Llama-family models); "
                "load it with mlx_lm.utils.load(base, adapter_path=...) to be sure"]


def _locate(path: Path) -> tuple[Path, Path]:
    """(folder, weights file): a folder, or a ``*adapters.safetensors`` file (checkpoints included)."""
    if path.is_file() and path.name.endswith(WEIGHTS_NAME):
        return path.parent, path
    return path, path / WEIGHTS_NAME


# ---- reading ---------------------------------------------------------------------

def read_mlx(path: Path, base: Any = None) -> Adapter:
    folder, weights = _locate(path)
    config_path = folder / CONFIG_NAME
    if not weights.is_file():
        raise FormatError("mlx-lm adapter weights not found", file=str(weights), code="missing_file")
    config = read_json(config_path, max_bytes=U.CONFIG_MAX_BYTES)
    cfg_file = str(config_path)
    if not isinstance(config, dict):
        raise FormatError("adapter_config.json must be a JSON object", file=cfg_file, code="bad_config")
    rank, scale, dropout, keys = _lora_parameters(config, cfg_file)
    depth = config.get("num_layers", 16)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise FormatError("num_layers must be an integer", file=cfg_file, location="$.num_layers", found=depth,
                          code="bad_config")
    file = str(weights)
    tensors, _ = safetensors_io.load(weights)
    check_tensor_dims(tensors, file)
    modules = _modules(tensors, rank, scale, file)
    for name in modules:
        _check_key(name, keys, cfg_file)
    info = U.base_info(base, config.get("model"))
    U.check_base(modules, info, file)
    if info is not None:
        _check_depth(modules, depth, U.num_layers(info), cfg_file)
    warnings: list[str] = []
    source = {k: v for k, v in config.items() if k != U.RECORD_KEY}
    alpha = U.alpha_for(scale, rank)  # mlx-lm's scale is the scale itself
    for module in modules.values():
        module.alpha = alpha
    restored = U.restore(config.get(U.RECORD_KEY), modules, U.tensor_digest(tensors), warnings)
    modules, facts = restored if restored is not None else (modules, None)
    name = config.get("model") if isinstance(config.get("model"), str) else None
    return U.build_adapter(modules, config=U.plain_config(modules, rank, alpha, dropout), fmt="mlx",
                           source_config=source, info=info, name=name, facts=facts, file=file, warnings=warnings)


def _lora_parameters(config: dict[str, Any], file: str) -> tuple[int, float, float, list[str] | None]:
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        raise FormatError("mlx-lm DoRA adapters (fine_tune_type dora) are not supported yet", file=file,
                          location="$.fine_tune_type", found=kind,
                          hint="DoRA's magnitude vector m has no LoRA equivalent; retrain with fine_tune_type lora",
                          code="unsupported_method")
    if kind != "lora":
        raise FormatError("not a LoRA adapter", file=file, location="$.fine_tune_type", expected="lora", found=kind,
                          hint="fine_tune_type full saves whole weights, not an adapter", code="unsupported_method")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise FormatError("lora_parameters must be an object", file=file, location="$.lora_parameters", found=params,
                          code="bad_config")
    rank, scale, dropout = params.get("rank", 8), params.get("scale"), params.get("dropout", 0.0)
    keys = params.get("keys")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FormatError("rank must be an integer >= 1", file=file, location="$.lora_parameters.rank", found=rank,
                          code="bad_config")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale * rank < float("inf"):
        raise FormatError("scale must be a number > 0 (mlx-lm uses the scale itself, not alpha)", file=file,
                          location="$.lora_parameters.scale", found=scale, code="bad_config")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise FormatError("dropout must be a number in [0, 1)", file=file, location="$.lora_parameters.dropout",
                          found=dropout, code="bad_config")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise FormatError("keys must be a list of module paths", file=file, location="$.lora_parameters.keys",
                          found=keys, code="bad_config")
    return rank, float(scale), float(dropout), keys


def _modules(tensors: dict[str, np.ndarray], rank: int, scale: float, file: str) -> dict[str, U.Module]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "m":
            raise FormatError("DoRA magnitude vector found: DoRA adapters are not supported yet", file=file,
                              location=key, hint="retrain with fine_tune_type lora", code="unsupported_method")
        if leaf not in _LEAVES or not module:
            raise FormatError("not an mlx-lm LoRA parameter", file=file, location=key,
                              expected="<module>.lora_a / <module>.lora_b", code="unexpected_tensor")
        pairs.setdefault(module, {})[leaf] = array
    if not pairs:
        raise FormatError("the adapter holds no tensors", file=file, code="empty_adapter")
    modules: dict[str, U.Module] = {}
    for name, pair in sorted(pairs.items()):
        missing = [leaf for leaf in _LEAVES if leaf not in pair]
        if missing:
            raise FormatError(f"{missing[0]} is missing for this module", file=file, location=f"{name}.{missing[0]}",
                              code="missing_tensor")
        a, b = pair["lora_a"], pair["lora_b"]
        if a.ndim != 2 or b.ndim != 2:
            raise FormatError("only 2-d LoRA tensors are supported (mixture-of-experts LoRASwitchLinear is not)",
                              file=file, location=f"{name}.lora_a", found=[list(a.shape), list(b.shape)],
                              code="unsupported_module")
        if a.shape[1] != rank or b.shape[0] != rank:
            raise FormatError("LoRA rank differs from lora_parameters.rank (mlx-lm would refuse the file)", file=file,
                              location=name, expected=f"lora_a [in, {rank}], lora_b [{rank}, out]",
                              found=[list(a.shape), list(b.shape)], code="tensor_shape")
        if "embed" in name.rsplit(".", 1)[-1]:
            raise FormatError("LoRA on embeddings is not supported", file=file, location=name,
                              hint="the lora method adapts linear modules", code="unsupported_module")
        modules[name] = U.Module(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), rank, 0.0, scale)
    return modules


def _relative_key(name: str) -> str:
    """The key mlx-lm matches: the path inside a block, or the whole path outside blocks."""
    block = U.split_block(name)
    return block[2] if block else name


def _check_key(name: str, keys: list[str] | None, file: str) -> None:
    key = _relative_key(name)
    if keys is None and not U.split_block(name):
        raise FormatError("a module outside model.layers is adapted only when lora_parameters.keys names it "
                          "(mlx-lm would refuse the file)", file=file, location=name, code="unexpected_tensor")
    if keys is not None and key not in keys:
        raise FormatError("module is not selected by lora_parameters.keys (mlx-lm would refuse the file)", file=file,
                          location=name, expected=keys, found=key, code="unexpected_tensor")


def _check_depth(modules: dict[str, U.Module], depth: int, blocks: int | None, file: str) -> None:
    if blocks is None or depth <= 0:
        return
    first = blocks - depth
    for name in modules:
        block = U.split_block(name)
        if block and block[1] < first:
            raise FormatError(f"block {block[1]} is outside the last num_layers={depth} of {blocks} blocks "
                              "(mlx-lm would refuse the file)", file=file, location=name, code="unexpected_tensor")


# ---- writing ---------------------------------------------------------------------

def write_mlx(adapter: Adapter, folder: Path, base: Any = None) -> None:
    modules = U.adapter_modules(adapter, "mlx")
    prefixes = {block[0] for name in modules if (block := U.split_block(name))}
    if len(prefixes) > 1:
        raise LossyConversionError("modules sit in more than one list of blocks; mlx-lm adapts one (model.layers)",
                                   found=sorted(prefixes), code="unsupported_module")
    for name in modules:
        if "embed" in name.rsplit(".", 1)[-1]:
            raise LossyConversionError("LoRA on embeddings is not written to mlx", location=name,
                                       code="unsupported_module")
    scale = U.common_scale(modules)
    plan = U.uniform(modules, scale)
    tensors: dict[str, np.ndarray] = {}
    for name in modules:
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(plan.a[name].T)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(plan.b[name].T)
    original = _source_config(adapter)
    info = U.base_info(base, adapter.manifest.base_model.get("name"))
    if info is not None:
        U.check_base(modules, info, "(adapter to save)")
    params = dict(original.get("lora_parameters") or {})
    params.update(rank=plan.rank, scale=U.number(scale), dropout=adapter.config.get("dropout", 0.0))
    keys = _keys(modules, params.get("keys"), "lora_parameters" in original)
    if keys is not None:  # None: the source's own (absent) keys stay
        params["keys"] = keys
    config = {**original, "fine_tune_type": "lora", "lora_parameters": params,
              "num_layers": _depth(modules, original.get("num_layers"), info, folder)}
    name = adapter.manifest.base_model.get("name")
    if name and "model" not in config:
        config["model"] = name
    config[U.RECORD_KEY] = U.make_record(adapter, modules, plan, U.tensor_digest(tensors))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_NAME, safetensors_io.serialize(tensors, METADATA))
    atomic_write_bytes(folder / CONFIG_NAME, canonical_json(config))


def _source_config(adapter: Adapter) -> dict[str, Any]:
    """The mlx config the adapter was read from (its other training fields are kept), else {}."""
    source = adapter.manifest.provenance.get("converted_from") or {}
    config = source.get("config") if source.get("format") == "mlx" else None
    return {k: v for k, v in config.items() if k != U.RECORD_KEY} if isinstance(config, dict) else {}


def _keys(modules: dict[str, U.Module], original: Any, from_mlx: bool) -> list[str] | None:
    """lora_parameters.keys: the source's when it still selects every module, else the adapted paths."""
    needed = sorted({_relative_key(name) for name in modules})
    in_blocks = all(U.split_block(name) for name in modules)
    if from_mlx and original is None and in_blocks:
        return None  # the source adapted every linear of its blocks; so will mlx-lm again
    if isinstance(original, list) and set(needed) <= set(original):
        return original
    return needed


def _depth(modules: dict[str, U.Module], original: Any, info: Any, folder: Path) -> int:
    """num_layers: enough last blocks to reach the first adapted one."""
    indices = [block[1] for name in modules if (block := U.split_block(name))]
    if not indices:
        return 0  # only whole-model modules (lm_head); keys select them, no block matches
    first = min(indices)
    blocks = U.num_layers(info) if info is not None else None
    if isinstance(original, int) and not isinstance(original, bool):
        if blocks is None or original <= 0 or original >= blocks - first:
            return original  # still covers every adapted block
    if blocks is not None:
        if max(indices) >= blocks:
            raise FormatError(f"block {max(indices)} does not exist in a base of {blocks} blocks", file=str(folder),
                              code="wrong_base")
        return blocks - first
    if first == 0:
        return -1  # every block
    raise FormatError(
        f"mlx-lm counts num_layers from the last block, and the first adapted block is {first}: "
        "the number of blocks of the base model is needed", file=str(folder),
        hint="pass the base model (--base BASE, or save(..., base=BASE))", code="base_missing",
    )


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(MlxFormat())
