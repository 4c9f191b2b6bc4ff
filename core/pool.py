"""Serving many LoRA adapters on one base model: load, hot-swap, unload, mixed batches.

::

    pool = adapterkit.AdapterPool(model, max_adapters=8, max_rank=16)
    pool.load("tenant-a", "path/to/adapter")     # a new name takes a free slot
    pool.load("tenant-a", "path/to/retrained")   # an existing name: hot-swap in place
    out = pool(input_ids=ids, attention_mask=mask, adapter_names=["tenant-a", None, ...])
    pool.unload("tenant-a")

The pool wraps each target module of ``model`` (in place) in a
:class:`~adapterkit.plugins.lora.pool_layer.PoolLayer` holding ``max_adapters``
stacked slots of rank ``max_rank``; docs/runtime.md explains the kernels.

**Targets are fixed when the pool is made**: from ``target_modules`` (LoRA's
rules: suffixes, a regex, ``"all-linear"``), else from the first adapter
loaded. An adapter that touches a module outside them is refused with the list
of those modules; the pool never re-injects (that would move storage and
invalidate a compiled graph). An adapter may adapt a subset of the targets (the
other modules' slots hold zeros) and any rank up to ``max_rank``.

Every adapter is checked completely (method, targets, shapes, ranks) before its
slot is touched, so a refused hot-swap leaves the old weights serving.

This module imports torch; ``import adapterkit`` does not import it (lazy name).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter import Adapter, split_key
from .errors import UsageError
from .manifest import MANIFEST_NAME
from .plugins import Registry, default_registry
from .safetensors_io import non_finite_count

KERNELS = ("auto", "segment", "gather")
#: "auto" runs the segment kernel when the rows form at most this many contiguous groups (2 ops per group,
#: rows without an adapter skipped), else the gather kernel (4 ops per layer whatever the mix)
AUTO_SEGMENTS = 2
BATCH_KEYS = ("input_ids", "inputs_embeds", "input_values", "pixel_values")


class AdapterPool:
    """One base model, up to ``max_adapters`` LoRA adapters served side by side.

    :param model: the base model; its target modules are wrapped in place
        (``pool.model is model``); :meth:`release` puts them back.
    :param max_adapters: slots (slot 0, "no adapter", comes on top).
    :param max_rank: the largest rank a slot holds; smaller ranks are zero-padded.
    :param target_modules: LoRA's ``target_modules`` (a list of suffixes, a regex,
        ``"all-linear"``); None: the modules of the first adapter loaded.
    :param kernel: ``"gather"`` (per-row gathered weights and ``bmm``), ``"segment"`` (rows
        grouped by adapter, two matmuls per group) or ``"auto"`` (segment for at most two
        contiguous groups, else gather); a batch on one adapter always takes two plain
        matmuls, and a compiled model always gathers.
    :param dtype: slot dtype (default: the base weights' floating dtype).
    """

    def __init__(self, model: torch.nn.Module, max_adapters: int = 8, max_rank: int = 16, *,
                 target_modules: str | Sequence[str] | None = None, kernel: str = "auto",
                 dtype: torch.dtype | None = None, registry: Registry | None = None):
        from adapterkit.plugins.lora.pool_layer import Routing, pool_layers

        for value, label in ((max_adapters, "max_adapters"), (max_rank, "max_rank")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{label} must be an integer >= 1", found=value, code="bad_option")
        if pool_layers(model):
            raise UsageError("the model already holds an adapter pool", hint="use that pool, or release() it first",
                             code="pool_exists")
        self.model = model
        self.max_adapters, self.max_rank, self.dtype = max_adapters, max_rank, dtype
        self.registry = registry
        self.routing = Routing()
        self.kernel = kernel
        self._slots: dict[str, int] = {}  # adapter name -> slot (1..max_adapters)
        self._layers: dict[str, Any] = {}  # module path -> PoolLayer
        self._compiled: Any = None
        self._active: str | None = None
        if target_modules is not None:
            self._inject(self._select(target_modules))

    # ---- introspection --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The loaded adapters, in slot order."""
        return sorted(self._slots, key=self._slots.__getitem__)

    @property
    def targets(self) -> list[str]:
        """The module paths the pool serves (fixed once set)."""
        return list(self._layers)

    @property
    def kernel(self) -> str:
        """The kernel of mixed batches: ``auto``, ``segment`` or ``gather`` (settable)."""
        return self.routing.kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise UsageError("unknown kernel", expected=list(KERNELS), found=value, code="bad_option")
        self.routing.kernel = value

    @property
    def active(self) -> str | None:
        """The adapter of rows that name none (see :meth:`activate`)."""
        return self._active

    def slot(self, name: str) -> int:
        """The slot of adapter ``name`` (1..max_adapters)."""
        try:
            return self._slots[name]
        except KeyError:
            raise UsageError(f"no adapter named {name!r} in the pool", expected=self.names or "a loaded adapter",
                             found=name, hint="load it first: pool.load(name, path)", code="unknown_adapter") from None

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def summary(self) -> dict[str, Any]:
        """Slots, names, targets and the bytes the slots take (JSON-ready)."""
        nbytes = sum(layer.lora_A_slots.nbytes + layer.lora_B_slots.nbytes for layer in self._layers.values())
        return {"adapters": dict(self._slots), "active": self._active, "max_adapters": self.max_adapters,
                "max_rank": self.max_rank, "modules": len(self._layers), "kernel": self.routing.kernel,
                "slot_bytes": int(nbytes)}

    def __repr__(self) -> str:
        return (f"AdapterPool({len(self)}/{self.max_adapters} adapters, max_rank={self.max_rank}, "
                f"{len(self._layers)} modules, kernel={self.routing.kernel!r})")

    # ---- life cycle -------------------------------------------------------------
    def load(self, name: str, source: str | Path | Adapter, *, format: str | None = None) -> int:
        """Load ``source`` (a path in any known format, or an :class:`Adapter`) as ``name``; return its slot.

        When ``name`` is loaded already its slot is overwritten in place (hot-swap): no
        re-injection, no new tensors, so a compiled model keeps its graph.
        """
        if not isinstance(name, str) or not name:
            raise UsageError("an adapter name must be a non-empty string", found=name, code="bad_name")
        if name not in self._slots and len(self._slots) >= self.max_adapters:
            raise UsageError(f"the pool is full ({self.max_adapters} adapters)", found=name,
                             hint="unload one first, or make the pool with a larger max_adapters", code="pool_full")
        if isinstance(source, Adapter):
            adapter, verified = source, None
        else:
            adapter, verified = _open_adapter(source, format, self.registry)
        injected_here = not self._layers
        if injected_here:
            self._inject(list(adapter.targets))
        try:
            # every check happens here, before any slot is touched (the fast path's thread checks finiteness)
            plan = self._plan(adapter, name, finite_checked=verified is not None)
            if verified is not None and not verified():  # a checksum failed: the full reader says why
                adapter = _load_full(Path(source), self.registry)  # type: ignore[arg-type]
                plan = self._plan(adapter, name)
        except BaseException:
            if injected_here:  # a refused first adapter does not fix the targets
                self.release()
            raise
        slot = self._slots.get(name) or min(set(range(1, self.max_adapters + 1)) - set(self._slots.values()))
        with torch.no_grad():
            for path, layer in self._layers.items():
                a, b, scale = plan.get(path, (None, None, 0.0))
                layer.set_slot(slot, a, b, scale)
        self._slots[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Remove adapter ``name``; its slot is zeroed and freed."""
        slot = self.slot(name)
        with torch.no_grad():
            for layer in self._layers.values():
                layer.set_slot(slot, None, None, 0.0)
        del self._slots[name]
        if self._active == name:
            self.deactivate()

    def activate(self, name: str | None) -> None:
        """Serve ``name`` to rows that name no adapter, and to direct calls of ``pool.model`` (e.g. ``generate``)."""
        slot = 0 if name is None else self.slot(name)
        self._active, self.routing.default = name, slot

    def deactivate(self) -> None:
        """Rows that name no adapter get the base model again."""
        self.activate(None)

    def compile(self, **options: Any) -> AdapterPool:
        """Call the model through ``torch.compile(model, **options)`` from now on; returns the pool.

        Compiled, every layer uses the gather kernel (static shapes): hot-swap, load, unload
        and a new mix of adapters in the batch never recompile; a new batch shape may.
        """
        self._compiled = torch.compile(self.model, **options)
        return self

    def release(self) -> torch.nn.Module:
        """Put the base modules back and return the model; the pool is empty after (its targets unset)."""
        from adapterkit.plugins.lora.pool_layer import replace_module

        for path, layer in self._layers.items():
            if path:
                replace_module(self.model, path, layer.base_layer)
            else:
                self.model = layer.base_layer
        self._layers, self._slots, self._compiled = {}, {}, None
        self.deactivate()
        return self.model

    # ---- forward ----------------------------------------------------------------
    def __call__(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Run the model; row ``i`` uses adapter ``adapter_names[i]`` (None: the active one, or none)."""
        batch = _batch_size(args, kwargs)
        if adapter_names is None and batch is not None:
            adapter_names = [None] * batch
        forward = self.model if self._compiled is None else self._compiled
        with self.routed(adapter_names, batch):
            return forward(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with row ``i`` on adapter ``adapter_names[i]`` (no beam search: one row per name)."""
        batch = _batch_size(args, kwargs)
        if adapter_names is None and batch is not None:
            adapter_names = [None] * batch
        with self.routed(adapter_names, batch):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def routed(self, adapter_names: Sequence[str | None] | None, batch: int | None = None) -> Iterator[None]:
        """Inside this block every call of ``pool.model`` routes row ``i`` to ``adapter_names[i]``."""
        routing = self.routing
        if routing.index is not None:
            raise UsageError("the pool is already running a routed call", hint="the pool is not re-entrant",
                             code="pool_busy")
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                raise UsageError("adapter_names must be a list with one name (or None) per row", found=adapter_names,
                                 code="bad_adapter_names")
            if batch is not None and len(adapter_names) != batch:
                raise UsageError("adapter_names must have one entry per row of the batch", expected=batch,
                                 found=len(adapter_names), code="bad_adapter_names")
            slots = [routing.default if n is None else self.slot(n) for n in adapter_names]
            self._set_routing(slots)
        try:
            yield
        finally:
            routing.index, routing.uniform, routing.segments = None, None, None

    def _set_routing(self, slots: list[int]) -> None:
        routing = self.routing
        device = self._device()
        routing.index = torch.tensor(slots, dtype=torch.long, device=device)
        first = slots[0] if slots else 0
        routing.uniform = first if all(s == first for s in slots) else None
        if routing.uniform is not None or routing.kernel == "gather":
            return
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                rows.setdefault(slot, []).append(row)
        contiguous = all(r[-1] - r[0] + 1 == len(r) for r in rows.values())
        if routing.kernel == "auto" and not (contiguous and len(rows) <= AUTO_SEGMENTS):
            return  # gather: four ops per layer whatever the mix
        routing.segments = [
            (slot, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r)
             else torch.tensor(r, dtype=torch.long, device=device))
            for slot, r in rows.items()
        ]

    def _device(self) -> torch.device:
        layer = next(iter(self._layers.values()), None)
        return layer.lora_A_slots.device if layer is not None else torch.device("cpu")

    # ---- injection and checks --------------------------------------------------
    def _select(self, target_modules: str | Sequence[str]) -> list[str]:
        from adapterkit.plugins.lora.targeting import select_modules

        return list(select_modules(self.model, {"target_modules": target_modules}))

    def _inject(self, paths: list[str]) -> None:
        from adapterkit.plugins.lora.layer import module_kind
        from adapterkit.plugins.lora.pool_layer import PoolLayer, replace_module

        modules = {}
        for path in paths:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise UsageError(f"module {path} not found in the model", location=path,
                                 hint="use the base model the adapter was made for", code="missing_module") from None
            if module_kind(module) is None:
                raise UsageError(f"the pool cannot serve {path}, a {type(module).__name__}", location=path,
                                 hint="only nn.Linear and transformers Conv1D modules (not already wrapped)",
                                 code="bad_target")
            modules[path] = module
        for path, module in modules.items():
            layer = PoolLayer(module, self.max_adapters + 1, self.max_rank, self.routing, self.dtype)
            layer.train(module.training)
            replace_module(self.model, path, layer)
            self._layers[path] = layer
        self._compiled = None  # a graph traced before injection is stale

    def _plan(self, adapter: Adapter, name: str,
              finite_checked: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """path -> (A, B, scale) of ``adapter``, every check done; raise UsageError otherwise."""
        from adapterkit.plugins.lora.targeting import in_out_features

        where = str(adapter.source) if adapter.source else name
        registry = self.registry or default_registry()
        method = registry.method(adapter.method)
        if method.name != "lora":
            raise UsageError(f"the pool serves LoRA adapters; {where} is a {adapter.method!r} adapter",
                             file=where, expected="lora", found=adapter.method,
                             hint="merge it into the base, or apply it with adapterkit.apply",
                             code="unsupported_method")
        config = method.resolve_config(adapter.config)
        outside = sorted(set(adapter.targets) - set(self._layers))
        if outside:
            raise UsageError(
                f"{len(outside)} module(s) of the adapter are not among the pool's targets", file=where,
                expected=f"a subset of the pool's {len(self._layers)} targets", found=outside,
                hint="make the pool with target_modules covering them (targets are fixed when the pool is made)",
                code="targets_mismatch",
            )
        tensors: dict[str, dict[str, Any]] = {}
        for key, array in adapter.tensors.items():
            parts = split_key(key, "lora")
            if parts is None or parts[0] not in adapter.targets or parts[1] not in ("A", "B"):
                raise UsageError("unexpected tensor in a LoRA adapter", file=where, location=key,
                                 expected="<target module>.lora.A / .lora.B", code="tensor_mismatch")
            tensors.setdefault(parts[0], {})[parts[1]] = array
        plan = {}
        for path, target in adapter.targets.items():
            layer = self._layers[path]
            problems = method.check_target(path, target, adapter.config)
            features = (layer.in_features, layer.out_features)
            if not problems and in_out_features(target["kind"], target["shape"]) != features:
                problems.append(f"the adapter's module is a {target['kind']} {target['shape']}; the model's is a "
                                f"{layer.kind} {list(layer.base_layer.weight.shape)}")
            if problems:
                raise UsageError(f"target does not fit the pool: {problems[0]}", file=where, location=path,
                                 hint="use the base model the adapter was made for", code="target")
            a, b = tensors.get(path, {}).get("A"), tensors.get(path, {}).get("B")
            if a is None or b is None:
                raise UsageError("LoRA tensors of a target are missing", file=where, location=path,
                                 expected=[f"{path}.lora.A", f"{path}.lora.B"], code="missing_tensor")
            r = int(a.shape[0]) if len(a.shape) == 2 else -1
            if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
                raise UsageError("LoRA tensors do not fit the module", file=where, location=path,
                                 expected={"A": ["r", layer.in_features], "B": [layer.out_features, "r"]},
                                 found={"A": list(a.shape), "B": list(b.shape)},
                                 hint="use the base model the adapter was made for", code="tensor_shape")
            if r > self.max_rank:
                raise UsageError(f"rank {r} exceeds the pool's max_rank", file=where, location=path,
                                 expected=f"<= {self.max_rank}", found=r,
                                 hint="make the pool with a larger max_rank", code="rank_too_large")
            if int(target.get("r", r)) != r:
                raise UsageError("the target's r does not match its tensors", file=where, location=path,
                                 expected=int(target["r"]), found=r, code="tensor_shape")
            if not finite_checked and (_non_finite(a) or _non_finite(b)):
                raise UsageError("LoRA tensors hold NaN or infinite values", file=where, location=path,
                                 hint="the training diverged; retrain or restore a checkpoint", code="non_finite")
            plan[path] = (_as_torch(a), _as_torch(b), float(method.scale(path, target, config)))
        return plan


def read_adapter(source: str | Path, format: str | None = None, registry: Registry | None = None) -> Adapter:
    """Read an adapter for the pool: an adapterkit folder by the fast path, any other format by its reader.

    The fast path (:func:`read_native_fast`) reads each tensor file once, checks its byte
    size and sha256 against the manifest and its safetensors header strictly, and skips the
    JSON Schema pass: the pool checks method, config, every target and every tensor against
    the live model itself. A folder it does not take (another format version, a wrong
    checksum, anything unexpected) goes through the full reader, :func:`adapterkit.load`,
    whose message says what is wrong.
    """
    adapter, verified = _open_adapter(source, format, registry)
    if verified is not None and not verified():
        return _load_full(Path(source), registry)
    return adapter


def read_native_fast(folder: Path) -> Adapter | None:
    """An adapterkit folder of the current format version, integrity-checked; None to defer to the full reader."""
    opened = _open_native(Path(folder))
    if opened is None:
        return None
    adapter, verified = opened
    return adapter if verified() else None


def _open_adapter(source: str | Path, format: str | None,
                  registry: Registry | None) -> tuple[Adapter, Callable[[], bool] | None]:
    """The adapter, and for the fast path a function that waits for the checksums (hashed in a thread)."""
    path = Path(source)
    if format in (None, "adapterkit") and (path / MANIFEST_NAME).is_file():
        opened = _open_native(path)
        if opened is not None:
            return opened
        return _load_full(path, registry), None
    from .api import load

    return load(path, format, registry=registry), None


def _load_full(path: Path, registry: Registry | None) -> Adapter:
    from .api import load

    return load(path, "adapterkit", registry=registry)  # no detection: every detector would look at the folder


def _open_native(folder: Path) -> tuple[Adapter, Callable[[], bool]] | None:
    """Read an adapterkit folder's files once; a thread checks their sha256 and finite values meanwhile."""
    import hashlib
    import math
    import threading

    from . import manifest as manifest_mod
    from . import safetensors_io
    from .errors import AdapterkitError
    from .io import read_json, safe_child
    from .manifest import Manifest

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


def _non_finite(array: Any) -> bool:
    """Whether a tensor holds a NaN or an infinity (numpy's check: far cheaper than torch's on small tensors)."""
    if isinstance(array, torch.Tensor):
        return not bool(torch.isfinite(array).all())
    return non_finite_count(array) > 0


def _as_torch(array: Any) -> torch.Tensor:
    """A torch view of a writable numpy array (a copy otherwise, bfloat16 included)."""
    if isinstance(array, torch.Tensor):
        return array.detach()
    if array.flags.writeable and array.dtype.kind == "f" and array.dtype.isnative:
        return torch.from_numpy(array)
    from .torch_bridge import to_torch

    return to_torch(array)


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    for key in BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return int(args[0].shape[0])
    return None
