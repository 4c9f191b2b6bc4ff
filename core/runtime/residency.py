"""Which registered adapters hold the pool's device slots: least-recently-used residency, pins, locks, counters.

Pure Python (no torch): :class:`Residency` knows names and slot numbers only; the pool
copies the weights (``adapterkit.core.runtime.paging``). :func:`plan_sub_batches` splits a
batch that names more distinct adapters than there are slots into sub-batches that fit.

Rules (docs/runtime.md, "Paging"):

- slots ``1..capacity``; a free slot is used first, then the least recently used
  resident adapter that is neither *held* (pinned, or the active adapter) nor *locked*
  (in use by the call being served) nor wanted by the same request is evicted;
- a request is all-or-nothing: when its adapters cannot be resident together, nothing
  changes and :class:`~adapterkit.core.errors.UsageError` ``too_many_adapters`` says why;
- pins are capped so that one slot always stays free for the other adapters
  (``pinned_full``); the active adapter is held too, and may take the last slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from adapterkit.core.errors import UsageError

#: one page-in to do: (adapter name, slot, the adapter it evicts or None)
PageIn = tuple[str, int, "str | None"]


@dataclass
class PagingStats:
    """Counters since the pool was made (``pool.summary()["paging"]``).

    ``hits`` / ``misses`` count adapters per served call (a batch naming an adapter
    three times counts once); ``page_ins`` counts copies into a slot (misses, pins,
    activations and loads that found a free slot); ``page_in_seconds`` is the time those
    copies took (on CUDA the device time of the copies, which may overlap compute);
    ``wide_calls`` counts calls split into ``sub_batches``.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    page_ins: int = 0
    page_in_seconds: float = 0.0
    wide_calls: int = 0
    sub_batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Residency:
    """Slots ``1..capacity``, the adapters in them (least recently used first), pins, the active one, locks."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(capacity, 0, -1))  # pop() hands out the lowest slot first
        self.pinned: set[str] = set()
        self.active: str | None = None
        self.locked: set[str] = set()
        self.stats = PagingStats()

    # ---- reading ------------------------------------------------------------------
    def slot(self, name: str) -> int | None:
        return self._lru.get(name)

    @property
    def resident(self) -> dict[str, int]:
        """name -> slot, in slot order."""
        return dict(sorted(self._lru.items(), key=lambda item: item[1]))

    @property
    def lru_order(self) -> list[str]:
        """Resident names, least recently used first (the next victim first)."""
        return list(self._lru)

    @property
    def held(self) -> set[str]:
        """Adapters that are never evicted: the pinned ones and the active one."""
        return self.pinned | ({self.active} if self.active is not None else set())

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # ---- changing -------------------------------------------------------------------
    def acquire(self, names: Iterable[str], hint: str = "", *, count: bool = True) -> list[PageIn]:
        """Make ``names`` resident and lock them; returns the page-ins needed (the caller copies the weights).

        All-or-nothing: when they cannot all be resident at once, nothing changes. ``count``:
        add to the hit / miss counters (a prefetch does not).
        """
        names = list(dict.fromkeys(names))
        wanted = set(names)
        missing = [n for n in names if n not in self._lru]
        held = self.held
        victims = [n for n in self._lru if n not in held and n not in self.locked and n not in wanted]
        if len(missing) > len(self._free) + len(victims):
            kept = sorted((held | self.locked) - wanted)
            raise UsageError(
                f"{len(names)} adapters cannot be resident at once: the pool has max_adapters={self.capacity} "
                f"device slots" + (f", {len(kept)} of them held by {kept[:8]} (pinned, active or in use)" if kept
                                   else ""),
                expected=f"at most {self.capacity - len(kept)} distinct adapters here", found=len(names),
                hint=hint or "name fewer distinct adapters, unpin some, or make the pool with a "
                                          "larger max_adapters",
                code="too_many_adapters")
        if count:
            self.stats.hits += len(names) - len(missing)
            self.stats.misses += len(missing)
        plan = [self._place(name, victims) for name in missing]
        for name in names:
            self._lru.move_to_end(name)  # most recently used
        self.locked |= wanted
        return plan

    def admit(self, name: str) -> PageIn | None:
        """Place a newly registered adapter in a free slot, if there is one (no eviction, no counters)."""
        if name in self._lru or not self._free:
            return None
        return self._place(name, [])

    def release(self, names: Iterable[str]) -> None:
        self.locked -= set(names)

    def hold(self, name: str, *, pin: bool) -> list[PageIn]:
        """Pin ``name`` (``pin=True``) or make it the active adapter; pages it in; refuses what would starve the rest."""
        if pin and name not in self.pinned:
            pinned = self.pinned | {name}
            if len(pinned | ({self.active} if self.active else set())) >= self.capacity:
                raise UsageError(
                    f"pinning {name!r} would leave no device slot for the other adapters",
                    expected=f"fewer than max_adapters={self.capacity} adapters pinned or active",
                    found=sorted(pinned), hint="unpin one first, or make the pool with a larger max_adapters",
                    code="pinned_full")
        elif not pin and name != self.active and len(self.pinned - {name}) >= self.capacity:
            raise UsageError(f"no device slot is left for the active adapter {name!r}: every slot is pinned",
                             found=sorted(self.pinned), hint="unpin one first", code="pinned_full")
        previous = self.active
        if not pin:
            self.active = None  # the previous active adapter may make room for the new one
        try:
            plan = self.acquire([name])
        except UsageError:
            self.active = previous
            raise
        self.release([name])
        if pin:
            self.pinned.add(name)
        else:
            self.active = name
        return plan

    def drop(self, name: str) -> int | None:
        """Forget ``name`` (unloaded); returns the slot it freed, if it was resident."""
        self.pinned.discard(name)
        if self.active == name:
            self.active = None
        slot = self._lru.pop(name, None)
        if slot is not None:
            self._free.append(slot)
            self._free.sort(reverse=True)
        return slot

    def clear(self) -> None:
        self.__init__(self.capacity)  # type: ignore[misc]

    def _place(self, name: str, victims: list[str]) -> PageIn:
        if self._free:
            slot, evicted = self._free.pop(), None
        else:
            evicted = victims.pop(0)  # least recently used first
            slot = self._lru.pop(evicted)
            self.stats.evictions += 1
        self._lru[name] = slot
        return name, slot, evicted


def plan_sub_batches(row_names: Sequence[str | None], resident: Iterable[str], held: Iterable[str],
                     capacity: int) -> list[list[int]]:
    """Row numbers grouped into sub-batches, each naming at most ``capacity`` distinct adapters besides ``held``.

    A batch that fits is one sub-batch with every row, in order. Otherwise the distinct
    adapters are cut into groups of ``capacity``, those already resident first (so they are
    served before anything can evict them); rows of held adapters (always resident) and
    rows naming none ride in the first sub-batch. Raises ``too_many_adapters`` when
    ``capacity`` is 0 and the batch names an adapter that is not held.
    """
    held, resident = set(held), set(resident)
    distinct = [n for n in dict.fromkeys(row_names) if n is not None and n not in held]
    if len(distinct) <= capacity:
        return [list(range(len(row_names)))]
    if capacity < 1:
        raise UsageError(f"every device slot is held by a pinned or active adapter ({sorted(held)}); "
                         f"the batch names {len(distinct)} other adapter(s)",
                         hint="unpin one, deactivate the active adapter, or make the pool with a larger max_adapters",
                         code="too_many_adapters")
    ordered = [n for n in distinct if n in resident] + [n for n in distinct if n not in resident]
    group = {name: i // capacity for i, name in enumerate(ordered)}
    subs: list[list[int]] = [[] for _ in range(max(group.values()) + 1)]
    for row, name in enumerate(row_names):
        subs[group.get(name, 0) if name is not None else 0].append(row)
    return subs
