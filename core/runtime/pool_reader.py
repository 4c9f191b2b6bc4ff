"""Reading adapters for the pool: an adapterkit folder by a fast, integrity-checked path; any other format by its reader.

:func:`read_adapter` is what :meth:`AdapterPool.load <adapterkit.core.runtime.pool.AdapterPool.load>`
reads a path with; :func:`read_native_fast` is the fast path alone (docs/runtime.md, "Loading from disk fast").
Imports torch (the factors become torch views).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.manifest import MANIFEST_NAME
from adapterkit.core.format.safetensors_io import non_finite_count
from adapterkit.core.plugin.registry import Registry


def read_adapter(source: str | Path, format: str | None = None, registry: Registry | None = None) -> Adapter:
    """Read an adapter for the pool: an adapterkit folder by the fast path, any other format by its reader.

    The fast path (:func:`read_native_fast`) reads each tensor file once, checks its byte
    size and sha256 against the manifest and its safetensors header strictly, and skips the
    JSON Schema pass: the pool checks method, config, every target and every tensor against
    the live model itself. A folder it does not take (another format version, a wrong
    checksum, anything unexpected) goes through the full reader, :func:`adapterkit.load`,
    whose message says what is wrong.
    """
    adapter, verified = open_adapter(source, format, registry)
    if verified is not None and not verified():
        return load_full(Path(source), registry)
    return adapter


def read_native_fast(folder: Path) -> Adapter | None:
    """An adapterkit folder of the current format version, integrity-checked; None to defer to the full reader."""
    opened = _open_native(Path(folder))
    if opened is None:
        return None
    adapter, verified = opened
    return adapter if verified() else None


def open_adapter(source: str | Path, format: str | None,
                  registry: Registry | None) -> tuple[Adapter, Callable[[], bool] | None]:
    """The adapter, and for the fast path a function that waits for the checksums (hashed in a thread)."""
    path = Path(source)
    if format in (None, "adapterkit") and (path / MANIFEST_NAME).is_file():
        opened = _open_native(path)
        if opened is not None:
            return opened
        return load_full(path, registry), None
    from adapterkit.core.store.adapters import load

    return load(path, format, registry=registry), None


def load_full(path: Path, registry: Registry | None) -> Adapter:
    from adapterkit.core.store.adapters import load

    return load(path, "adapterkit", registry=registry)  # no detection: every detector would look at the folder


def _open_native(folder: Path) -> tuple[Adapter, Callable[[], bool]] | None:
    """Read an adapterkit folder's files once; a thread checks their sha256 and finite values meanwhile."""
    import hashlib
    import math
    import threading

    from adapterkit.core.errors import AdapterkitError
    from adapterkit.core.format import manifest as manifest_mod, safetensors_io
    from adapterkit.core.format.manifest import Manifest
    from adapterkit.core.io import read_json, safe_child

    file = str(folder / MANIFEST_NAME)
    try:
        data = read_json(folder / MANIFEST_NAME)
        current = (manifest_mod.CURRENT_MAJOR, manifest_mod.CURRENT_MINOR)
        version = manifest_mod.parse_version(data.get("format_version"))
        if data.get("format") != manifest_mod.FORMAT or version != current:
            return None
        manifest = Manifest.from_dict(data)
        if not manifest.tensors or not isinstance(manifest.config, dict):
            return None
        tensors: dict[str, np.ndarray] = {}
        buffers: list[tuple[bytearray, str]] = []
        regions: list[np.ndarray] = []  # what the finiteness check reads
        for name, entry in manifest.tensors.items():
            path = safe_child(folder, name, file, manifest_mod.json_path(["tensors", name]))
            header = safetensors_io.read_header(path)  # strict: offsets, no holes, no overlaps
            if header.file_size != entry["size"] or not isinstance(entry["sha256"], str):
                return None
            buffer = bytearray(header.file_size)
            with open(path, "rb") as handle:
                if handle.readinto(buffer) != len(buffer) or handle.read(1):
                    return None
            buffers.append((buffer, entry["sha256"]))
            for key, info in header.tensors.items():
                if key in tensors:
                    return None
                dtype = safetensors_io.DTYPES[info.dtype]
                tensors[key] = np.frombuffer(buffer, dtype=dtype, count=math.prod(info.shape),
                                             offset=info.start).reshape(info.shape)
            dtypes = {info.dtype for info in header.tensors.values()}
            if len(dtypes) == 1:  # no holes (read_header checked): the data area is one array
                dtype = safetensors_io.DTYPES[dtypes.pop()]
                regions.append(np.frombuffer(buffer, dtype=dtype, offset=header.data_start))
            else:
                regions.extend(tensors[key] for key in header.tensors)
    except (AdapterkitError, KeyError, TypeError, ValueError, AttributeError, OSError):
        return None
    matches: list[bool] = []

    def check() -> None:  # hashlib and numpy release the GIL on large buffers: the pool's checks run meanwhile
        matches.extend(hashlib.sha256(buffer).hexdigest() == digest for buffer, digest in buffers)
        matches.append(all(non_finite_count(array) == 0 for array in regions))

    worker = threading.Thread(target=check, daemon=True)
    worker.start()

    def verified() -> bool:
        worker.join()
        return len(matches) == len(buffers) + 1 and all(matches)

    return Adapter(manifest, tensors, source=folder, source_format="adapterkit"), verified


def non_finite(array: Any) -> bool:
    """Whether a tensor holds a NaN or an infinity (numpy's check: far cheaper than torch's on small tensors)."""
    if isinstance(array, torch.Tensor):
        return not bool(torch.isfinite(array).all())
    return non_finite_count(array) > 0


def as_torch(array: Any) -> torch.Tensor:
    """A torch view of a writable numpy array (a copy otherwise, bfloat16 included)."""
    if isinstance(array, torch.Tensor):
        return array.detach()
    if array.flags.writeable and array.dtype.kind == "f" and array.dtype.isnative:
        return torch.from_numpy(array)
    from adapterkit.core.format.torch_bridge import to_torch

    return to_torch(array)
