"""Benchmark one adapter on one base model, on this machine: what it costs to store, apply, run and train.

::

    from adapterkit.core.bench.measure import bench_adapter
    report = bench_adapter("my-lora", "path/to/base", repeats=5)
    report.to_dict()          # JSON-ready; adapterkit bench --json prints it

Measured (every timing is min / median / max of ``repeats`` runs after ``warmup``
untimed ones; :class:`Timing`):

- parameters (adapter, base, trainable) and sizes: the adapter's files, the base's
  tensors, and the storage argument (``copies`` full fine-tuned copies of the base
  against one base plus ``copies`` adapters);
- loading: the base (``from_pretrained``), the adapter file (``adapterkit.load``), and
  ``adapterkit.apply`` onto a freshly loaded base;
- forward latency of the base alone, the adapter unmerged, and merged where the
  method can merge (``Method.merge_refusal`` is None), per batch size at ``seq_len``;
  the three alternate (base, unmerged, merged, base, ...);
- one training step (forward, cross-entropy on seeded random targets, backward,
  ``AdamW.step`` on the adapter's parameters) and the resident memory it adds on top
  of the loaded model (gradients, optimizer state, activations), sampled from
  ``/proc/self/statm`` (or psutil) every 2 ms;
- with a LoRA adapter, when :class:`adapterkit.core.runtime.pool.AdapterPool` is available:
  hot-swap latency (``pool.load`` of an existing name, reading the file included) and
  mixed-batch throughput (the adapter in 8 slots, row ``i`` on slot ``i % 8``) against
  the base. Otherwise the report says "not available" and why.

Text and chart: :mod:`adapterkit.core.bench.render`. This module imports torch.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import gc
import inspect
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.format.adapter import Adapter

STORAGE_COPIES = 10
POOL_SLOTS, POOL_ROWS, POOL_TOKENS = 8, 16, 64
Progress = Callable[[str], Any]


@dataclass
class Timing:
    """Seconds of repeated runs (after the warm-up)."""

    runs: list[float]

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "median": self.median, "max": self.max, "runs": list(self.runs)}


@dataclass
class ForwardResult:
    """Forward latency at one batch size: base alone, adapter unmerged, adapter merged (None: cannot merge)."""

    batch: int
    seq_len: int
    base: Timing
    unmerged: Timing
    merged: Timing | None = None

    def overhead(self, which: str = "unmerged") -> float | None:
        """Median seconds added over the base's median (None when not measured)."""
        timing = getattr(self, which)
        return None if timing is None else timing.median - self.base.median

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.batch, "seq_len": self.seq_len, "base": self.base.to_dict(),
                               "unmerged": self.unmerged.to_dict(),
                               "merged": self.merged.to_dict() if self.merged else None}
        for which in ("unmerged", "merged"):
            extra = self.overhead(which)
            out[f"{which}_overhead_seconds"] = extra
            out[f"{which}_overhead_fraction"] = None if extra is None else extra / self.base.median
        return out


@dataclass
class BenchReport:
    """Everything :func:`bench_adapter` measured (see the module docstring); :meth:`to_dict` for JSON."""

    adapter: str
    base: str
    format: str
    method: str
    config: dict[str, Any]
    merge_refusal: str | None
    machine: dict[str, Any]
    settings: dict[str, Any]
    parameters: dict[str, Any]
    sizes: dict[str, Any]
    load: dict[str, Timing | None]
    forward: list[ForwardResult] = field(default_factory=list)
    train_step: dict[str, Any] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, (Timing, ForwardResult)):
                return value.to_dict()
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


# ---- measuring ---------------------------------------------------------------------------

def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> Timing:
    """``repeats`` runs of ``fn`` after ``warmup`` untimed ones (see :func:`timed_call`)."""
    runs = [timed_call(fn) for _ in range(warmup + repeats)]
    return Timing(runs[warmup:])


