"""Registered adapters in host memory, and their copies into the pool's device slots (page-in).

:class:`HostAdapter` is one registered adapter, already in the slots' layout: for every
pool module ``A [r, in]`` and ``scale * B [out, r]`` in the slot dtype, packed into **one**
flat buffer (page-locked on CUDA, so that a page-in is one asynchronous host-to-device copy).

:class:`SlotWriter` copies a host adapter into a slot of every :class:`PoolLayer` **in place**
(the slots' storage never changes, so a ``torch.compile``-d model keeps its graph):

- on the CPU, one ``torch._foreach_copy_`` from the host views into the slot views;
- on CUDA, on a side stream: one copy of the packed buffer into a device staging buffer,
  then one ``_foreach_copy_`` from the staging views into the slots. The side stream waits
  only for the last forward that read the slot being overwritten (an event recorded per
  slot), and a forward waits only for the slots it uses, so a page-in overlaps the compute
  already queued (the rest of a wide batch, or the batch before a :meth:`prefetch
  <adapterkit.core.runtime.pool.AdapterPool.prefetch>`). Written for CUDA and checked on a GPU
  for correctness only; the overlap itself was not measured.

A smaller rank than the slot's previous occupant zeroes the stale tail (zero rows of A and
columns of B add exact zeros); ``PoolLayer.ranks`` follows, for the eager kernels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapterkit.core.runtime.pool_checks import Plan


@dataclass
class HostAdapter:
    """One registered adapter in host memory: a flat buffer and, per module, ``(rank, offset of A, offset of B)``."""

    buffer: torch.Tensor
    layout: dict[str, tuple[int, int, int]]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @classmethod
    def pack(cls, plan: Mapping[str, Plan], layers: Mapping[str, Any], dtype: torch.dtype,
             pin: bool) -> HostAdapter:
        """``plan`` (path -> A, B, scale) as one buffer in the slot dtype, the scale folded into B."""
        layout, offset = {}, 0
        for path, layer in layers.items():  # the pool's module order: the staging views follow it
            if path in plan:
                r = int(plan[path][0].shape[0])
                layout[path] = (r, offset, offset + r * layer.in_features)
                offset += r * (layer.in_features + layer.out_features)
        buffer = torch.empty(offset, dtype=dtype, pin_memory=pin)
        for path, (r, off_a, off_b) in layout.items():
            a, b, scale = plan[path]
            layer = layers[path]
            buffer[off_a:off_b].view(r, layer.in_features).copy_(a)
            view_b = buffer[off_b:off_b + layer.out_features * r].view(layer.out_features, r)
            if scale == 1.0:
                view_b.copy_(b)
            else:  # the product in float32, rounded once into the slot dtype
                view_b.copy_(b.to(torch.float32) * scale)
        return cls(buffer, layout)

    def views(self, source: torch.Tensor, layers: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """path -> (A, B) as views of ``source`` (this buffer, or its copy on the device)."""
        out = {}
        for path, (r, off_a, off_b) in self.layout.items():
            layer = layers[path]
            out[path] = (source[off_a:off_b].view(r, layer.in_features),
                         source[off_b:off_b + layer.out_features * r].view(layer.out_features, r))
        return out


class SlotWriter:
    """Copies host adapters into the slots of ``layers`` (path -> PoolLayer) and keeps the time it took."""

    def __init__(self, layers: Mapping[str, Any]):
        self.layers = layers
        self._seconds = 0.0
        self._timings: list[tuple[Any, Any]] = []  # CUDA (start, end) events not yet added to _seconds
        self._stream: Any = None
        self._staging: torch.Tensor | None = None
        self._used: dict[int, Any] = {}  # slot -> event after the last forward that read it (CUDA)
        self._ready: dict[int, Any] = {}  # slot -> event after its last page-in (CUDA)

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A_slots.device

    @property
    def staging_bytes(self) -> int:
        return 0 if self._staging is None else self._staging.numel() * self._staging.element_size()

    def seconds(self) -> float:
        """Seconds spent copying so far (CUDA: the copies' device time; waits for the ones in flight)."""
        for start, end in self._timings:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        self._timings.clear()
        return self._seconds

    @torch.no_grad()
    def write(self, items: Iterable[tuple[int, HostAdapter | None]], *, after_all: bool = False) -> None:
        """Copy each host adapter into its slot (None: zero the slot).

        ``after_all`` (hot-swap, unload): on CUDA the copy waits for everything queued so far,
        not only for the forwards that routed rows to the slot.
        """
        items = list(items)
        if not items:
            return
        if self.device.type != "cuda":
            start = time.perf_counter()
            for slot, host in items:
                sources = host.views(host.buffer, self.layers) if host is not None else {}
                self._copy(slot, sources)
            self._seconds += time.perf_counter() - start
            return
        self._write_cuda(items, after_all)

    def _copy(self, slot: int, sources: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        dst, src = [], []
        for path, layer in self.layers.items():
            a, b = sources.get(path, (None, None))
            r = 0 if a is None else int(a.shape[0])
            if r < layer.ranks[slot]:  # the previous occupant's extra rank must not survive
                layer.lora_A_slots[slot, r:].zero_()
                layer.lora_B_slots[slot, :, r:].zero_()
            if r:
                dst += [layer.lora_A_slots[slot, :r], layer.lora_B_slots[slot, :, :r]]
                src += [a, b]
            layer.ranks[slot] = r
        if dst:
            torch._foreach_copy_(dst, src)

    def _write_cuda(self, items: list[tuple[int, HostAdapter | None]], after_all: bool) -> None:
        device = self.device
        current = torch.cuda.current_stream(device)
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        need = max((host.buffer.numel() for _, host in items if host is not None), default=0)
        first = next(iter(self.layers.values()))
        if self._staging is None or self._staging.device != device or self._staging.numel() < need:
            full = sum(layer.r_max * (layer.in_features + layer.out_features) for layer in self.layers.values())
            self._staging = torch.empty(max(need, full), dtype=first.lora_A_slots.dtype, device=device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = self._stream
        if after_all:
            stream.wait_stream(current)
        with torch.cuda.stream(stream):
            start.record(stream)
            for slot, host in items:
                used = self._used.pop(slot, None)
                if used is not None:
                    stream.wait_event(used)  # the last forward that read this slot is done
                sources = {}
                if host is not None:
                    staged = self._staging[:host.buffer.numel()]
                    staged.copy_(host.buffer, non_blocking=True)
                    sources = host.views(staged, self.layers)
                self._copy(slot, sources)
            end.record(stream)
        for slot, _ in items:
            self._ready[slot] = end
        self._timings.append((start, end))

    def wait_ready(self, slots: Iterable[int]) -> None:
        """The current stream waits for the page-ins of ``slots`` (before a forward reads them; CUDA only)."""
        if not self._ready:
            return
        current = torch.cuda.current_stream(self.device)
        for slot in set(slots):
            event = self._ready.pop(slot, None)
            if event is not None:
                current.wait_event(event)

    def mark_used(self, slots: Iterable[int]) -> None:
        """Record that the work queued so far reads ``slots`` (after a forward; CUDA only)."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in set(slots):
            if slot:
                self._used[slot] = event
