"""Serving many LoRA adapters on one base model: register, page in and out, hot-swap, mixed and wide batches.

::

    pool = adapterkit.AdapterPool(model, max_adapters=16, max_rank=16)   # 16 device slots
    for name, path in catalogue.items():                 # any number of adapters, in host memory
        pool.load(name, path)
    out = pool(input_ids=ids, attention_mask=mask, adapter_names=["tenant-a", None, ...])
    pool.pin("tenant-a")                                 # never evicted
    pool.load("tenant-a", "path/to/retrained")           # an existing name: hot-swap in place

The pool wraps each target module of ``model`` (in place) in a
:class:`~adapterkit.core.runtime.pool_layer.PoolLayer` holding ``max_adapters`` stacked
device slots of rank ``max_rank``. ``load`` checks an adapter completely and keeps it in host
memory (:mod:`~adapterkit.core.runtime.paging`); a call that names it pages it into a slot,
least recently used first (:mod:`~adapterkit.core.runtime.residency`); a batch naming more
distinct adapters than slots is served in sub-batches, rows put back in order
(:mod:`~adapterkit.core.runtime.wide_batch`). docs/runtime.md explains it all.

**Targets are fixed when the pool is made**: from ``target_modules`` (LoRA's rules: suffixes, a
regex, ``"all-linear"``), else from the first adapter loaded. The pool never re-injects (that
would move storage and invalidate a compiled graph); page-ins and hot-swaps copy into the
existing slots. This module imports torch; ``import adapterkit`` does not import it (lazy name).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adapterkit.core.errors import UsageError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.targeting import weight_name
from adapterkit.core.plugin.registry import Registry
from adapterkit.core.runtime.kernel_choice import check_kernel, describe, triton_tokens
from adapterkit.core.runtime.modules import module_kind, replace_module, select_modules
from adapterkit.core.runtime.paging import HostAdapter, SlotWriter
from adapterkit.core.runtime.pool_checks import Plan, plan_factors
from adapterkit.core.runtime.pool_reader import load_full, open_adapter, read_adapter, read_native_fast
from adapterkit.core.runtime.residency import PageIn, PagingStats, Residency, plan_sub_batches
from adapterkit.core.runtime.wide_batch import (
    check_wide_forward, check_wide_generate, merge_sequences, pad_token, reassemble, take_rows,
)

__all__ = ["AdapterPool", "read_adapter", "read_native_fast"]

BATCH_KEYS = ("input_ids", "inputs_embeds", "input_values", "pixel_values")
WIDE_HINT = ("pool(...) and pool.generate(...) serve such a batch in sub-batches; inside routed() the adapters of "
             "one call must fit in the device slots: name fewer, or make the pool with a larger max_adapters")


class AdapterPool:
    """One base model; any number of registered LoRA adapters; ``max_adapters`` of them resident on the device.

    :param model: the base model; its target modules are wrapped in place
        (``pool.model is model``); :meth:`release` puts them back.
    :param max_adapters: device slots (slot 0, "no adapter", comes on top): how many adapters
        are resident at once.
    :param max_rank: the largest rank a slot holds; smaller ranks are zero-padded.
    :param max_registered: how many adapters may be registered (in host memory); None: no limit.
    :param target_modules: LoRA's ``target_modules`` (a list of suffixes, a regex,
        ``"all-linear"``); None: the modules of the first adapter loaded.
    :param kernel: of mixed batches: ``"auto"`` (the torch gather kernel; on CUDA with Triton
        installed, the Triton BGMV kernel for the decode steps of a compiled model), ``"gather"``
        (always torch) or ``"triton"`` (always Triton); a batch on one adapter always takes two
        plain matmuls.
    :param dtype: slot dtype (default: the base weights' floating dtype).
    """

    def __init__(self, model: torch.nn.Module, max_adapters: int = 8, max_rank: int = 16, *,
                 max_registered: int | None = None, target_modules: str | Sequence[str] | None = None,
                 kernel: str = "auto", dtype: torch.dtype | None = None, registry: Registry | None = None):
        from adapterkit.core.runtime.pool_layer import Routing, pool_layers

        options = [(max_adapters, "max_adapters"), (max_rank, "max_rank")]
        if max_registered is not None:
            options.append((max_registered, "max_registered"))
        for value, label in options:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{label} must be an integer >= 1", found=value, code="bad_option")
        if pool_layers(model):
            raise UsageError("the model already holds an adapter pool", hint="use that pool, or release() it first",
                             code="pool_exists")
        self.model = model
        self.max_adapters, self.max_rank, self.max_registered, self.dtype = max_adapters, max_rank, max_registered, dtype
        self.registry = registry
        self.routing = Routing()
        self.kernel = kernel
        self._host: dict[str, HostAdapter] = {}  # registered adapters, in registration order
        self._residency = Residency(max_adapters)
        self._layers: dict[str, Any] = {}  # module path -> PoolLayer
        self._writer: SlotWriter | None = None
        self._compiled: Any = None
        if target_modules is not None:
            self._inject(self._select(target_modules))

    # ---- introspection --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The registered adapters, in the order they were first loaded."""
        return list(self._host)

    @property
    def resident(self) -> list[str]:
        """The adapters in device slots now, in slot order."""
        return list(self._residency.resident)

    @property
    def pinned(self) -> list[str]:
        return sorted(self._residency.pinned)

    @property
    def stats(self) -> PagingStats:
        """Paging counters: hits, misses, evictions, page-ins, page-in seconds, wide calls, sub-batches."""
        stats = self._residency.stats
        if self._writer is not None:
            stats.page_in_seconds = self._writer.seconds()
        return stats

    @property
    def targets(self) -> list[str]:
        """The module paths the pool serves (fixed once set)."""
        return list(self._layers)

    @property
    def kernel(self) -> str:
        """The kernel of mixed batches: ``auto``, ``gather`` or ``triton`` (settable)."""
        return self.routing.kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        self.routing.kernel = check_kernel(value)

    @property
    def active(self) -> str | None:
        """The adapter of rows that name none (see :meth:`activate`)."""
        return self._residency.active

    def slot(self, name: str) -> int | None:
        """The device slot of adapter ``name`` (1..max_adapters), or None while it waits in host memory."""
        self._known([name])
        return self._residency.slot(name)

    def __contains__(self, name: object) -> bool:
        return name in self._host

    def __len__(self) -> int:
        return len(self._host)

    def summary(self) -> dict[str, Any]:
        """Registered and resident adapters, targets, memory and paging counters (JSON-ready)."""
        nbytes = sum(layer.lora_A_slots.nbytes + layer.lora_B_slots.nbytes for layer in self._layers.values())
        return {"adapters": {name: self._residency.slot(name) for name in self._host},
                "resident": self.resident, "pinned": self.pinned, "active": self.active,
                "max_adapters": self.max_adapters, "max_registered": self.max_registered,
                "max_rank": self.max_rank, "modules": len(self._layers), "kernel": self.routing.kernel,
                "mixed_kernel": describe(self.routing.kernel, self._device()),
                "slot_bytes": int(nbytes), "staging_bytes": self._writer.staging_bytes if self._writer else 0,
                "host_bytes": sum(host.nbytes for host in self._host.values()), "paging": self.stats.as_dict()}

    def __repr__(self) -> str:
        return (f"AdapterPool({len(self)} registered, {len(self.resident)}/{self.max_adapters} resident, "
                f"max_rank={self.max_rank}, {len(self._layers)} modules, kernel={self.routing.kernel!r})")

    # ---- life cycle -------------------------------------------------------------
    def load(self, name: str, source: str | Path | Adapter, *, format: str | None = None) -> int | None:
        """Register ``source`` (a path in any known format, or an :class:`Adapter`) as ``name``.

        Returns the device slot it took (a free one), or None when every slot is taken: it waits
        in host memory until a call names it. When ``name`` is registered already this is a
        hot-swap: its host copy is replaced and, if it is resident, its slot overwritten in place
        (no re-injection, no new tensors, so a compiled model keeps its graph). Every check
        passes before anything is stored, so a refused load or swap changes nothing.
        """
        if not isinstance(name, str) or not name:
            raise UsageError("an adapter name must be a non-empty string", found=name, code="bad_name")
        if name not in self._host and self.max_registered is not None and len(self._host) >= self.max_registered:
            raise UsageError(f"the pool is full ({self.max_registered} registered adapters, max_registered)",
                             found=name, hint="unload one first, or make the pool with a larger max_registered "
                                              "(None: no limit)", code="pool_full")
        if isinstance(source, Adapter):
            adapter, verified = source, None
        else:
            adapter, verified = open_adapter(source, format, self.registry)
        parameters = [m for m, t in sorted(adapter.targets.items()) if weight_name(m, t) == m]
        if parameters:
            raise UsageError(f"the adapter pool serves adapters of linear modules; {parameters[0]} is a parameter "
                             f"target ({len(parameters)} in all: LoRA on a parameter itself, e.g. fused experts)",
                             location=parameters[0], found=adapter.targets[parameters[0]].get("shape"),
                             hint="apply it with adapterkit.apply, or merge it into the base", code="unsupported")
        injected_here = not self._layers
        if injected_here:
            self._inject(list(adapter.targets))
        try:
            # every check happens here, before anything is stored (the fast path's thread checks finiteness)
            plan = self._plan(adapter, name, finite_checked=verified is not None)
            if verified is not None and not verified():  # a checksum failed: the full reader says why
                adapter = load_full(Path(source), self.registry)  # type: ignore[arg-type]
                plan = self._plan(adapter, name)
            host = HostAdapter.pack(plan, self._layers, self._slot_dtype(), pin=self._device().type == "cuda")
        except BaseException:
            if injected_here:  # a refused first adapter does not fix the targets
                self.release()
            raise
        self._host[name] = host
        slot = self._residency.slot(name)
        if slot is not None:  # hot-swap: the same slot, overwritten in place
            self._slot_writer().write([(slot, host)], after_all=True)
            self._slot_writer().wait_ready([slot])
            return slot
        placed = self._residency.admit(name)
        if placed is None:
            return None
        self._page([placed])
        return placed[1]

    def unload(self, name: str) -> None:
        """Forget adapter ``name``: its host copy is dropped, its slot (if any) zeroed and freed."""
        self._known([name])
        if name in self._residency.locked:
            raise UsageError(f"adapter {name!r} is serving the current call", hint="unload it after the call",
                             code="pool_busy")
        was_active = self.active == name
        slot = self._residency.drop(name)
        if slot is not None:
            self._slot_writer().write([(slot, None)], after_all=True)
        del self._host[name]
        if was_active:
            self.routing.default = 0

    def activate(self, name: str | None) -> None:
        """Serve ``name`` to rows that name no adapter, and to direct calls of ``pool.model`` (e.g. ``generate``).

        The active adapter is held resident (never evicted) until another is activated.
        """
        if name is None:
            self._residency.active, self.routing.default = None, 0
            return
        self._known([name])
        self._page(self._residency.hold(name, pin=False))
        slot = self._residency.slot(name)
        self._slot_writer().wait_ready([slot])
        self.routing.default = slot

    def deactivate(self) -> None:
        """Rows that name no adapter get the base model again."""
        self.activate(None)

    def pin(self, name: str) -> None:
        """Keep ``name`` resident (paged in now, never evicted) until :meth:`unpin`; one slot always stays unpinned."""
        self._known([name])
        self._page(self._residency.hold(name, pin=True))

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again (least recently used first); it stays resident until then."""
        self._known([name])
        self._residency.pinned.discard(name)

    def prefetch(self, names: Sequence[str]) -> list[str]:
        """Page in ``names`` ahead of the call that needs them (as many as fit beside the held adapters).

        On CUDA the copies run on a side stream while the work already queued computes; the
        call that names them then finds them resident. Returns the names paged in now.
        """
        self._known(names)
        busy = self._residency.held | self._residency.locked
        room = self.max_adapters - len(busy)
        wanted = [n for n in dict.fromkeys(names) if n not in busy][:max(room, 0)]
        plan = self._residency.acquire(wanted, count=False)
        self._residency.release(wanted)
        self._page(plan)
        return [name for name, _, _ in plan]

    def compile(self, **options: Any) -> AdapterPool:
        """Call the model through ``torch.compile(model, **options)`` from now on; returns the pool.

        On CUDA, without ``mode`` or ``backend``, ``mode="reduce-overhead"`` (CUDA graphs). Load,
        hot-swap, unload, page-ins and any mix of adapters never recompile; a new batch shape
        (a sub-batch of a wide call among them) may.
        """
        device = self._device()
        if device.type == "cuda" and "mode" not in options and "backend" not in options:
            options["mode"] = "reduce-overhead"
        triton_tokens(self.routing.kernel, device, compiled=True)  # imports the Triton kernels (their custom op) if used
        self._compiled = torch.compile(self.model, **options)
        return self

    def release(self) -> torch.nn.Module:
        """Put the base modules back and return the model; the pool is empty after (its targets unset)."""
        for path, layer in self._layers.items():
            if path:
                replace_module(self.model, path, layer.base_layer)
            else:
                self.model = layer.base_layer
        self._layers, self._host, self._compiled, self._writer = {}, {}, None, None
        self._residency.clear()
        self.routing.clear()
        self.routing.default = 0
        return self.model

    # ---- forward ----------------------------------------------------------------
    def __call__(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Run the model; row ``i`` uses adapter ``adapter_names[i]`` (None: the active one, or none).

        A batch naming more distinct adapters than there are free slots runs in sub-batches
        (no KV cache returned; see docs/runtime.md, "Wide batches").
        """
        batch = _batch_size(args, kwargs)
        forward = self.model if self._compiled is None else self._compiled
        if adapter_names is None and batch is None:  # no batch to route: every row gets the active adapter
            return forward(*args, **kwargs)
        names = self._row_names(adapter_names, batch)
        subs = self._sub_batches(names)
        compiled = self._compiled is not None
        if len(subs) == 1:
            with self._routed(names, batch, compiled):
                return forward(*args, **kwargs)
        check_wide_forward(kwargs, len({n for n in names if n is not None}), self.max_adapters)
        if getattr(getattr(self.model, "config", None), "use_cache", None) is not None:
            kwargs = {**kwargs, "use_cache": False}
        parts = []
        for rows in self._wide(subs):
            sub_args, sub_kwargs = take_rows(args, kwargs, rows, len(names))
            with self._routed([names[i] for i in rows], len(rows), compiled):
                parts.append((rows, forward(*sub_args, **sub_kwargs)))
        return reassemble(parts, len(names))

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with row ``i`` on adapter ``adapter_names[i]`` (no beam search: one row per name).

        More distinct adapters than free slots: one ``generate`` per sub-batch, each with its
        own KV cache; sequences right-padded with the pad token and returned in row order.
        """
        batch = _batch_size(args, kwargs)
        if adapter_names is None and batch is None:
            return self.model.generate(*args, **kwargs)
        names = self._row_names(adapter_names, batch)
        subs = self._sub_batches(names)
        if len(subs) == 1:
            with self.routed(names, batch):
                return self.model.generate(*args, **kwargs)
        check_wide_generate(kwargs, len({n for n in names if n is not None}), self.max_adapters)
        pad = pad_token(self.model, kwargs)
        parts = []
        for rows in self._wide(subs):
            sub_args, sub_kwargs = take_rows(args, kwargs, rows, len(names))
            with self.routed([names[i] for i in rows], len(rows)):
                parts.append((rows, self.model.generate(*sub_args, **sub_kwargs)))
        return merge_sequences(parts, len(names), pad)

    def routed(self, adapter_names: Sequence[str | None] | None, batch: int | None = None) -> Any:
        """Inside this block every call of ``pool.model`` routes row ``i`` to ``adapter_names[i]``.

        The adapters named are paged in and locked (never evicted) for the whole block, so
        a request pays at most one page-in however many decode steps it runs. They must fit
        in the device slots together (``too_many_adapters`` otherwise).
        """
        return self._routed(adapter_names, batch, compiled=False)

    @contextlib.contextmanager
    def _routed(self, adapter_names: Sequence[str | None] | None, batch: int | None,
                compiled: bool) -> Iterator[None]:
        routing = self.routing
        if routing.index is not None:
            raise UsageError("the pool is already running a routed call", hint="the pool is not re-entrant",
                             code="pool_busy")
        wanted: list[str] = []
        slots: list[int] = []
        if adapter_names is not None:
            names = self._row_names(adapter_names, batch)
            wanted = [n for n in dict.fromkeys(names) if n is not None]
            plan = self._residency.acquire(wanted, WIDE_HINT)
            try:
                self._page(plan)
                slots = [routing.default if n is None else self._residency.slot(n) for n in names]  # type: ignore[misc]
                if self._writer is not None:
                    self._writer.wait_ready(slots)
                self._set_routing(slots, compiled)
            except BaseException:
                self._residency.release(wanted)
                routing.clear()
                raise
        try:
            yield
        finally:
            routing.clear()
            self._residency.release(wanted)
            if self._writer is not None and slots:
                self._writer.mark_used(slots)

    # ---- routing and paging --------------------------------------------------------
    def _row_names(self, adapter_names: Sequence[str | None] | None, batch: int | None) -> list[str | None]:
        if adapter_names is None:
            return [None] * (batch if batch is not None else 1)
        if isinstance(adapter_names, str):
            raise UsageError("adapter_names must be a list with one name (or None) per row", found=adapter_names,
                             code="bad_adapter_names")
        names = list(adapter_names)
        if batch is not None and len(names) != batch:
            raise UsageError("adapter_names must have one entry per row of the batch", expected=batch,
                             found=len(names), code="bad_adapter_names")
        self._known(names)
        return names

    def _known(self, names: Sequence[str | None]) -> None:
        unknown = [n for n in dict.fromkeys(names) if n is not None and n not in self._host]
        if unknown:
            raise UsageError(f"no adapter named {unknown[0]!r} in the pool", expected=self.names[:8] or "a loaded adapter",
                             found=unknown[0] if len(unknown) == 1 else unknown[:8],
                             hint="load it first: pool.load(name, path)", code="unknown_adapter")

    def _sub_batches(self, names: list[str | None]) -> list[list[int]]:
        held = self._residency.held
        return plan_sub_batches(names, self._residency.resident, held, self.max_adapters - len(held))

    def _wide(self, subs: list[list[int]]) -> list[list[int]]:
        stats = self._residency.stats
        stats.wide_calls += 1
        stats.sub_batches += len(subs)
        return subs

    def _page(self, plan: list[PageIn]) -> None:
        """Copy each planned adapter into its slot (evicted adapters keep their host copy)."""
        if not plan:
            return
        self._slot_writer().write([(slot, self._host[name]) for name, slot, _ in plan])
        self._residency.stats.page_ins += len(plan)

    def _set_routing(self, slots: list[int], compiled: bool = False) -> None:
        routing = self.routing
        device = self._device()
        routing.index = torch.tensor(slots, dtype=torch.long, device=device)
        first = slots[0] if slots else 0
        routing.uniform = first if all(s == first for s in slots) else None
        routing.triton_tokens = 0 if routing.uniform is not None else triton_tokens(routing.kernel, device, compiled)

    def _device(self) -> torch.device:
        layer = next(iter(self._layers.values()), None)
        return layer.lora_A_slots.device if layer is not None else torch.device("cpu")

    def _slot_dtype(self) -> torch.dtype:
        return next(iter(self._layers.values())).lora_A_slots.dtype

    def _slot_writer(self) -> SlotWriter:
        if self._writer is None:
            self._writer = SlotWriter(self._layers)
        return self._writer

    # ---- injection and checks --------------------------------------------------
    def _select(self, target_modules: str | Sequence[str]) -> list[str]:
        return list(select_modules(self.model, target_modules, method="the adapter pool"))

    def _inject(self, paths: list[str]) -> None:
        from adapterkit.core.runtime.pool_layer import PoolLayer

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
        self._writer = SlotWriter(self._layers)
        self._compiled = None  # a graph traced before injection is stale

    def _plan(self, adapter: Adapter, name: str, finite_checked: bool = False) -> dict[str, Plan]:
        """path -> (A, B, scale) of ``adapter``, every check done; raise UsageError otherwise."""
        return plan_factors(adapter, name, self._layers, self.max_rank, self.registry, finite_checked)


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    for key in BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return int(args[0].shape[0])
    return None
