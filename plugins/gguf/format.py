"""Format plugin ``gguf``: llama.cpp LoRA adapters (``general.type = adapter``), read and written.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes and
``llama_adapter_lora_init`` (``src/llama-adapter.cpp``) loads:

- KVs ``general.architecture`` (the base's llama.cpp arch), ``general.type =
  "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (FLOAT32, one
  for the whole file; llama.cpp's scale is ``alpha / rank`` per tensor with
  ``rank = b->ne[0]``, and no factor when alpha is 0).
- Tensors ``<gguf base name>.lora_a`` (torch [r, in], ne [in, r]) and ``.lora_b``
  (torch [out, r], ne [r, out]), in the adapter's dtype (F32 / F16 / BF16). For
  Llama the rows of q/k ``lora_b`` are permuted (:mod:`gguf_names`).

One global alpha cannot express per-module alphas or rsLoRA: the writer picks
the alpha most modules need and folds every other module's scale exactly into
its B. The JSON KV ``adapterkit.lora`` (llama.cpp keeps unknown KVs as plain
metadata) records the fold factors, the permutation and the manifest, so a
round trip gives back the same manifest and bitwise the same tensors; when a
fold is not bitwise reversible, the original B is kept in a string KV
``adapterkit.lora.b.<tensor>`` (base64). Files from other tools have no such KV
and read with llama.cpp's semantics: module alpha = global alpha (r when 0).

GPT-2 (Conv1D): A and B are written unchanged (llama.cpp's graph computes
``B @ (A @ x)`` against the transposed Conv1D weight); upstream
``convert_lora_to_gguf.py`` transposes the LoRA pair there, which swaps A and B.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from adapterkit import check_tensor_dims, require_consistent
from adapterkit.core.format.adapter import Adapter, canonical_key
from adapterkit.core.format.base_model import BaseModelInfo, read_base_model, targets_fingerprint
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError, UsageError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.format.manifest import CURRENT_MAJOR, Manifest
from . import names
from .layout import check_gguf

FILE_NAME = "adapter.gguf"
META_KEY = "adapterkit.lora"
ORIGINAL_PREFIX = "adapterkit.lora.b."
META_VERSION = 1
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_NUMPY = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype("<f8")}
_MANIFEST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_GGML_NAMES = {dtype: name for name, dtype in _NUMPY.items()}
_NEEDS_BASE = "GGUF needs --base: a local Hugging Face folder of the base model (config.json + safetensors headers)"


class GgufFormat(Format):
    name = "gguf"
    read_options = ("base",)
    write_options = ("base", "filename")
    file_suffix = ".gguf"
    description = "llama.cpp GGUF LoRA adapter (general.type = adapter), as convert_lora_to_gguf.py writes it"

    def detect(self, path: Path) -> bool:
        try:
            file = _find_file(Path(path))
            if file is None:
                return False
            with open(file, "rb") as handle:
                if handle.read(4) != b"GGUF":
                    return False
            from gguf import GGUFReader

            check_gguf(file)  # GGUFReader trusts the counts in the file: check them against its size first

            return _kvs(GGUFReader(file)).get("general.type") == "adapter"
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        base = self.options_for(options, "read").get("base")
        return require_consistent(read_gguf(Path(path), base=base), options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (required: local HF folder or BaseModelInfo), ``filename`` (default adapter.gguf)."""
        opts = self.options_for(options, "write")
        write_gguf(adapter, Path(path), base=opts.get("base"), filename=opts.get("filename") or FILE_NAME)

    def module_names(self, adapter: Adapter, **options: Any) -> dict[str, str]:
        """``blk.N.<tensor>`` of each module (llama.cpp's base tensor, without ``.weight``); needs ``base``."""
        base = self.options_for(options, "write").get("base")
        if base is None:
            return {}
        info = _base_info(base)
        arch, _ = _arch(info)
        name_map = names.NameMap(arch, names.block_count(info.config))
        found = {module: name_map.gguf_name(module) for module in adapter.manifest.targets}
        return {module: name.removesuffix(".weight") for module, name in found.items() if name}

    def checks(self, path: Path) -> list[str]:
        return [
            "that llama.cpp's base GGUF was converted from the same base model (llama.cpp checks only "
            "general.architecture and tensor shapes)",
            "llama.cpp applies adapter.lora.alpha / rank times the user's --lora-scaled factor",
        ]


def _find_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file())
        return found[0] if len(found) == 1 else None
    return None


