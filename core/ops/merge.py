"""Fold an adapter into its base model and write a full Hugging Face model folder.

The merge streams: shard by shard, tensor by tensor, straight from the base's
safetensors files (numpy, no torch). Each output shard's header is computed
first from shapes and dtypes, then the data is written tensor by tensor, so at
most one tensor (plus its update) is in memory: unchanged tensors are copied
in the kernel (``copy_file_range``) or cast in bounded chunks. For an adapted
module the method's update is added in float32 and the sum is rounded once to
the output dtype.

Everything else in the base folder that is not a weight file (config.json,
tokenizer and generation files, README, ...) is copied; config.json is
rewritten only when the dtype or the weight tying changes. The shard layout is
kept and ``model.safetensors.index.json`` is rewritten (``total_size``
updated). The output folder appears atomically: complete, or not at all.

Methods plug in through their capabilities (:mod:`adapterkit.core.plugin.capabilities`):

- ``Method.merge_refusal(config)`` says why an adapter cannot merge (nothing is written);
- :class:`~adapterkit.MergedWeight` gives the merged weight itself from the base weight
  (float32 in, float32 out) and is preferred: DoRA rescales rows by a magnitude, QLoRA
  adds to ``Q(W)``, (IA)^3 scales rows or columns;
- otherwise an additive update: :class:`~adapterkit.DeltaWeight` (``delta_weight``) or
  :class:`~adapterkit.LowRank` (``scale * B @ A`` from ``lora_factors``);
- :class:`~adapterkit.QuantizedBase` rewrites base layers the adapter does not adapt
  (QLoRA: every layer the trained model had in 4 bits is written as ``Q(W)``);
- :class:`~adapterkit.MergedBias` gives each adapted module's new bias (a method that
  scales a module's whole output, like (IA)^3, scales the bias too); modules without a
  stored bias are skipped.

``tensors`` holds the module's tensors by parameter name plus the shared ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adapterkit.core.errors import AdapterkitError, BaseModelError, PluginError, UsageError
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import INDEX_NAME, read_base_model
from adapterkit.core.io import atomic_directory, read_json
from adapterkit.core.ops.merge_plan import DTYPE_CHOICES, MergePlan, OutTensor, Shard, plan_merge
from adapterkit.core.plugin.capabilities import MergedBias, MergedWeight, QuantizedBase, module_delta
from adapterkit.core.plugin.method import Method
from adapterkit.core.plugin.registry import Registry, default_registry

__all__ = ["DTYPE_CHOICES", "merge_into_base"]

#: files that hold weights of some format: never copied (the merged safetensors replace them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
#: files that describe the base folder itself and would be false about the merged one
NOT_COPIED = frozenset({"adapterkit-prepared.json"})  # core.real_models' "this cache copy is complete" marker
CHUNK_BYTES = 16 * 1024 * 1024


def merge_into_base(
    adapter_or_path: Adapter | str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    registry: Registry | None = None,
    progress: bool = False,
) -> Path:
    """Write the base model with the adapter folded in as a new HF folder ``out_dir``.

    :param adapter_or_path: an :class:`Adapter` or a path to one (any installed format).
    :param base_dir: local Hugging Face folder (config.json + safetensors) of the base.
    :param dtype: ``float32``, ``bfloat16``, ``float16`` for every float tensor, or
        ``None`` / ``"auto"`` to keep each tensor's stored dtype.
    :param progress: show a progress bar on stderr (only when it is a terminal).
    :returns: ``out_dir``. Raises an :class:`AdapterkitError` (nothing written) when the
        method cannot merge or the base does not fit the adapter.
    """
    registry = registry or default_registry()
    if isinstance(adapter_or_path, Adapter):
        adapter = adapter_or_path
    else:
        from adapterkit.core.store.adapters import load

        adapter = load(adapter_or_path, base=base_dir, registry=registry)
    method = registry.method(adapter.method)
    refusal = method.merge_refusal(adapter.config)
    if refusal:
        raise UsageError(f"cannot merge this adapter: {refusal}", location="$.method",
                         hint="keep it as a separate adapter (adapterkit.apply) instead", code="not_mergeable")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise UsageError("the output folder is the base model folder", file=str(out_dir),
                         hint="write the merged model to a new folder", code="output_is_input")
    base = read_base_model(base_dir)
    plan = plan_merge(adapter, base, dtype, _rewritten_modules(method, adapter, base_dir),
                      biases=isinstance(method, MergedBias))
    updates = _Updates(adapter, method)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, _progress_bar(plan.nbytes, progress) as bar, \
            single_threaded_blas():
        _copy_side_files(base_dir, tmp, plan)
        for shard in plan.shards:
            write_shard(shard, tmp / shard.name, updates, bar)
        if plan.has_index:
            _write_index(base_dir / INDEX_NAME, tmp / INDEX_NAME, plan)
    return out_dir


def _rewritten_modules(method: Method, adapter: Adapter, base_dir: Path) -> dict[str, dict[str, Any]]:
    """Modules whose base weight the method changes without adapting them (:class:`QuantizedBase`).

    QLoRA trains against the 4-bit base ``Q(W)``: its ``quantized_modules(config, base_dir)``
    lists every layer the trained model had quantised, and ``base_weight(...)`` gives ``Q(W)``,
    so the merged model is exactly the trained one.
    """
    if not isinstance(method, QuantizedBase):
        return {}
    return {m: dict(t) for m, t in method.quantized_modules(adapter.config, base_dir).items() if m not in adapter.targets}


class _Updates:
    """Computes an adapted module's merged weight through the method's capabilities."""

    def __init__(self, adapter: Adapter, method: Method):
        self.adapter, self.method = adapter, method
        #: the updates of the last stacked parameters, whose per-index matrices are written one at a time
        self.stacked: dict[str, np.ndarray] = {}

    def apply(self, module: str, target: Mapping[str, Any], base: np.ndarray, how: str = "update",
              part: tuple[int, int, int] | None = None) -> np.ndarray:
        """``base`` (any float dtype) with the update folded in, in float32 (float64 for a float64 base).

        ``how="base"``: a module the method rewrites without adapting it (``base_weight``).
        ``part``: ``base`` is rows ``start:stop`` of index ``i`` of a stacked parameter (``(i, start, stop)``).
        """
        if part is not None:
            return self._apply_part(module, target, base, part)
        method, config = self.method, self.adapter.config
        tensors = self.adapter.module_tensors(module) if how != "base" else {}
        work = np.float64 if base.dtype == np.float64 else np.float32
        weight = base.astype(work, copy=False)  # base is a fresh array read for this call: safe to update
        if how == "base" and isinstance(method, QuantizedBase):
            result, what = method.base_weight(module, target, config, weight), "base_weight"
        elif how == "bias" and isinstance(method, MergedBias):
            result, what = method.merged_bias(module, target, config, tensors, weight), "merged_bias"
        elif isinstance(method, MergedWeight):
            result, what = method.merged_weight(module, target, config, tensors, weight), "merged_weight"
        else:
            result, what = module_delta(method, module, target, config, tensors), "delta_weight"
        if result is None or tuple(np.shape(result)) != tuple(base.shape):
            raise PluginError(
                f"method {method.name!r} {what} gave "
                f"{'nothing' if result is None else list(np.shape(result))} for {module}",
                location=module, expected=list(base.shape), hint="this is a bug in the method's plugin",
                code="bad_merge",
            )
        if what != "delta_weight":
            return np.asarray(result)
        return np.add(weight, result, out=weight, dtype=work)

    def _apply_part(self, module: str, target: Mapping[str, Any], base: np.ndarray,
                    part: tuple[int, int, int]) -> np.ndarray:
        """A stored slice of a stacked parameter plus its slice of the (additive) update, computed once."""
        delta = self.stacked.get(module)
        if delta is None:
            method = self.method
            delta = module_delta(method, module, target, self.adapter.config, self.adapter.module_tensors(module))
            if isinstance(method, MergedWeight) or delta is None or list(np.shape(delta)) != list(target["shape"]):
                raise UsageError(
                    f"method {method.name!r} has no additive update for {module}, which the base stores as "
                    "per-index matrices", location=module,
                    hint="save the base with its stacked parameters whole (transformers: save_original_format=False)",
                    code="unsupported")
            if len(self.stacked) >= 2:  # the per-index matrices of at most two parameters interleave in key order
                self.stacked.pop(next(iter(self.stacked)))
            self.stacked[module] = delta
        index, start, stop = part
        work = np.float64 if base.dtype == np.float64 else np.float32
        weight = base.astype(work, copy=False)
        return np.add(weight, delta[index, start:stop], out=weight, dtype=work)


# ---- writing ----------------------------------------------------------------

def header_bytes(shard: Shard) -> bytes:
    """The safetensors header of ``shard``: the bytes :func:`safetensors_io.serialize` would write."""
    header: dict[str, Any] = {}
    if shard.metadata:
        header["__metadata__"] = dict(sorted(shard.metadata.items()))
    offset = 0
    for tensor in shard.tensors:
        header[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def write_shard(shard: Shard, path: Path, updates: _Updates, bar: Any = None) -> None:
    """Write one output shard: header first, then each tensor in key order."""
    with open(shard.source, "rb") as src, open(path, "wb", buffering=0) as out:
        _write_all(out, header_bytes(shard))
        for tensor in shard.tensors:
            write_tensor(src, out, tensor, updates)
            if bar is not None:
                bar.update(tensor.nbytes)


def write_tensor(src: BinaryIO, out: Any, tensor: OutTensor, updates: _Updates) -> None:
    """Write ``tensor``'s bytes at ``out``'s position: copied, cast in chunks, or merged."""
    info = tensor.source
    if tensor.module is not None:
        assert tensor.target is not None
        merged = updates.apply(tensor.module, tensor.target, _read_array(src, info), tensor.how, tensor.part)
        _write_array(out, _cast(merged, tensor.dtype))
    elif tensor.dtype == info.dtype:
        _copy_range(src, out, info.start, info.nbytes)
    else:
        in_dtype = safetensors_io.DTYPES[info.dtype]
        step = max(1, CHUNK_BYTES // in_dtype.itemsize)
        count = info.nbytes // in_dtype.itemsize
        for first in range(0, count, step):
            n = min(step, count - first)
            chunk = _read_flat(src, info.start + first * in_dtype.itemsize, n, in_dtype)
            _write_array(out, _cast(chunk, tensor.dtype))


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """Round to the output dtype (round-to-nearest-even, like torch)."""
    return array.astype(safetensors_io.DTYPES[dtype], copy=False)


def _read_flat(src: BinaryIO, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    array = np.empty(count, dtype=dtype)
    view = memoryview(array.view(np.uint8))
    src.seek(offset)
    filled = 0
    while filled < len(view):
        n = src.readinto(view[filled:])
        if not n:
            raise AdapterkitError("base shard ended inside tensor data", file=getattr(src, "name", None),
                                  code="truncated")
        filled += n
    return array


def _read_array(src: BinaryIO, info: safetensors_io.TensorInfo) -> np.ndarray:
    dtype = safetensors_io.DTYPES[info.dtype]
    return _read_flat(src, info.start, info.nbytes // dtype.itemsize, dtype).reshape(info.shape)


def _write_all(out: Any, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = out.write(view)
        view = view[n:]


def _write_array(out: Any, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    _write_all(out, memoryview(array.reshape(-1).view(np.uint8)))


def _copy_range(src: BinaryIO, out: Any, start: int, length: int) -> None:
    """Copy ``length`` bytes at ``start`` of ``src`` to ``out``: in the kernel where possible."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), out.fileno(), length - done, start + done)
                if n == 0:
                    break
                done += n
        except OSError:  # not supported across these files systems: copy through user space
            pass
    while done < length:
        n = min(CHUNK_BYTES, length - done)
        src.seek(start + done)
        block = src.read(n)
        if len(block) != n:
            raise AdapterkitError("base shard ended inside tensor data", file=getattr(src, "name", None),
                                  code="truncated")
        _write_all(out, block)
        done += n


