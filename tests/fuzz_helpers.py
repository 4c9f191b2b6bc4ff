"""Shared machinery of the reliability tests: valid samples, structure-aware mutators, the case guard, the report.

- :func:`build_samples` writes one small VALID adapter per reader (and variant) into a folder,
  plus a tiny torch-free Llama base (config.json + zero weights) the readers that need one get.
- The mutators turn a valid file into a hostile one. Hypothesis strategies (:func:`mutation`) draw
  a list of operations, targeted at the file's structure: a safetensors header (length, JSON,
  dtypes, shapes, offsets, metadata), a JSON config (type changes, deep nesting, huge numbers,
  NaN), a GGUF header (counts, string and array lengths, dims, types, offsets), a torch zip
  (central directory sizes and offsets, the pickle's opcodes), a FlatBuffer (offsets and
  vector lengths), or plain bytes (flips, truncation, insertion, deletion).
- :func:`guarded` runs one case under a CPU-time limit, a wall-clock backstop and an address-space
  ceiling just above what the process already uses, so a reader that loops, blocks, or allocates
  from a size the file claims fails the case instead of quietly eating time or memory.
- :class:`Recorder` counts cases, outcomes and times per reader; :func:`write_report` merges a
  section into the JSON file named by ``ADAPTERKIT_RELIABILITY_REPORT``.

Everything here is importable without torch; torch is imported only to write the pickle samples.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pickletools
import resource
import shutil
import signal
import struct
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from adapterkit.core.format import safetensors_io
from adapterkit.core.errors import AdapterkitError
from adapterkit.core.io import atomic_write_bytes, canonical_json

REPORT_ENV = "ADAPTERKIT_RELIABILITY_REPORT"
FUZZ_ENV = "ADAPTERKIT_FUZZ"
CASE_SECONDS = 2.0  # CPU time a case may take
WALL_SECONDS = 20.0  # wall-clock backstop, for a read that blocks without using CPU
MEMORY_MARGIN = 256 * 1024 * 1024  # what one case may add to the address space (the samples are a few KiB)
#: words in an AdapterkitError that mean the reader tried to allocate from a claimed size and failed
ALLOCATION_WORDS = ("can't allocate", "cannot allocate", "not enough memory", "out of memory", "memoryerror",
                    "bad_alloc", "std::bad_alloc")


# ---- a torch-free tiny Llama base ---------------------------------------------------------

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def base_weights(layers: int = 2, hidden: int = 32, kv: int = 16, inter: int = 64, vocab: int = 128,
                 dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Zero weights with the names and shapes of a Llama checkpoint."""
    w = {"model.embed_tokens.weight": np.zeros((vocab, hidden), dtype), "lm_head.weight": np.zeros((vocab, hidden), dtype),
         "model.norm.weight": np.zeros(hidden, dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({
            p + "self_attn.q_proj.weight": np.zeros((hidden, hidden), dtype),
            p + "self_attn.k_proj.weight": np.zeros((kv, hidden), dtype),
            p + "self_attn.v_proj.weight": np.zeros((kv, hidden), dtype),
            p + "self_attn.o_proj.weight": np.zeros((hidden, hidden), dtype),
            p + "mlp.gate_proj.weight": np.zeros((inter, hidden), dtype),
            p + "mlp.up_proj.weight": np.zeros((inter, hidden), dtype),
            p + "mlp.down_proj.weight": np.zeros((hidden, inter), dtype),
            p + "input_layernorm.weight": np.zeros(hidden, dtype),
            p + "post_attention_layernorm.weight": np.zeros(hidden, dtype),
        })
    return w


def build_base(folder: Path) -> Path:
    """A tiny Llama base folder (config.json + model.safetensors of zeros), built without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(canonical_json(BASE_CONFIG))
    safetensors_io.save(folder / "model.safetensors", base_weights())
    return folder


# ---- valid samples ------------------------------------------------------------------------

@dataclass
class Sample:
    """One valid adapter of one reader: where it is, which files the mutators may touch, how to read it."""

    reader: str  # the format name
    variant: str
    path: Path  # what the reader is given (a folder or a file)
    files: dict[str, str]  # relative path -> kind (safetensors, json, gguf, torchzip, flatbuffer)
    options: dict[str, Any] = field(default_factory=dict)
    originals: dict[str, bytes] = field(default_factory=dict)
    folder: Path = field(init=False)  # fixed once: a case may turn ``path`` into a symlink

    def __post_init__(self) -> None:
        self.folder = self.path if self.path.is_dir() else self.path.parent

    def __repr__(self) -> str:
        return f"Sample({self.reader}/{self.variant})"

    def snapshot(self) -> None:
        self.originals = {rel: (self.folder / rel).read_bytes() for rel in self.files}

    def restore(self) -> None:
        """Put the valid files back (and remove whatever a case added to the folder)."""
        for entry in os.scandir(self.folder):
            if entry.name not in self.originals:
                remove(Path(entry.path))
        for rel, data in self.originals.items():
            target = self.folder / rel
            try:
                if target.stat(follow_symlinks=False).st_size == len(data) and not target.is_symlink() \
                        and target.is_file() and target.read_bytes() == data:
                    continue
            except OSError:
                pass
            put(target, data)


def remove(path: Path) -> None:
    """Remove a file, a symlink, a FIFO or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def put(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path``. Unlinking first matters: on ext4, truncating a file that has
    data and writing it again waits for the old blocks (auto_da_alloc), ~5 ms a file instead of ~0.1 ms."""
    remove(path)
    with open(path, "xb") as handle:
        handle.write(data)


def _lora_adapter(targets: dict[str, dict[str, Any]] | None = None, dtype: str = "float32", seed: int = 0) -> Any:
    from helpers import llama_targets, make_lora_adapter

    return make_lora_adapter(targets or llama_targets(r=2, alpha=4), dtype=dtype, seed=seed)


def registry() -> Any:
    """The installed plugins (every reader under test is a built-in entry point)."""
    from adapterkit.core.plugin.registry import default_registry

    reg = default_registry()
    assert "onnx-adapter" in reg.formats, "the onnx-adapter entry point is missing: reinstall adapterkit"
    return reg


def build_samples(root: Path) -> tuple[dict[str, Sample], Path]:
    """Write every valid sample under ``root``; returns them by ``reader/variant`` and the base folder."""
    import adapterkit

    reg = registry()
    base = build_base(root / "base")
    samples: dict[str, Sample] = {}

    def add(sample: Sample) -> None:
        sample.snapshot()
        samples[f"{sample.reader}/{sample.variant}"] = sample

    adapter = _lora_adapter()
    # adapterkit (native)
    folder = adapterkit.save(adapter, root / "native", registry=reg)
    add(Sample("adapterkit", "lora", folder, {"adapter.json": "manifest", "adapter.safetensors": "safetensors"}))
    # peft: safetensors, .bin, prompt tuning
    folder = adapterkit.save(adapter, root / "peft", "peft", registry=reg)
    add(Sample("peft", "lora", folder, {"adapter_config.json": "json", "adapter_model.safetensors": "safetensors"}))
    folder = root / "peft_bin"
    shutil.copytree(root / "peft", folder)
    (folder / "adapter_model.safetensors").unlink()
    _torch_save(safetensors_io.load(root / "peft" / "adapter_model.safetensors")[0], folder / "adapter_model.bin")
    add(Sample("peft", "lora-bin", folder, {"adapter_config.json": "json", "adapter_model.bin": "torchzip"}))
    folder = _peft_prompt(root / "peft_prompt")
    add(Sample("peft", "prompt", folder, {"adapter_config.json": "json", "adapter_model.safetensors": "safetensors"},
               options={"base": str(base)}))
    # kohya (one file)
    folder = adapterkit.save(adapter, root / "kohya", "kohya", registry=reg)
    add(Sample("kohya", "lora", folder / "lora.safetensors", {"lora.safetensors": "safetensors"}))
    # mlx
    folder = adapterkit.save(adapter, root / "mlx", "mlx", registry=reg, base=str(base))
    add(Sample("mlx", "lora", folder, {"adapter_config.json": "json", "adapters.safetensors": "safetensors"}))
    # gguf: read with and without the base (with q_proj adapted, no base needs the adapterkit KV)
    folder = adapterkit.save(adapter, root / "gguf", "gguf", registry=reg, base=str(base))
    add(Sample("gguf", "lora", folder / "adapter.gguf", {"adapter.gguf": "gguf"}, options={"base": str(base)}))
    # torchtune (.pt, a torch zip)
    folder = adapterkit.save(adapter, root / "torchtune", "torchtune", registry=reg, base=str(base))
    add(Sample("torchtune", "lora", folder, {"adapter_config.json": "json", "adapter_model.pt": "torchzip"},
               options={"base": str(base)}))
    # adapterhub: lora .bin, bottleneck safetensors
    folder = adapterkit.save(adapter, root / "adapterhub", "adapterhub", registry=reg, base=str(base))
    add(Sample("adapterhub", "lora-bin", folder, {"adapter_config.json": "json", "pytorch_adapter.bin": "torchzip"}))
    folder = _adapterhub_bottleneck(root / "adapterhub_bn")
    add(Sample("adapterhub", "bottleneck", folder, {"adapter_config.json": "json", "adapter.safetensors": "safetensors"}))
    # onnx-adapter
    folder = adapterkit.save(adapter, root / "onnx", "onnx-adapter", registry=reg)
    add(Sample("onnx-adapter", "lora", folder, {"adapter.onnx_adapter": "flatbuffer"}))
    return samples, base


def _torch_save(tensors: dict[str, np.ndarray], path: Path) -> None:
    import torch

    from adapterkit.core.format.torch_bridge import to_torch

    torch.save({k: to_torch(v) for k, v in tensors.items()}, str(path))


def _peft_prompt(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 32,
              "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
              "prompt_tuning_init": "RANDOM", "base_model_name_or_path": "tiny-llama", "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    embeddings = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    safetensors_io.save(folder / "adapter_model.safetensors", {"prompt_embeddings": embeddings}, {"format": "pt"})
    return folder


def _adapterhub_bottleneck(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "init_weights": "bert",
              "inv_adapter": None, "is_parallel": False, "leave_out": [], "ln_after": False, "ln_before": False,
              "mh_adapter": False, "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True,
              "output_adapter": True, "phm_layer": False, "reduction_factor": 16, "residual_before_ln": True,
              "scaling": 1.0, "stochastic_depth": 0.0, "use_gating": False}
    full = {"config": config, "hidden_size": 32, "model_class": "LlamaForCausalLM", "model_name": "", "model_type": "llama",
            "name": "a", "version": "adapters.1.3.0"}
    (folder / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in (0, 1):
        prefix = f"model.layers.{i}.output_adapters.adapters.a."
        tensors[prefix + "adapter_down.0.weight"] = rng.standard_normal((2, 32)).astype(np.float32)
        tensors[prefix + "adapter_down.0.bias"] = rng.standard_normal(2).astype(np.float32)
        tensors[prefix + "adapter_up.weight"] = rng.standard_normal((32, 2)).astype(np.float32)
        tensors[prefix + "adapter_up.bias"] = rng.standard_normal(32).astype(np.float32)
    safetensors_io.save(folder / "adapter.safetensors", tensors)
    return folder


# ---- interesting values ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def interesting_ints(size: int | None = None) -> st.SearchStrategy[int]:
    """Integers that break size arithmetic: 0, +-1, around the file size, powers of two, the extremes."""
    special = [0, 1, 2, 3, 7, 8, 255, 256, 4095, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48,
               2**62, 2**63 - 1]
    if size is not None:
        special += [max(size - 1, 0), size, size + 1, size * 2, max(size - 8, 0)]
    return st.one_of(st.sampled_from(special), st.integers(0, 2**64 - 1), st.integers(0, 4096))


@functools.lru_cache(maxsize=None)
def signed_interesting() -> st.SearchStrategy[int]:
    return st.one_of(interesting_ints(), st.sampled_from((-1, -2, -(2**31), -(2**63))))


DEEP = "\x00DEEP\x00"  # placeholder replaced by a deeply nested JSON array after serialisation


@functools.lru_cache(maxsize=None)
def json_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """JSON values of every type, with the numbers and strings that trouble readers."""
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(-(2**70), 2**70), st.sampled_from((0, -1, 1, 2**31, 2**63, 10**30, -(10**30))),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from((float("nan"), float("inf"), -0.0, 1e308)),
        st.text(max_size=12), st.sampled_from(("../x", "/etc/passwd", "..", ".", "", "a/../../b", "\\x", "\u0000",
                                               "\ud800" * 0 + "\udcff" * 0 + "é", "x" * 300, DEEP)),
    )
    if depth <= 0:
        return scalars
    inner = json_values(depth - 1)
    return st.one_of(scalars, st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


def _dumps(value: Any, deep: int) -> str:
    text = json.dumps(value, allow_nan=True, ensure_ascii=False)
    return text.replace(json.dumps(DEEP, ensure_ascii=False), "[" * deep + "]" * deep)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _set_path(root: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    node = root
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return root


# ---- mutators (each returns new bytes and a short description) ---------------------------

@st.composite
def byte_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Blind byte mutations: flips, sets, truncation, insertion, deletion, duplication, int overwrites."""
    out = bytearray(data)
    done = []
    for _ in range(draw(st.integers(1, 4))):
        n = len(out)
        op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "dup", "u32", "u64")))
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            out[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del out[draw(st.integers(0, n)):]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos:pos + draw(st.integers(1, 16))]
        elif op == "dup":
            out[pos:pos] = out[pos:pos + draw(st.integers(1, 64))]
        elif op in ("u32", "u64") and n:
            width = 4 if op == "u32" else 8
            value = draw(interesting_ints(len(out))) % (2 ** (8 * width))
            out[pos:pos + width] = value.to_bytes(width, "little")
        done.append(f"{op}@{pos}")
    return bytes(out), "bytes:" + ",".join(done)


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, data area) of a safetensors file; the header is a fresh copy the caller may edit."""
    parsed = _split_safetensors(data)
    return None if parsed is None else (json.loads(parsed[0]), parsed[1])


@functools.lru_cache(maxsize=64)
def _split_safetensors(data: bytes) -> tuple[bytes, bytes] | None:
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    try:
        json.loads(data[8:8 + length])
    except ValueError:
        return None
    return data[8:8 + length], data[8 + length:]


@st.composite
def safetensors_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Mutations of a safetensors file aimed at its structure: header length, JSON, entries, data area."""
    parsed = split_safetensors(data)
    assert parsed is not None, "the sample must be a valid safetensors file"
    header, body = parsed
    keys = sorted(k for k in header if k != "__metadata__")
    op = draw(st.sampled_from(("length", "not_object", "deep", "dtype", "shape", "offsets", "swap_offsets",
                               "entry_type", "metadata", "dup_key", "bad_utf8", "extra_entry", "drop_entry",
                               "rename", "body", "nan_body", "huge_dims")))
    desc = f"safetensors:{op}"
    raw_header: bytes | None = None
    if op == "length":
        encoded = json.dumps(header).encode()
        length = draw(interesting_ints(len(encoded) + len(body)))
        return struct.pack("<Q", length % 2**64) + encoded + body, f"{desc}={length}"
    if op == "not_object":
        raw_header = _dumps(draw(st.one_of(st.lists(json_values(1), max_size=3), json_values(0))), 0).encode()
    elif op == "deep":
        depth = draw(st.sampled_from((100, 1000, 5000, 100_000)))
        raw_header = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        desc += f"={depth}"
    elif op in ("dtype", "shape", "offsets", "entry_type", "huge_dims") and keys:
        key = draw(st.sampled_from(keys))
        entry = header[key]
        if op == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(safetensors_io.DTYPES) + ["F4", "f32", "", "C64"]),
                                            json_values(0)))
        elif op == "shape":
            entry["shape"] = draw(st.one_of(
                st.lists(signed_interesting(), max_size=5), json_values(1),
                st.lists(st.sampled_from((1.5, True, None, "2", float("nan"))), min_size=1, max_size=3)))
        elif op == "huge_dims":
            # dims whose product matches the byte count modulo 2**64, or is huge outright
            big = draw(st.sampled_from((2**32, 2**40, 2**62, 2**63, 2**64)))
            entry["shape"] = draw(st.sampled_from(([big, big], [big, 0], [0, big], [big], [big, 2, 2])))
        elif op == "offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(signed_interesting(), max_size=3), json_values(1)))
        else:
            header[key] = draw(json_values(1))
        desc += f"[{key}]"
    elif op == "swap_offsets" and len(keys) >= 2:
        a, b = draw(st.permutations(keys))[:2]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        if draw(st.booleans()):  # make them overlap instead
            header[a]["data_offsets"] = list(header[b]["data_offsets"])
    elif op == "metadata":
        header["__metadata__"] = draw(st.one_of(json_values(1), st.dictionaries(st.text(max_size=5), json_values(0))))
    elif op == "dup_key" and keys:
        key = draw(st.sampled_from(keys))
        encoded = json.dumps(header)[:-1] + ", " + json.dumps(key) + ": " + json.dumps(header[key]) + "}"
        raw_header = encoded.encode()
    elif op == "bad_utf8" and keys:
        key = draw(st.sampled_from(keys))
        encoded = json.dumps(header, ensure_ascii=False).encode()
        pos = encoded.index(json.dumps(key).encode()) + 1
        raw_header = encoded[:pos] + draw(st.sampled_from((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80"))) + encoded[pos:]
    elif op == "extra_entry":
        header[draw(st.text(min_size=1, max_size=20))] = draw(st.fixed_dictionaries({
            "dtype": st.sampled_from(sorted(safetensors_io.DTYPES)),
            "shape": st.lists(st.integers(0, 2**40), max_size=3),
            "data_offsets": st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2)}))
    elif op == "drop_entry" and keys:
        del header[draw(st.sampled_from(keys))]
    elif op == "rename" and keys:
        key = draw(st.sampled_from(keys))
        new = draw(st.one_of(st.text(max_size=30), st.sampled_from(("", ".", "..", "../x", "a..b", "base_model.model."))))
        header[new] = header.pop(key)
    elif op == "body":
        body, sub = draw(byte_ops(body or b"\0"))
        desc += f"({sub})"
    elif op == "nan_body" and keys:
        key = draw(st.sampled_from(keys))
        start, _ = header[key]["data_offsets"]
        pattern = draw(st.sampled_from((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\x00\x7e", b"\x00\xfc")))
        body = body[:start] + pattern + body[start + len(pattern):]
    if raw_header is None:
        raw_header = _dumps(header, 0).encode("utf-8", "surrogatepass")
    raw_header += b" " * (-len(raw_header) % 8)
    return struct.pack("<Q", len(raw_header)) + raw_header + body, desc


@st.composite
def json_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Mutations of a JSON document: type changes, deletions, additions, deep nesting, huge numbers, NaN, text."""
    document = json.loads(data)
    op = draw(st.sampled_from(("replace", "replace", "replace", "delete", "add", "deep", "huge", "nan", "root",
                               "text", "dup", "rename_key")))
    paths = list(_paths(document))
    deep = draw(st.sampled_from((50, 1000, 100_000)))
    desc = f"json:{op}"
    if op == "text":
        mutated, sub = draw(byte_ops(data))
        return mutated, f"{desc}({sub})"
    if op == "dup" and isinstance(document, dict) and document:
        key = draw(st.sampled_from(sorted(document)))
        text = json.dumps(document)[:-1] + ", " + json.dumps(key) + ": " + json.dumps(draw(json_values(0)), allow_nan=True) + "}"
        return text.encode(), desc + f"[{key}]"
    if op == "rename_key":  # object keys are file references in a manifest's "tensors": make them escape
        holders = [p for p in paths if isinstance(_get(document, p), dict) and _get(document, p)]
        if holders:
            holder = _get(document, draw(st.sampled_from(holders)))
            key = draw(st.sampled_from(sorted(holder)))
            holder[draw(st.sampled_from(ESCAPING_NAMES))] = holder.pop(key)
            desc += f"[{key}]"
        return _dumps(document, deep).encode("utf-8", "surrogatepass"), desc
    if op == "root":
        document = draw(json_values(1))
    else:
        path = draw(st.sampled_from(paths))
        desc += f"{list(path)}"
        if op == "replace":
            document = _set_path(document, path, draw(json_values(2)))
        elif op == "delete" and path:
            document = _set_path(document, path, None, delete=True)
        elif op == "add":
            holder = path if isinstance(_get(document, path), dict) else ()
            if isinstance(_get(document, holder), dict):
                _get(document, holder)[draw(st.text(max_size=10))] = draw(json_values(1))
        elif op == "deep":
            document = _set_path(document, path, DEEP)
        elif op == "huge":
            number = draw(st.sampled_from(("1e999", "-1e999", "1" * 5000, "9" * 400, "123456789012345678901234567890")))
            text = _dumps(_set_path(document, path, DEEP), 0).replace("[]", number, 1) if path else number
            return text.encode(), desc
        elif op == "nan":
            document = _set_path(document, path, draw(st.sampled_from((float("nan"), float("inf"), float("-inf")))))
    return _dumps(document, deep).encode("utf-8", "surrogatepass"), desc


#: file references that must never resolve outside an adapter folder
ESCAPING_NAMES = ("../adapter.safetensors", "../../etc/passwd", "/etc/passwd", "/dev/zero", "sub/../../x.safetensors",
                  "./adapter.safetensors", "adapter.safetensors/..", "..\\adapter.safetensors", "", ".", "..",
                  "C:/adapter.safetensors", "a//b.safetensors", "adapter.safetensors\u0000.txt")


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


def gguf_int_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, label) of every count, length, type, dimension and offset in a GGUF header."""
    fields: list[tuple[int, int, str]] = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(label: str) -> None:
        nonlocal pos
        fields.append((pos, 8, label + ".len"))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    def value(kind: int, label: str) -> None:
        nonlocal pos
        if kind == 8:
            string(label)
        elif kind == 9:
            fields.append((pos, 4, label + ".array_type"))
            fields.append((pos + 4, 8, label + ".array_len"))
            (sub,) = struct.unpack_from("<I", data, pos)
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            for i in range(count):
                value(sub, f"{label}[{i}]")
        else:
            pos += sizes[kind]

    for i in range(n_kv):
        string(f"kv{i}.key")
        fields.append((pos, 4, f"kv{i}.type"))
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        value(kind, f"kv{i}")
    for i in range(n_tensors):
        string(f"tensor{i}.name")
        fields.append((pos, 4, f"tensor{i}.n_dims"))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for d in range(n_dims):
            fields.append((pos, 8, f"tensor{i}.dim{d}"))
            pos += 8
        fields.append((pos, 4, f"tensor{i}.type"))
        fields.append((pos + 4, 8, f"tensor{i}.offset"))
        pos += 12
    return fields


@st.composite
def gguf_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Overwrite GGUF header integers (counts, lengths, dims, types, offsets) with interesting values."""
    fields = gguf_int_fields(data)
    out = bytearray(data)
    labels = []
    for _ in range(draw(st.integers(1, 3))):
        offset, width, label = draw(st.sampled_from(fields))
        if label.endswith("type"):
            value = draw(st.one_of(st.integers(0, 40), interesting_ints()))
        else:
            value = draw(interesting_ints(len(data)))
        out[offset:offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        labels.append(f"{label}={value}")
    if draw(st.booleans()):
        truncate = draw(st.integers(0, len(out)))
        del out[truncate:]
        labels.append(f"truncate@{truncate}")
    return bytes(out), "gguf:" + ",".join(labels)


@st.composite
def gguf_kv_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Replace the adapterkit JSON KV of a GGUF with a mutated document (the file stays well-formed)."""
    from gguf import GGUFReader

    reader = GGUFReader_bytes(data, GGUFReader)
    meta_key = "adapterkit.lora"
    field_ = reader.fields[meta_key]
    old = bytes(field_.parts[-1])
    new, desc = draw(json_ops(old))
    new += b" " * ((len(old) - len(new)) % 32)  # JSON allows trailing spaces: the data section stays aligned
    start = field_.offset + 8 + len(meta_key) + 4  # key length, key, value type -> the value's length prefix
    (old_len,) = struct.unpack_from("<Q", data, start)
    assert old_len == len(old)
    return data[:start] + struct.pack("<Q", len(new)) + new + data[start + 8 + old_len:], "gguf-kv:" + desc


def GGUFReader_bytes(data: bytes, reader_cls: Any) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as handle:
        handle.write(data)
        handle.flush()
        reader = reader_cls(handle.name)
        reader.data = np.array(reader.data)  # detach from the temporary file
        return reader


def zip_int_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, label) of the sizes, offsets and counts in a zip's local, central and end records."""
    fields = []
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) != -1:
        fields += [(pos + 14, 4, "local.crc"), (pos + 18, 4, "local.comp_size"), (pos + 22, 4, "local.size"),
                   (pos + 26, 2, "local.name_len"), (pos + 28, 2, "local.extra_len"), (pos + 8, 2, "local.method")]
        pos += 4
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        fields += [(pos + 20, 4, "central.comp_size"), (pos + 24, 4, "central.size"), (pos + 28, 2, "central.name_len"),
                   (pos + 30, 2, "central.extra_len"), (pos + 42, 4, "central.local_offset"), (pos + 10, 2, "central.method")]
        pos += 4
    pos = data.rfind(b"PK\x05\x06")
    if pos != -1:
        fields += [(pos + 8, 2, "end.entries_disk"), (pos + 10, 2, "end.entries"), (pos + 12, 4, "end.cd_size"),
                   (pos + 16, 4, "end.cd_offset")]
    for sig, label in ((b"PK\x06\x06", "zip64end"), (b"PK\x06\x07", "zip64locator")):
        pos = data.rfind(sig)
        if pos != -1:
            fields += [(pos + 24, 8, f"{label}.a"), (pos + 32, 8, f"{label}.b"), (pos + 40, 8, f"{label}.c"),
                       (pos + 48, 8, f"{label}.d"), (pos + 8, 8, f"{label}.e")]
    return fields


@st.composite
def torchzip_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Mutations of a torch.save zip: its records' sizes and offsets, or the pickle inside (opcodes, args)."""
    op = draw(st.sampled_from(("zip_field", "pickle", "pickle", "record", "legacy")))
    if op == "zip_field":
        out = bytearray(data)
        offset, width, label = draw(st.sampled_from(zip_int_fields(data)))
        value = draw(interesting_ints(len(data))) % 2 ** (8 * width)
        out[offset:offset + width] = value.to_bytes(width, "little")
        return bytes(out), f"zip:{label}={value}"
    entries = _zip_entries(data)
    if op == "legacy":  # the pickle alone, as a legacy (pre-1.6) torch file would start
        name = next(n for n in entries if n.endswith("data.pkl"))
        mutated, desc = draw(pickle_ops(entries[name]))
        return mutated, "legacy-pickle:" + desc
    if op == "record":
        names = sorted(n for n in entries if "/data/" in n or n.endswith(("version", "byteorder")))
        name = draw(st.sampled_from(names))
        entries[name], desc = draw(byte_ops(entries[name] or b"\0"))
        return _zip_rebuild(entries), f"record[{name}]:{desc}"
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name], desc = draw(pickle_ops(entries[name]))
    return _zip_rebuild(entries), "pickle:" + desc


def _zip_entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _zip_rebuild(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


#: globals a hostile pickle names instead of torch's rebuild functions
HOSTILE_GLOBALS = [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"),
                   ("posix", "system"), ("builtins", "getattr"), ("torch", "load"), ("numpy", "frombuffer"),
                   ("collections", "OrderedDict"), ("torch._utils", "_rebuild_parameter")]


@st.composite
def pickle_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Opcode-aware mutations of a pickle: change an argument (sizes, names, globals), drop or repeat an opcode."""
    ops = list(pickletools.genops(data))
    index = draw(st.integers(0, len(ops) - 1))
    opcode, arg, pos = ops[index]
    end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
    kind = draw(st.sampled_from(("arg", "arg", "drop", "repeat", "bytes", "global")))
    desc = f"{kind}@{opcode.name}"
    if kind == "global":
        module, name = draw(st.sampled_from(HOSTILE_GLOBALS))
        insert = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        gpos = next((p for o, _, p in ops if o.name in ("GLOBAL", "STACK_GLOBAL")), pos)
        gop = next(((o, a, p) for o, a, p in ops if p == gpos), None)
        gend = next((p for o, _, p in ops if p > gpos), len(data))
        if gop is not None and gop[0].name == "GLOBAL":
            return data[:gpos] + insert + data[gend:], desc + f"={module}.{name}"
        return data[:pos] + insert + data[pos:], desc + f"={module}.{name}"
    if kind == "drop":
        return data[:pos] + data[end:], desc
    if kind == "repeat":
        return data[:end] + data[pos:end] + data[end:], desc
    if kind == "bytes":
        chunk, sub = draw(byte_ops(data[pos:end]))
        return data[:pos] + chunk + data[end:], desc + f"({sub})"
    # replace the argument, keeping the opcode's encoding when we can
    if isinstance(arg, int) and opcode.name in ("BININT", "BININT1", "BININT2", "LONG1"):
        value = draw(signed_interesting())
        encoded = b"\x8a" + _long1(value)  # LONG1 encodes any int
        return data[:pos] + encoded + data[end:], desc + f"={value}"
    if isinstance(arg, str) and opcode.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"):
        text = draw(st.one_of(st.text(max_size=20), st.sampled_from(("../../etc/passwd", "os", "system", "", "x" * 300))))
        raw = text.encode("utf-8", "surrogatepass")
        return data[:pos] + b"X" + struct.pack("<I", len(raw)) + raw + data[end:], desc + f"={text!r}"
    chunk, sub = draw(byte_ops(data[pos:end]))
    return data[:pos] + chunk + data[end:], desc + f"({sub})"


def _long1(value: int) -> bytes:
    if value == 0:
        return b"\x00"
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return bytes([len(raw)]) + raw


@st.composite
def flatbuffer_ops(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Overwrite aligned 32-bit words (offsets, vtable entries, vector lengths, dims) with interesting values."""
    out = bytearray(data)
    labels = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("u32", "u32", "u16", "i64")))
        width = {"u32": 4, "u16": 2, "i64": 8}[kind]
        slot = draw(st.integers(0, max(len(out) // width - 1, 0)))
        value = draw(signed_interesting() if kind == "i64" else interesting_ints(len(out)))
        out[slot * width:slot * width + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        labels.append(f"{kind}@{slot * width}={value}")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(out)))
        del out[cut:]
        labels.append(f"truncate@{cut}")
    return bytes(out), "flatbuffer:" + ",".join(labels)


STRUCTURED = {"safetensors": safetensors_ops, "json": json_ops, "manifest": json_ops, "gguf": gguf_ops,
              "torchzip": torchzip_ops, "flatbuffer": flatbuffer_ops}


# ---- the filesystem: symlinks, references out of the folder ------------------------------

@st.composite
def filesystem_ops(draw: Any, sample: Sample, outside: Path) -> str:
    """Replace one of the sample's files with a symlink (out of the folder, dangling, a loop, a folder)
    or a non-regular file; returns a description. ``outside`` is a folder beside the sample."""
    rel = draw(st.sampled_from(sorted(sample.files)))
    target = sample.folder / rel
    kind = draw(st.sampled_from(("outside", "dangling", "loop", "dir", "dev_null", "fifo", "empty", "sibling")))
    target.unlink()
    if kind == "outside":
        copy = outside / f"copy-{rel}"
        put(copy, sample.originals[rel])
        target.symlink_to(copy)
    elif kind == "dangling":
        target.symlink_to(outside / "does-not-exist")
    elif kind == "loop":
        target.symlink_to(target.name)
    elif kind == "dir":
        target.mkdir()
    elif kind == "dev_null":
        target.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "sibling":
        others = [r for r in sample.files if r != rel]
        target.symlink_to(others[0] if others else "..")
    return f"fs:{kind}[{rel}]"


# ---- running one case ----------------------------------------------------------------------

class CaseTimeout(BaseException):
    """A case ran past its time limit (a hang or a runaway loop)."""


def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def guarded(seconds: float = CASE_SECONDS, margin: int = MEMORY_MARGIN, wall: float = WALL_SECONDS) -> Iterator[None]:
    """Run the body under a CPU-time limit (SIGPROF after ``seconds`` of CPU: a runaway loop), a wall-clock
    limit (SIGALRM after ``wall`` seconds: a read that blocks, e.g. on a FIFO) and an RLIMIT_AS ``margin``
    bytes above the current address space. CPU time, not wall time, is the 2 s budget, so that a busy
    CI machine does not fail a case that only waited for a core."""

    def limit(signum: int, frame: Any) -> None:
        what = f"{seconds} s of CPU" if signum == signal.SIGPROF else f"{wall} s of wall-clock time"
        raise CaseTimeout(f"case ran past {what}")

    old_handlers = signal.signal(signal.SIGALRM, limit), signal.signal(signal.SIGPROF, limit)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = _address_space() + margin
    if old_limit[1] != resource.RLIM_INFINITY:
        ceiling = min(ceiling, old_limit[1])
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, old_limit[1]))
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, wall)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, old_handlers[0])
        signal.signal(signal.SIGPROF, old_handlers[1])