def timed_call(fn: Callable[[], Any]) -> float:
    """Seconds of one call: garbage collected before it, the collector off during it (as ``timeit`` does)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def rss_bytes() -> int | None:
    """This process's resident memory now (``/proc/self/statm``, else psutil, else None)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Sample the resident memory every ``interval`` seconds inside a ``with`` block; ``delta``: peak - start."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes()
            if value is not None and self.peak is not None and value > self.peak:
                self.peak = value

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        end = rss_bytes()
        if end is not None and self.peak is not None:
            self.peak = max(self.peak, end)

    @property
    def delta(self) -> int | None:
        return None if self.start is None or self.peak is None else self.peak - self.start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "load_average": load}


# ---- the benchmark -------------------------------------------------------------------------

def bench_adapter(
    adapter_or_path: Adapter | str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    *,
    repeats: int = 5,
    warmup: int = 1,
    seq_len: int = 128,
    batch_sizes: Sequence[int] = (1, 8),
    train_batch: int = 4,
    threads: int | None = None,
    format: str | None = None,
    pool: bool = True,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure ``adapter_or_path`` (any format, or an :class:`Adapter`) on the local HF base in ``base_dir``.

    :param repeats: measured runs of every timing (after ``warmup`` untimed runs).
    :param seq_len: tokens per row of the forward and training inputs (seeded random ids).
    :param batch_sizes: batch sizes of the forward latency.
    :param train_batch: rows of the training step.
    :param threads: torch threads while measuring (default: every core); restored after.
    :param pool: measure hot-swap and mixed batches when possible (LoRA, AdapterPool importable).
    """
    from adapterkit.core.format.base_model import read_base_model
    from adapterkit.core.plugin.registry import default_registry
    from adapterkit.core.runtime.inject import apply, attached, base_parameter_count
    from adapterkit.core.runtime.models import load_base
    from adapterkit.core.store import adapters as api

    for value, label in ((repeats, "repeats"), (seq_len, "seq_len"), (train_batch, "train_batch")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{label} must be an integer >= 1", found=value, code="bad_option")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError("warmup must be an integer >= 0", found=warmup, code="bad_option")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UsageError("batch sizes must be integers >= 1", found=batch_sizes, code="bad_option")
    say = progress or (lambda text: None)
    threads = threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gc.collect()
    gc.freeze()  # what is alive now is never garbage here: collecting before each timed call stays cheap
    try:
        base_dir = Path(base_dir)
        info = read_base_model(base_dir)
        path = None if isinstance(adapter_or_path, Adapter) else Path(adapter_or_path)
        adapter = adapter_or_path if isinstance(adapter_or_path, Adapter) else api.load(path, format, base=base_dir)
        method = default_registry().method(adapter.method)
        refusal = method.merge_refusal(method.resolve_config(adapter.config))

        say(f"loading the base and applying the adapter ({warmup} + {repeats} times)")
        loads: dict[str, list[float]] = {"base_load": [], "adapter_read": [], "apply": []}
        model = None
        for index in range(warmup + repeats):
            model = None
            gc.collect()
            t0 = time.perf_counter()
            model = load_base(base_dir)
            t1 = time.perf_counter()
            loaded = api.load(path, format, base=base_dir) if path is not None else adapter
            t2 = time.perf_counter()
            apply(loaded, model)
            t3 = time.perf_counter()
            if index >= warmup:
                loads["base_load"].append(t1 - t0)
                loads["adapter_read"].append(t2 - t1)
                loads["apply"].append(t3 - t2)
        assert model is not None
        handle = attached(model)["default"]
        trainable = {id(p): p.numel() for p in handle.parameters()}
        base_params = base_parameter_count(model)

        base_model = load_base(base_dir)
        forward = []
        for batch in batch_sizes:
            say(f"forward latency, batch {batch} x {seq_len}")
            result, failure = _forward(base_model, model, handle, batch, seq_len, repeats, warmup, refusal)
            refusal = refusal or failure
            forward.append(result)

        say(f"training step, batch {train_batch} x {seq_len}")
        train = _train_step(model, handle, train_batch, seq_len, repeats, warmup)
        del model, handle
        gc.collect()

        pool_result = {"available": False, "reason": "not requested"}
        if pool:
            say("adapter pool: hot-swap and mixed batch")
            pool_result = _pool(base_model, adapter, path, format, repeats, warmup)
        del base_model
        gc.collect()

        file_bytes = _file_bytes(path) if path is not None else None
        sizes = {
            "adapter_file_bytes": file_bytes, "adapter_tensor_bytes": adapter.nbytes, "base_bytes": info.nbytes,
            "copies": STORAGE_COPIES, "full_copies_bytes": STORAGE_COPIES * info.nbytes,
            "adapter_copies_bytes": STORAGE_COPIES * (file_bytes or adapter.nbytes),
            "base_plus_adapters_bytes": info.nbytes + STORAGE_COPIES * (file_bytes or adapter.nbytes),
            "adapter_relative_to_base": (file_bytes or adapter.nbytes) / info.nbytes if info.nbytes else None,
        }
        parameters = {
            "adapter": adapter.num_parameters, "trainable": sum(trainable.values()), "base": base_params,
            "total": base_params + sum(trainable.values()),
            "adapter_relative_to_base": adapter.num_parameters / base_params if base_params else None,
        }
        return BenchReport(
            adapter=str(path) if path is not None else "<in memory>", base=str(base_dir),
            format=adapter.source_format, method=adapter.method, config=dict(adapter.config), merge_refusal=refusal,
            machine=machine_info(threads),
            settings={"repeats": repeats, "warmup": warmup, "seq_len": seq_len, "batch_sizes": batch_sizes,
                      "train_batch": train_batch, "threads": threads, "dtype": "float32"},
            parameters=parameters, sizes=sizes,
            load={"base_load": Timing(loads["base_load"]),
                  "adapter_read": Timing(loads["adapter_read"]) if path is not None else None,
                  "apply": Timing(loads["apply"])},
            forward=forward, train_step=train, pool=pool_result,
        )
    finally:
        gc.unfreeze()
        torch.set_num_threads(previous_threads)


def _inputs(model: torch.nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from adapterkit.core.export.trace import sample_inputs

    return sample_inputs(model, batch, seq_len, seed=seed)


def _call(model: Any, inputs: dict[str, torch.Tensor], **extra: Any) -> Any:
    """The model's output tensor (logits) for ``inputs``; ``use_cache=False`` where the model takes it."""
    if _takes_use_cache(type(model)):
        extra.setdefault("use_cache", False)
    out = model(**inputs, **extra)
    return out.logits if hasattr(out, "logits") else out[0]


@functools.lru_cache(maxsize=None)
def _takes_use_cache(cls: type) -> bool:
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _forward(base_model: torch.nn.Module, model: torch.nn.Module, handle: Any, batch: int, seq_len: int,
             repeats: int, warmup: int, refusal: str | None) -> tuple[ForwardResult, str | None]:
    """Base, unmerged and merged latency, alternating, and why merging failed (None: it did not);
    the adapter is left unmerged."""
    inputs = _inputs(base_model, batch, seq_len)
    names = ["base", "unmerged"] + (["merged"] if refusal is None else [])
    runs: dict[str, list[float]] = {name: [] for name in names}
    failure = None
    with torch.inference_mode():
        for index in range(warmup + repeats):
            for name in list(names):
                try:
                    if name == "merged":
                        handle.merge()
                    else:
                        handle.unmerge()
                except (NotImplementedError, AdapterkitError) as exc:
                    failure = f"merging failed: {exc}"
                    names.remove(name)
                    runs.pop(name, None)
                    continue
                target = base_model if name == "base" else model
                elapsed = timed_call(lambda: _call(target, inputs))
                if index >= warmup:
                    runs[name].append(elapsed)
        handle.unmerge()
    merged = Timing(runs["merged"]) if "merged" in runs else None
    return ForwardResult(batch, seq_len, Timing(runs["base"]), Timing(runs["unmerged"]), merged), failure


def _train_step(model: torch.nn.Module, handle: Any, batch: int, seq_len: int, repeats: int,
                warmup: int) -> dict[str, Any]:
    """One step: forward, cross-entropy against seeded random targets, backward, AdamW on the adapter."""
    inputs = _inputs(model, batch, seq_len, seed=1)
    params = list(handle.parameters())
    generator = torch.Generator().manual_seed(2)
    state: dict[str, Any] = {}

    def step() -> None:
        logits = _call(model, inputs)
        if "targets" not in state:
            state["targets"] = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 state["targets"].reshape(-1))
        loss.backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)

    model.train()
    gc.collect()
    try:
        with PeakRSS() as memory:
            state["optimizer"] = torch.optim.AdamW(params, lr=1e-4)
            seconds = timed(step, repeats, warmup)
    finally:
        model.eval()
        state.clear()
    return {"batch": batch, "seq_len": seq_len, "seconds": seconds, "optimizer": "AdamW",
            "trainable_tensors": len(params), "rss_before_bytes": memory.start, "peak_rss_delta_bytes": memory.delta}