# ---- side files, config, index ----------------------------------------------

def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _copy_side_files(base_dir: Path, out: Path, plan: MergePlan) -> None:
    """Copy every non-weight file and folder of the base; rewrite config.json if it changes."""
    for entry in sorted(base_dir.iterdir()):
        name = entry.name
        if name.startswith(".") or name in NOT_COPIED or _is_weight_file(name):
            continue
        if name == "config.json" and plan.config_updates:
            config = read_json(entry)
            _update_config(config, plan.config_updates)
            (out / name).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
        elif entry.is_dir():
            shutil.copytree(entry, out / name, ignore=_ignore_weights)
        elif entry.is_file():
            shutil.copyfile(entry, out / name)


def _ignore_weights(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n.startswith(".") or _is_weight_file(n)}


def _update_config(config: dict[str, Any], updates: Mapping[str, Any]) -> None:
    """Apply dtype / tying changes where transformers reads them (top level and text_config)."""
    nested = [c for c in (config.get("text_config"),) if isinstance(c, dict)]
    if "dtype" in updates:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = updates["dtype"]
        for sub in nested:
            for key in ("dtype", "torch_dtype"):
                if key in sub:
                    sub[key] = updates["dtype"]
    if "tie_word_embeddings" in updates:
        config["tie_word_embeddings"] = updates["tie_word_embeddings"]
        for sub in nested:
            if "tie_word_embeddings" in sub:
                sub["tie_word_embeddings"] = updates["tie_word_embeddings"]


def _write_index(source: Path, dest: Path, plan: MergePlan) -> None:
    data = read_json(source)
    if not isinstance(data, dict):
        raise BaseModelError("index must be a JSON object", file=str(source), code="base_invalid")
    metadata = dict(data.get("metadata") or {})
    metadata["total_size"] = plan.nbytes
    if plan.added_parameters and isinstance(metadata.get("total_parameters"), int):
        metadata["total_parameters"] += plan.added_parameters
    weight_map = {t.key: shard.name for shard in plan.shards for t in shard.tensors}
    data = {**data, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    dest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


# ---- threads and progress ---------------------------------------------------------

@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread, when threadpoolctl is installed.

    An adapter's updates are products with a small inner dimension (the rank):
    threads gain nothing there, and on a busy machine OpenBLAS's spinning
    threads make them many times slower (2.2 s instead of 0.13 s for the 210
    updates of a rank-16 SmolLM2 adapter on a loaded 2-core machine).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---- progress -----------------------------------------------------------------

@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm bar over bytes on stderr, or None (off, not a terminal, or tqdm missing)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", file=sys.stderr,
              leave=False) as bar:
        yield bar