def _base_info(base: Any) -> BaseModelInfo:
    return base if isinstance(base, BaseModelInfo) else read_base_model(base)


def _arch(info: BaseModelInfo) -> tuple[str, bool]:
    hf_arch = info.architecture
    if hf_arch not in names.ARCHES:
        raise FormatError(
            "the base model's architecture is not one this GGUF writer maps to llama.cpp", file=str(info.path / "config.json"),
            location="architectures[0]", expected=sorted(names.ARCHES), found=hf_arch,
            hint="convert to PEFT and use llama.cpp's convert_lora_to_gguf.py for other architectures", code="unsupported",
        )
    return names.ARCHES[hf_arch]


# ---- write ---------------------------------------------------------------------

def write_gguf(adapter: Adapter, folder: Path, base: Any = None, filename: str = FILE_NAME) -> Path:
    """Write ``adapter`` as ``folder/filename`` for llama.cpp; returns the file."""
    from gguf import GGMLQuantizationType, GGUFType, GGUFWriter, Keys

    if not (filename.endswith(".gguf") and Path(filename).name == filename and not filename.startswith(".")):
        raise UsageError("filename must be a plain *.gguf file name", found=filename, code="bad_option")
    manifest = adapter.manifest
    if manifest.method != "lora":
        raise LossyConversionError(f"llama.cpp GGUF adapters hold LoRA only, not {manifest.method!r}", location="$.method.name",
                                   expected="lora", found=manifest.method, code="unsupported")
    if base is None:
        raise FormatError(_NEEDS_BASE, file=str(folder), hint="pass --base BASE (save(..., base=BASE))", code="base_missing")
    if manifest.dtype not in _DTYPES:
        raise LossyConversionError("llama.cpp LoRA tensors are F32, F16 or BF16", location="$.dtype",
                                   expected=sorted(_DTYPES), found=manifest.dtype,
                                   hint="cast the adapter to float32 first (float64 -> float32 rounds)", code="unsupported")
    info = _base_info(base)
    arch, permuted = _arch(info)
    name_map = names.NameMap(arch, names.block_count(info.config))
    rslora = bool(manifest.config.get("use_rslora", False))
    plan = [_plan_module(module, target, adapter, info, arch, name_map, rslora)
            for module, target in sorted(manifest.targets.items())]
    seen: dict[str, str] = {}
    for item in plan:
        if item["gguf"] in seen:
            raise FormatError("two modules map to one llama.cpp tensor", location=item["module"],
                              expected="one module per GGUF tensor", found=[seen[item["gguf"]], item["module"]],
                              code="unsupported")
        seen[item["gguf"]] = item["module"]
    counts = Counter(item["alpha"] for item in plan)
    alpha = max(counts, key=lambda v: (counts[v], -v))  # most modules keep their B untouched
    alpha32 = float(np.float32(alpha))
    meta: dict[str, Any] = {"version": META_VERSION, "alpha": alpha, "modules": {}, "folds": {}, "permuted": {}}
    originals: dict[str, str] = {}
    tensors: list[tuple[str, np.ndarray]] = []
    for item in plan:
        module, gname, a, b = item["module"], item["gguf"], item["A"], item["B"]
        meta["modules"][module] = gname
        if item["alpha"] != alpha:
            factor = float(item["alpha"]) / alpha32
            b, exact = _fold(b, factor, module)
            meta["folds"][module] = factor
            if not exact:
                originals[ORIGINAL_PREFIX + gname] = base64.b64encode(np.ascontiguousarray(item["B"]).tobytes()).decode("ascii")
        heads = names.rope_heads(module, info.config) if permuted else None
        if heads:
            if b.shape[0] % (2 * heads):
                raise FormatError("q/k rows cannot be split into rotary head pairs", location=module,
                                  expected=f"a multiple of 2 * {heads}", found=b.shape[0], code="unsupported")
            b = names.permute_rows(b, heads)
            meta["permuted"][module] = heads
        tensors += [(f"{gname}.lora_a", a), (f"{gname}.lora_b", b)]
    stored = manifest.to_dict()
    stored.pop("tensors", None)
    meta["manifest"] = stored
    meta["digest"] = _digest((tname, _GGML_NAMES[array.dtype], array.shape, array) for tname, array in tensors)

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / filename
    writer = GGUFWriter(str(file), arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha32)
    writer.add_string(META_KEY, json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False))
    for key in sorted(originals):
        writer.add_string(key, originals[key])
    for tname, array in tensors:
        array = np.ascontiguousarray(array)
        if array.dtype == _NUMPY["BF16"]:
            writer.add_tensor(tname, array.view(np.uint8), raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(tname, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def _plan_module(module: str, target: Mapping[str, Any], adapter: Adapter, info: BaseModelInfo, arch: str,
                 name_map: names.NameMap, rslora: bool) -> dict[str, Any]:
    kind = target.get("kind")
    if kind != "linear" and not (kind == "conv1d" and arch in names.CONV1D_ARCHES):
        raise LossyConversionError(f"llama.cpp LoRA on a {kind!r} module of a {arch} model is not supported",
                                   location=f"$.targets[{module!r}].kind", expected="linear", found=kind, code="unsupported")
    shape = info.weight_shape(module)
    if shape is None:
        raise FormatError("adapted module has no weight in the base model", file=str(info.path), location=f"{module}.weight",
                          hint="is this the adapter's base? (a tied lm_head has no tensor of its own in llama.cpp)",
                          code="wrong_base")
    if list(shape) != list(target["shape"]):
        raise FormatError("base weight shape differs from the adapter's target", file=str(info.path), location=f"{module}.weight",
                          expected=list(target["shape"]), found=list(shape), code="wrong_base")
    gname = name_map.gguf_name(module)
    if gname is None:
        raise LossyConversionError(f"llama.cpp's {arch} model has no tensor for this module", location=module,
                                   hint="drop the module from the adapter, or merge the adapter into the base instead",
                                   code="unsupported")
    a = adapter.tensors.get(canonical_key(module, "lora", "A"))
    b = adapter.tensors.get(canonical_key(module, "lora", "B"))
    r = target.get("r")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
        raise TensorFileError("LoRA tensors missing or not [r, in] / [out, r]", location=canonical_key(module, "lora", "A"),
                              expected=f"A [{r}, in], B [out, {r}]",
                              found=None if a is None or b is None else f"A {list(a.shape)}, B {list(b.shape)}", code="shape")
    alpha = target["alpha"]
    effective = alpha * math.sqrt(r) if rslora else alpha  # llama.cpp scale alpha/r == alpha_rs/sqrt(r)
    return {"module": module, "gguf": gname, "A": a, "B": b, "alpha": effective}


def _fold(b: np.ndarray, factor: float, module: str) -> tuple[np.ndarray, bool]:
    """``factor * B`` in B's dtype, and whether dividing it back gives B bit for bit."""
    folded = (b.astype(np.float64) * factor).astype(b.dtype)
    if not np.isfinite(folded.astype(np.float32)).all():
        raise LossyConversionError("folding the module's scale into B overflows its dtype", location=module,
                                   found=f"factor {factor}", hint="cast the adapter to float32 first", code="overflow")
    back = (folded.astype(np.float64) / factor).astype(b.dtype)
    return folded, bool(np.array_equal(_bits(back), _bits(b)))


def _digest(items: Any) -> str:
    """sha256 over (name, GGML type, torch-order shape, bytes) of every tensor: ties the adapterkit KV to them."""
    digest = hashlib.sha256()
    for name, type_name, shape, array in sorted(items, key=lambda item: item[0]):
        digest.update(f"{name}\0{type_name}\0{list(shape)}\0".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


# ---- read ----------------------------------------------------------------------

def read_gguf(path: Path, base: Any = None) -> Adapter:
    """Read a llama.cpp GGUF LoRA into the canonical layout."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover
        raise FormatError("reading GGUF needs the gguf package", file=str(path), hint="pip install gguf",
                          code="missing_dependency") from None
    file = _find_file(path)
    if file is None:
        raise FormatError("no single .gguf file here", file=str(path), hint="point at the .gguf file", code="missing_file")
    check_gguf(file)  # GGUFReader trusts the counts in the file: check them against its size first
    try:
        reader = GGUFReader(file)
    except Exception as exc:
        raise FormatError(f"not a readable GGUF file: {exc}", file=str(file), code="bad_file") from None
    kvs = _kvs(reader)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
        if kvs.get(key) != want:
            raise FormatError("not a llama.cpp LoRA adapter", file=str(file), location=key, expected=want, found=kvs.get(key),
                              code="unsupported")
    if reader.endianess.name != "LITTLE":
        raise FormatError("big-endian GGUF files are not supported", file=str(file), code="unsupported")
    arch = kvs.get("general.architecture")
    warnings: list[str] = []
    pairs, dtype = _pairs(reader, str(file), warnings)
    digest = _digest((str(t.name), t.tensor_type.name, [int(d) for d in reversed(t.shape)], np.asarray(t.data))
                     for t in reader.tensors)
    meta = _meta(kvs, pairs, dtype, digest, warnings)
    info = _base_info(base) if base is not None else None
    if meta is not None:
        modules = {gname: module for module, gname in meta["modules"].items()}
        heads = {module: int(h) for module, h in meta["permuted"].items()}
    else:
        modules = _resolve(pairs, arch, info, str(file))
        heads = _heads(modules.values(), arch, info, str(file))
    tensors: dict[str, np.ndarray] = {}
    for gname, (a, b) in sorted(pairs.items()):
        module = modules[gname]
        if module in heads:
            if b.shape[0] % (2 * heads[module]):
                raise FormatError("q/k lora_b rows cannot be split into the base's rotary head pairs", file=str(file),
                                  location=gname, expected=f"a multiple of 2 * {heads[module]}", found=b.shape[0],
                                  hint="is this the adapter's base?", code="wrong_base")
            b = names.unpermute_rows(b, heads[module])
        if meta is not None and module in meta["folds"]:
            b = _unfold(b, float(meta["folds"][module]), kvs.get(ORIGINAL_PREFIX + gname), str(file), gname)
        tensors[canonical_key(module, "lora", "A")] = a
        tensors[canonical_key(module, "lora", "B")] = b
    if meta is not None:
        manifest = Manifest.from_dict(meta["manifest"])
    else:
        manifest = _manifest(pairs, modules, arch, kvs, dtype, info, str(file))
    return Adapter(manifest, tensors, source=file, source_format="gguf", warnings=warnings)


def _kvs(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _pairs(reader: Any, file: str, warnings: list[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """GGUF base name -> (A [r, in], B [out, r]) as numpy arrays, and their common dtype name."""
    from gguf import GGMLQuantizationType, dequantize

    halves: dict[str, dict[str, np.ndarray]] = {}
    types: set[str] = set()
    for tensor in reader.tensors:
        name = str(tensor.name)
        if name.endswith("_norm.weight"):
            raise LossyConversionError("norm vectors (mergekit-extract-lora) have no place in a LoRA adapter and would be lost",
                                       file=file, location=name, hint="llama.cpp ignores them too; remove them with gguf-py",
                                       code="unsupported")
        stem, dot, which = name.rpartition(".")
        if not dot or which not in ("lora_a", "lora_b"):
            raise FormatError("tensor name does not end in .lora_a or .lora_b", file=file, location=name, code="unknown_key")
        if stem.endswith("token_embd.weight"):
            raise LossyConversionError("LoRA on token embeddings is not supported", file=file, location=name, code="unsupported")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype.name in _NUMPY:
            data = np.array(tensor.data)
            array = data.view(_NUMPY["BF16"]) if qtype.name == "BF16" else data.astype(_NUMPY[qtype.name])
            types.add(qtype.name)
        else:
            try:
                array = dequantize(np.array(tensor.data), qtype).astype(np.float32)
            except (NotImplementedError, ValueError) as exc:  # gguf-py cannot dequantize every type
                raise FormatError(f"{qtype.name} tensors cannot be read: {exc}", file=file, location=name,
                                  hint="store LoRA tensors as F32, F16 or BF16", code="unsupported") from None
            types.add("F32")
            warnings.append(f"{name}: {qtype.name} tensor dequantized to float32")
        if array.ndim != 2:
            raise TensorFileError("LoRA tensor is not 2-d", file=file, location=name, found=list(array.shape), code="shape")
        check_tensor_dims({name: array}, file)
        halves.setdefault(stem, {})[which] = np.ascontiguousarray(array)
    if not halves:
        raise TensorFileError("holds no LoRA tensors", file=file, code="empty")
    dtype = types.pop() if len(types) == 1 else "F32"
    if types:
        warnings.append("tensors of mixed dtypes were promoted to float32")
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for stem, half in halves.items():
        if set(half) != {"lora_a", "lora_b"}:
            raise TensorFileError("LoRA tensor pair is missing one half", file=file, location=stem,
                                  expected=[f"{stem}.lora_a", f"{stem}.lora_b"], found=sorted(half), code="unpaired")
        a, b = (half[k].astype(_NUMPY[dtype]) if half[k].dtype != _NUMPY[dtype] else half[k] for k in ("lora_a", "lora_b"))
        if a.shape[0] != b.shape[1]:
            raise TensorFileError("lora_a and lora_b ranks differ", file=file, location=stem,
                                  expected="lora_a [r, in], lora_b [out, r]", found=f"{list(a.shape)}, {list(b.shape)}",
                                  hint="lora_a may not be transposed (an adapter from llama.cpp's old finetune)", code="shape")
        pairs[stem] = (a, b)
    return pairs, dtype


def _meta(kvs: Mapping[str, Any], pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], dtype: str, digest: str,
          warnings: list[str]) -> dict[str, Any] | None:
    """The adapterkit KV, if present and still describing these tensors; else None (with a warning).

    The digest ties the KV to the tensors, but every other field of it can be edited without touching
    them: each is checked (types, finite non-zero folds, head counts that divide the rows, a manifest the
    schemas accept) before it is trusted.
    """
    text = kvs.get(META_KEY)
    if text is None:
        return None
    try:
        meta = json.loads(text) if isinstance(text, str) else None
        ok = isinstance(meta, dict) and _meta_ok(meta, kvs, pairs, dtype, digest)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        ok = False
    if ok:
        return meta
    warnings.append(f"{META_KEY}: the adapterkit metadata no longer matches the tensors (changed after writing?); "
                    "ignored, the file reads with llama.cpp's global alpha")
    return None


def _meta_ok(meta: dict[str, Any], kvs: Mapping[str, Any], pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
             dtype: str, digest: str) -> bool:
    from adapterkit import manifest_errors

    manifest, modules, folds, permuted = meta["manifest"], meta["modules"], meta["folds"], meta["permuted"]
    if not all(isinstance(x, dict) for x in (manifest, modules, folds, permuted)):
        return False
    targets = manifest["targets"]
    if not (isinstance(targets, dict) and all(isinstance(t, dict) for t in targets.values())
            and all(isinstance(g, str) for g in modules.values())
            and all(_finite(f) and f != 0 for f in folds.values())
            and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in permuted.values())
            and _finite(meta["alpha"])):
        return False
    ok = (
        meta["version"] == META_VERSION
        and meta["digest"] == digest
        and manifest["method"]["name"] == "lora"
        and str(manifest.get("format_version", "")).split(".")[0] == str(CURRENT_MAJOR)
        and float(np.float32(meta["alpha"])) == float(np.float32(kvs.get("adapter.lora.alpha", 0.0)))
        and set(modules) == set(targets)
        and set(folds) <= set(targets) and set(permuted) <= set(targets)
        and sorted(modules.values()) == sorted(pairs)
        and _MANIFEST_DTYPES.get(dtype) == manifest["dtype"]
        and all(_fits(targets[m], *pairs[g]) for m, g in modules.items())
        and all(pairs[modules[m]][1].shape[0] % (2 * h) == 0 for m, h in permuted.items())
    )
    return ok and not manifest_errors(Manifest.from_dict(manifest))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(target: Mapping[str, Any], a: np.ndarray, b: np.ndarray) -> bool:
    d0, d1 = target["shape"]
    fan_in, fan_out = (d0, d1) if target.get("kind") == "conv1d" else (d1, d0)
    return a.shape == (target["r"], fan_in) and b.shape == (fan_out, target["r"])


def _unfold(b: np.ndarray, factor: float, original: Any, file: str, gname: str) -> np.ndarray:
    if original is None:
        return (b.astype(np.float64) / factor).astype(b.dtype)
    raw = base64.b64decode(original)
    if len(raw) != b.nbytes:
        raise TensorFileError("stored original B has the wrong size", file=file, location=ORIGINAL_PREFIX + gname,
                              expected=b.nbytes, found=len(raw), code="bad_file")
    return np.frombuffer(bytearray(raw), dtype=b.dtype).reshape(b.shape)


def _resolve(pairs: Mapping[str, Any], arch: Any, info: BaseModelInfo | None, file: str) -> dict[str, str]:
    """GGUF base name -> module path: through the base's weight names, else the arch's standard names."""
    if not isinstance(arch, str) or arch not in {a for a, _ in names.ARCHES.values()}:
        raise FormatError("llama.cpp architecture not supported by this reader", file=file, location="general.architecture",
                          expected=sorted({a for a, _ in names.ARCHES.values()}), found=arch, code="unsupported")
    if info is not None:
        expected = names.ARCHES.get(info.architecture or "", (arch, False))[0]
        if expected != arch:
            raise FormatError("the base model is not of the GGUF's architecture", file=str(info.path / "config.json"),
                              location="architectures[0]", expected=arch, found=info.architecture, code="wrong_base")
        n_blocks = names.block_count(info.config)
        candidates = [key[: -len(".weight")] for key in info.weights if key.endswith(".weight")]
    else:
        bids = [int(p) for stem in pairs for p in stem.split(".")[1:2] if p.isdigit()]
        n_blocks = max(bids, default=-1) + 1
        candidates = names.default_modules(arch, n_blocks)
    inverse = names.NameMap(arch, n_blocks).inverse(candidates)
    out = {}
    for gname in pairs:
        found = inverse.get(gname, [])
        if len(found) != 1:
            raise FormatError(
                "cannot tell which module this tensor adapts" if found else "no module of the base maps to this tensor",
                file=file, location=gname, expected="exactly one module", found=found or None,
                hint="pass --base with the adapter's base model" if info is None else "is this the adapter's base?",
                code="unknown_key",
            )
        out[gname] = found[0]
    return out


def _heads(modules: Any, arch: Any, info: BaseModelInfo | None, file: str) -> dict[str, int]:
    """Modules whose B rows llama.cpp permuted, with the head count to undo it."""
    if arch not in names.PERMUTED_ARCHES:
        return {}
    rotary = [m for m in modules if m.endswith(("q_proj", "k_proj"))]
    if rotary and info is None:
        raise FormatError(
            f"the q/k lora_b rows of a {arch} GGUF are permuted into llama.cpp's rotary order; undoing it needs "
            "n_head and n_kv_head from the base's config.json", file=file, location=rotary[0],
            hint="pass --base with the adapter's base model", code="base_missing",
        )
    out = {}
    for module in rotary:
        heads = names.rope_heads(module, info.config)  # type: ignore[union-attr]
        if not heads:
            raise FormatError("base config.json has no num_attention_heads", file=str(info.path), code="base_invalid")  # type: ignore[union-attr]
        out[module] = heads
    return out


def _manifest(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], modules: Mapping[str, str], arch: str,
              kvs: Mapping[str, Any], dtype: str, info: BaseModelInfo | None, file: str) -> Manifest:
    """A manifest with llama.cpp's semantics: every module's alpha is the global alpha (r when it is 0)."""
    alpha_kv = kvs.get("adapter.lora.alpha", 0.0) or 0.0
    if not _finite(alpha_kv) or alpha_kv < 0:
        raise FormatError("adapter.lora.alpha must be a finite number >= 0", file=file, location="adapter.lora.alpha",
                          found=alpha_kv, hint="llama.cpp scales by alpha / rank; fix the KV with gguf-py", code="bad_alpha")
    alpha_kv = float(alpha_kv)
    conv1d = arch in names.CONV1D_ARCHES
    targets: dict[str, dict[str, Any]] = {}
    for gname, (a, b) in pairs.items():
        module = modules[gname]
        r, fan_in, fan_out = a.shape[0], a.shape[1], b.shape[0]
        shape = [fan_in, fan_out] if conv1d else [fan_out, fan_in]
        if info is not None and (found := info.weight_shape(module)) is not None and list(found) != shape:
            raise FormatError("LoRA shapes do not fit the base weight", file=file, location=gname,
                              expected=list(found), found=shape, hint="is this the adapter's base?", code="wrong_base")
        alpha = alpha_kv if alpha_kv else r
        targets[module] = {"kind": "conv1d" if conv1d else "linear", "shape": shape, "r": int(r), "alpha": _number(alpha)}
    rs, alphas = Counter(t["r"] for t in targets.values()), Counter(t["alpha"] for t in targets.values())
    config: dict[str, Any] = {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
    r = max(rs, key=lambda v: (rs[v], -v))
    alpha = max(alphas, key=lambda v: (alphas[v], -v))
    if r != 8:
        config["r"] = r
    if alpha != 8:
        config["alpha"] = alpha
    base_model: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    if info is not None:
        base_model.update({k: v for k, v in (("model_type", info.model_type), ("architecture", info.architecture)) if v})
    source = {k: _jsonable(v) for k, v in sorted(kvs.items()) if not k.startswith("adapterkit.")}
    return Manifest(method="lora", config=config, targets=targets, dtype=_MANIFEST_DTYPES[dtype], base_model=base_model,
                    provenance={"converted_from": {"format": "gguf", "config": source}})


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