def _pool(base_model: torch.nn.Module, adapter: Adapter, path: Path | None, format: str | None, repeats: int,
          warmup: int) -> dict[str, Any]:
    """Hot-swap latency and mixed-batch throughput through AdapterPool, or why they are not available."""
    from adapterkit.core.plugin.capabilities import LowRank
    from adapterkit.core.plugin.registry import default_registry
    from adapterkit.core.runtime.pool import AdapterPool

    method = default_registry().method(adapter.method)
    if not isinstance(method, LowRank):
        return {"available": False,
                "reason": f"the adapter pool serves adapters with low-rank factors; method {adapter.method!r} gives none"}
    config = method.resolve_config(adapter.config)
    ranks = [int(method.lora_factors(m, t, config, adapter.module_tensors(m)).a.shape[0])
             for m, t in adapter.targets.items()]
    model = copy.deepcopy(base_model)
    try:
        pool = AdapterPool(model, max_adapters=POOL_SLOTS, max_rank=max([*ranks, 1]))
        start = time.perf_counter()
        for slot in range(POOL_SLOTS):
            pool.load(f"a{slot}", adapter)
        fill = time.perf_counter() - start
        source = path if path is not None else adapter
        with torch.inference_mode():
            swap = timed(lambda: pool.load("a0", source, format=format), repeats, warmup)
            inputs = _inputs(base_model, POOL_ROWS, POOL_TOKENS)
            names = [f"a{i % POOL_SLOTS}" for i in range(POOL_ROWS)]
            extra = {"use_cache": False} if _takes_use_cache(type(base_model)) else {}
            runs: dict[str, list[float]] = {"base": [], "pool": []}
            for index in range(warmup + repeats):
                for name, fn in (("base", lambda: _call(base_model, inputs)),
                                 ("pool", lambda: pool(**inputs, adapter_names=names, **extra))):
                    elapsed = timed_call(fn)
                    if index >= warmup:
                        runs[name].append(elapsed)
    except AdapterkitError as exc:
        return {"available": False, "reason": f"the adapter pool refused this adapter: {exc}"}
    finally:
        del model
        gc.collect()
    tokens = POOL_ROWS * POOL_TOKENS
    base_t, pool_t = Timing(runs["base"]), Timing(runs["pool"])
    return {
        "available": True, "reason": None, "slots": POOL_SLOTS, "fill_seconds": fill,
        "hot_swap": swap, "hot_swap_source": "file" if path is not None else "memory",
        "mixed_batch": {"rows": POOL_ROWS, "tokens": POOL_TOKENS,
                        "note": f"the adapter loaded in {POOL_SLOTS} slots, row i on slot i % {POOL_SLOTS}",
                        "base": base_t, "pool": pool_t,
                        "base_tokens_per_second": tokens / base_t.median,
                        "pool_tokens_per_second": tokens / pool_t.median,
                        "overhead_fraction": pool_t.median / base_t.median - 1},
    }


def _file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["BenchReport", "ForwardResult", "PeakRSS", "Timing", "bench_adapter"]