@dataclass
class Outcome:
    result: Any  # the Adapter, or None
    error: BaseException | None
    seconds: float  # wall clock
    cpu_seconds: float = 0.0

    @property
    def label(self) -> str:
        if self.error is None:
            return "ok"
        code = getattr(self.error, "code", None)
        return f"{type(self.error).__name__}" + (f"[{code}]" if code else "")


def run_case(fn: Callable[[], Any], seconds: float = CASE_SECONDS, margin: int = MEMORY_MARGIN) -> Outcome:
    """Call ``fn`` guarded; an AdapterkitError is an outcome, any other exception propagates (a bug)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with guarded(seconds, margin):
            result = fn()
    except AdapterkitError as exc:
        text = str(exc).lower()
        if any(word in text for word in ALLOCATION_WORDS):
            raise AssertionError(f"the reader tried to allocate from a size the file claims: {exc}") from exc
        return Outcome(None, exc, time.perf_counter() - start, time.process_time() - cpu)
    return Outcome(result, None, time.perf_counter() - start, time.process_time() - cpu)


# ---- the report ----------------------------------------------------------------------------

@dataclass
class ReaderStats:
    cases: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0
    max_cpu_seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    strategies: Counter = field(default_factory=Counter)

    def add(self, strategy: str, outcome: Outcome) -> None:
        self.cases += 1
        self.seconds += outcome.seconds
        self.max_seconds = max(self.max_seconds, outcome.seconds)
        self.max_cpu_seconds = max(self.max_cpu_seconds, outcome.cpu_seconds)
        self.outcomes[outcome.label] += 1
        self.strategies[strategy] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "max_case_ms": round(self.max_seconds * 1000, 2),
            "max_case_cpu_ms": round(self.max_cpu_seconds * 1000, 2),
            "mean_case_ms": round(self.seconds / self.cases * 1000, 3) if self.cases else None,
            "reader_seconds": round(self.seconds, 2),
            "outcomes": dict(sorted(self.outcomes.items())), "strategies": dict(sorted(self.strategies.items())),
        }


class Recorder:
    """Per-reader statistics of one test session."""

    def __init__(self) -> None:
        self.readers: dict[str, ReaderStats] = {}
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.cpu_seconds: float | None = None

    def add(self, reader: str, strategy: str, outcome: Outcome) -> None:
        self.readers.setdefault(reader, ReaderStats()).add(strategy, outcome)

    def to_dict(self, profile: str) -> dict[str, Any]:
        readers = {name: stats.to_dict() for name, stats in sorted(self.readers.items())}
        return {
            "profile": profile, "readers": readers,
            "total_cases": sum(s.cases for s in self.readers.values()),
            "wall_seconds": round(time.perf_counter() - self.started, 1),
            "cpu_seconds": round(self.cpu_seconds if self.cpu_seconds is not None
                                 else time.process_time() - self.cpu_started, 1),
            "load_average": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "max_case_ms": max((r["max_case_ms"] for r in readers.values()), default=None),
            "max_case_cpu_ms": max((r["max_case_cpu_ms"] for r in readers.values()), default=None),
            "exception_types": sorted({label.split("[")[0] for s in self.readers.values() for label in s.outcomes}),
        }


def write_report(section: str, data: Any, path: str | None = None) -> Path | None:
    """Merge ``{section: data}`` into the JSON report file (``ADAPTERKIT_RELIABILITY_REPORT``), if one is asked for."""
    path = path or os.environ.get(REPORT_ENV)
    if not path:
        return None
    target = Path(path)
    try:
        current = json.loads(target.read_text("utf-8")) if target.is_file() else {}
    except ValueError:
        current = {}
    current[section] = data
    atomic_write_bytes(target, (json.dumps(current, indent=2, sort_keys=True) + "\n").encode())
    return target


# Hypothesis profiles of the reliability tests (selected by ADAPTERKIT_FUZZ; each test sets max_examples from
# total_examples() split over its strategies). deadline=None: time is measured per case instead (run_case).
# CI is derandomized: every run of a commit draws the same inputs, so its result never changes between runs;
# the random search is the nightly profile (`make fuzz`), and each of its finds becomes a fixed test here.
settings.register_profile("adapterkit-fuzz-ci", deadline=None, database=None, print_blob=True, derandomize=True,
                          suppress_health_check=list(HealthCheck), max_examples=2_000)
settings.register_profile("adapterkit-fuzz-nightly", deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck), max_examples=50_000)


def fuzz_profile_name() -> str:
    """The hypothesis profile of this run: random inputs nightly, derandomized (fixed) otherwise."""
    return "adapterkit-fuzz-nightly" if fuzz_profile() == "nightly" else "adapterkit-fuzz-ci"


def fuzz_settings(max_examples: int) -> settings:
    """The profile of this run (``ADAPTERKIT_FUZZ``) with ``max_examples`` for one test."""
    return settings(settings.get_profile(fuzz_profile_name()), max_examples=max_examples)


def fuzz_banner() -> str:
    """One line for the test log: which profile ran and whether its inputs are fixed."""
    profile = fuzz_profile()
    fixed = settings.get_profile(fuzz_profile_name()).derandomize
    how = ("derandomized: every run of this commit draws the same inputs" if fixed
           else "random search: a find prints its @reproduce_failure blob (docs/reliability.md)")
    return f"adapterkit fuzz profile: {profile} ({total_examples(profile)} cases per reader; {how})"


def fuzz_profile() -> str:
    """``ci`` (default), ``nightly``, or a number of cases per reader (``ADAPTERKIT_FUZZ=300`` for a quick look)."""
    value = os.environ.get(FUZZ_ENV, "").strip().lower()
    return value if value == "nightly" or value.isdigit() else "ci"


def total_examples(profile: str | None = None) -> int:
    """Generated cases per reader: at least 2,000 in CI, 50,000 nightly."""
    profile = profile or fuzz_profile()
    if profile.isdigit():
        return int(profile)
    return 50_000 if profile == "nightly" else 2_000


def examples_per_strategy(n_strategies: int, profile: str | None = None) -> int:
    return math.ceil(total_examples(profile) / n_strategies)


# ---- explicit huge claims (a deterministic list, run under a tight memory ceiling) -------------

HUGE = 2**40


def huge_claims(kind: str, data: bytes) -> list[tuple[bytes, str]]:
    """Copies of a valid file of ``kind`` in which one size claims far more than the file holds."""
    out: list[tuple[bytes, str]] = []
    if kind == "safetensors":
        header, body = split_safetensors(data)  # type: ignore[misc]
        key = next(k for k in sorted(header) if k != "__metadata__")
        for shape in ([HUGE, HUGE], [2**32, 2**32, 16], [2**62], [HUGE, 0]):
            edited = json.loads(json.dumps(header))
            edited[key]["shape"] = shape
            raw = json.dumps(edited).encode()
            out.append((struct.pack("<Q", len(raw)) + raw + body, f"shape {shape}"))
        edited = json.loads(json.dumps(header))
        edited[key]["data_offsets"] = [0, 2**62]
        raw = json.dumps(edited).encode()
        out.append((struct.pack("<Q", len(raw)) + raw + body, "data_offsets [0, 2**62]"))
        out.append((struct.pack("<Q", 2**63) + data[8:], "header length 2**63"))
    elif kind in ("json", "manifest"):
        document = json.loads(data)
        for path in _paths(document):
            value = _get(document, path)
            if isinstance(value, int) and not isinstance(value, bool) and path:
                edited = _set_path(json.loads(data), path, 2**62)
                out.append((json.dumps(edited).encode(), f"{list(path)} = 2**62"))
    elif kind == "gguf":
        for offset, width, label in gguf_int_fields(data):
            if label.endswith(("count", ".len", "array_len")) or ".dim" in label or label.endswith(".offset"):
                value = min(2 ** (8 * width) - 1, 2**62)
                out.append((data[:offset] + value.to_bytes(width, "little") + data[offset + width:], f"{label} = {value}"))
    elif kind == "torchzip":
        entries = _zip_entries(data)
        name = next(n for n in entries if n.endswith("data.pkl"))
        pickled = entries[name]
        for opcode, arg, pos in pickletools.genops(pickled):
            if opcode.name in ("BININT1", "BININT2", "BININT") and isinstance(arg, int) and arg >= 2:
                end = pos + 1 + {"BININT1": 1, "BININT2": 2, "BININT": 4}[opcode.name]
                copy = dict(entries)
                copy[name] = pickled[:pos] + b"\x8a" + _long1(HUGE) + pickled[end:]
                out.append((_zip_rebuild(copy), f"pickle int {arg} @{pos} = 2**40"))
        for offset, width, label in zip_int_fields(data):
            if "size" in label:
                out.append((data[:offset] + b"\xff" * width + data[offset + width:], f"zip {label} = max"))
    elif kind == "flatbuffer":
        for slot in range(0, len(data) - 8, 8):
            (value,) = struct.unpack_from("<q", data, slot)
            if value in (2, 16, 32):  # the sample's dims (and a few other words: harmless to try)
                out.append((data[:slot] + struct.pack("<q", HUGE) + data[slot + 8:], f"int64 @{slot} = 2**40"))
        for slot in range(0, len(data) - 4, 4):
            (value,) = struct.unpack_from("<I", data, slot)
            if value in (256, 128):  # raw_data lengths
                out.append((data[:slot] + struct.pack("<I", 2**31 - 1) + data[slot + 4:], f"u32 @{slot} = 2**31-1"))
    return out
