"""Serving at scale: ``AdapterPool`` paging N registered adapters through S device slots, side by side with PEFT.

Two measurements, every contender in this one process, alternating batch by batch
(A B C ... A B C ...) after a warm-up batch, min / **median** / max over the measured batches:

1. **Traffic.** Requests of ``--prompt`` tokens that each generate ``--generate`` tokens
   (greedy, KV cache), ``--rows`` requests per batch, each naming one of N registered LoRA
   adapters (N in ``--registered``, default 1, 100, 1,000), drawn uniformly or Zipf-skewed
   (``--zipf`` s). The pool holds ``--slots`` device slots; a request's adapter is paged in
   (least recently used evicted) when its batch starts and stays locked for its prefill and
   every decode step (``pool.routed``), as a continuous-batching server would do. Prefill
   tokens/s (page-ins included), decode tokens/s and the whole batch's tokens/s, against:

   - the base model alone (no adapter code);
   - 16 all-resident adapters: an ``AdapterPool`` holding every adapter its rows name (the
     reference of the paging target), rows on ``--slots`` distinct adapters;
   - PEFT (0.21): ``adapter_names=`` with every adapter loaded where that fits (N <= 100
     by default), else swapping: one loaded adapter, and for each adapter in the batch
     ``hotswap_adapter_from_state_dict`` from host memory, then that group's prefill and
     decode (``set_adapter``-style serving: one adapter per forward).

   The LRU is warmed to a steady state with ``--warm`` batches of that traffic first.
2. **Decode step.** A mixed batch of ``--decode-rows`` rows on 16 and 128 distinct resident
   adapters (or ``--decode-adapters``): the time of one decode step against the base's, per
   kernel (the torch gather path; Triton where it runs), eager, and on CUDA also compiled
   with CUDA graphs (``pool.compile()``; the base with ``torch.compile(mode="reduce-overhead")``).

Targets (issue 16), as time per token so that lower is better: 1,000 registered / 16 slots
under Zipf traffic at <= 1.25x the time of 16 all-resident adapters (>= 0.8x their throughput)
and <= 0.25x PEFT swapping's (>= 4x its throughput); on a GPU a decode step at 128 adapters
<= 1.15x the base's.

Usage::

    python benchmarks/bench_serve.py                          # SmolLM2-135M, float32, CPU
    python benchmarks/bench_serve.py --generate 8             # a prefill-dominated mix
    python benchmarks/bench_serve.py --tiny                   # seconds: the CI smoke test
    python benchmarks/bench_serve.py --device cuda --shape llama-3.2-1b --dtype bfloat16   # a GPU
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: random-initialised shapes (--shape): Llama configs of these models
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}


# ---- setup ------------------------------------------------------------------------------

def load_base(args: Any, base: Path | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.shape:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, pad_token_id=0, eos_token_id=2,
                             bos_token_id=1)
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
        return model.to(dtype).eval()
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device).eval()


def sharing(model: Any) -> Any:
    """A second model object over the same weight tensors (contenders wrap modules, never write weights)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


class Catalogue:
    """Random, trained-like LoRA adapters (r, alpha = r: scale 1) on every target of ``model``, made on demand.

    ``distinct`` weight sets are cycled over the names (1,000 distinct float32 sets of SmolLM2 would
    take 7 GB twice over, once here and once in the pool's registry); every registered name
    still has its own host copy in the pool, and every page-in copies real bytes.
    """

    def __init__(self, model: Any, targets: list[str], rank: int, distinct: int):
        import numpy as np

        import adapterkit

        self.rank, self.distinct = rank, distinct
        template = adapterkit.inject(sharing(model), "lora", {"r": rank, "alpha": rank,
                                                              "target_modules": targets}).to_adapter()
        self.manifest = template.manifest
        self.shapes = {key: array.shape for key, array in template.tensors.items()}
        self._sets: dict[int, dict[str, Any]] = {}
        self._np = np

    def tensors(self, index: int) -> dict[str, Any]:
        key = index % self.distinct
        if key not in self._sets:
            rng = self._np.random.default_rng(1000 + key)
            out = {}
            for name, shape in self.shapes.items():
                std = 1.0 / shape[1] ** 0.5 if name.endswith(".A") else 0.02
                out[name] = rng.standard_normal(shape, dtype=self._np.float32) * self._np.float32(std)
            self._sets[key] = out
        return self._sets[key]

    def adapter(self, index: int) -> Any:
        import adapterkit

        return adapterkit.Adapter(self.manifest, dict(self.tensors(index)))

    def peft_state(self, index: int, adapter: str = "default") -> dict[str, Any]:
        import torch

        state = {}
        for key, array in self.tensors(index).items():
            module, param = key.rsplit(".lora.", 1)
            state[f"base_model.model.{module}.lora_{param}.{adapter}.weight"] = torch.from_numpy(array)
        return state


def traffic(kind: str, batches: int, rows: int, registered: int, s: float, seed: int) -> list[list[int]]:
    """Adapter indices per row of each batch: uniform, or Zipf(s) over a random popularity order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "zipf":
        p = np.arange(1, registered + 1, dtype=np.float64) ** -s
        p /= p.sum()
    else:
        p = np.full(registered, 1.0 / registered)
    order = rng.permutation(registered)  # popularity rank -> adapter: the popular ones are not 0, 1, 2...
    return [[int(order[k]) for k in rng.choice(registered, size=rows, p=p)] for _ in range(batches)]


# ---- one batch: prefill + greedy decode --------------------------------------------------

class Clock:
    """Wall and process-CPU seconds of the prefill and decode phases of the last batches."""

    def __init__(self, device: str):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.pre = self.dec = self.cpu_pre = self.cpu_dec = 0.0

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def prefill_decode(clock: Clock, call: Callable[..., Any], ids: Any, steps: int, enter: Any = None) -> None:
    """Prefill ``ids`` (last-token logits only) and decode ``steps`` greedy tokens with the KV cache.

    ``enter``: a context manager entered first and timed with the prefill (the pool's page-ins).
    """
    clock.sync()
    c0, t0 = time.process_time(), time.perf_counter()
    with enter if enter is not None else _null():
        out = call(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        clock.sync()
        c1, t1 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            out = call(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        clock.sync()
    clock.pre += t1 - t0
    clock.cpu_pre += c1 - c0
    clock.dec += time.perf_counter() - t1
    clock.cpu_dec += time.process_time() - c1


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---- part 1: traffic ------------------------------------------------------------------------

def part_traffic(args: Any, base: Any, catalogue: Catalogue, tiny: bool) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    from adapterkit.core.runtime.pool import AdapterPool

    rows, slots, steps = args.rows, args.slots, args.generate
    clock = Clock(args.device)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, base.config.vocab_size, (rows, args.prompt), generator=gen).to(args.device)
           for _ in range(args.repeats + 1)]
    peft_config = LoraConfig(r=catalogue.rank, lora_alpha=catalogue.rank, target_modules=args.targets)

    def pool_of(names: list[int]) -> Any:
        pool = AdapterPool(sharing(base), max_adapters=slots, max_rank=catalogue.rank, target_modules=args.targets)
        for index in names:
            pool.load(f"t{index}", catalogue.adapter(index))
        return pool

    contenders: dict[str, Callable[[int], dict[str, Any]]] = {}
    labels: dict[str, tuple[str, str]] = {}  # name -> (registered, traffic)

    def add(name: str, registered: str, kind: str, fn: Callable[[int], dict[str, Any]]) -> None:
        contenders[name], labels[name] = fn, (registered, kind)

    add("base model alone", "-", "-", lambda b: prefill_decode(clock, base, ids[b], steps) or {})
    resident_names = [f"t{i % slots}" for i in range(rows)]
    resident = pool_of(list(range(slots)))
    add(f"{slots} resident adapters (AdapterPool)", str(slots), f"{min(rows, slots)} distinct per batch",
        lambda b: prefill_decode(clock, resident.model, ids[b], steps, resident.routed(resident_names, rows)) or {})
    correctness: list[str] = []
    for registered in args.registered:
        kinds = ["uniform"] if registered == 1 else ["uniform", "zipf"]
        batches = {kind: traffic(kind, args.warm + args.repeats + 1, rows, registered, args.zipf, seed)
                   for seed, kind in enumerate(kinds)}
        progress(f"registering {registered} adapters")
        start = time.perf_counter()
        pool = pool_of(list(range(registered)))
        register_s = time.perf_counter() - start
        loaded_all = registered <= args.peft_loaded_max
        peft = get_peft_model(sharing(base), peft_config, adapter_name="t0").eval()
        if loaded_all:
            for index in range(1, registered):
                peft.add_adapter(f"t{index}", peft_config)
            for index in range(registered):
                peft.load_state_dict(catalogue.peft_state(index, f"t{index}"), strict=False)
        else:
            peft.load_state_dict(catalogue.peft_state(0, "t0"), strict=False)
        for kind in kinds:
            with torch.inference_mode():  # warm the LRU to its steady state (page-ins do not depend on tokens)
                for names in batches[kind][:args.warm]:
                    pool(input_ids=ids[0][:, :1], adapter_names=[f"t{i}" for i in names], use_cache=False)
            measured = batches[kind][args.warm:]
            add(f"AdapterPool, {registered} registered / {slots} slots, {kind}", str(registered), kind,
                _paged(clock, pool, measured, ids, steps))
            if loaded_all:
                add(f"PEFT, {registered} loaded, adapter_names=, {kind}", str(registered), kind,
                    _peft_mixed(clock, peft, measured, ids, steps))
            else:
                add(f"PEFT swapping, {registered} registered, {kind}", str(registered), kind,
                    _peft_swap(clock, peft, catalogue, peft_config, hotswap_adapter_from_state_dict, measured, ids,
                               steps))
        correctness.append(_check(pool, peft, loaded_all, catalogue, ids[0], registered, register_s))
    results = _alternate(contenders, clock, args.repeats)
    return _traffic_report(args, results, labels, correctness, rows, slots, steps)


def _paged(clock: Clock, pool: Any, batches: list[list[int]], ids: list[Any], steps: int) -> Callable[[int], dict]:
    def run(b: int) -> dict[str, Any]:
        names = [f"t{i}" for i in batches[b]]
        before = pool.stats.as_dict()
        prefill_decode(clock, pool.model, ids[b], steps, pool.routed(names, len(names)))
        after = pool.stats.as_dict()
        return {"distinct": len(set(names)), "page_ins": after["misses"] - before["misses"],
                "page_in_ms": 1000 * (after["page_in_seconds"] - before["page_in_seconds"])}
    return run


def _peft_mixed(clock: Clock, peft: Any, batches: list[list[int]], ids: list[Any], steps: int) -> Callable:
    def run(b: int) -> dict[str, Any]:
        names = [f"t{i}" for i in batches[b]]
        prefill_decode(clock, lambda **kw: peft(**kw, adapter_names=names), ids[b], steps)
        return {"distinct": len(set(names))}
    return run


def _peft_swap(clock: Clock, peft: Any, catalogue: Catalogue, config: Any, hotswap: Callable,
               batches: list[list[int]], ids: list[Any], steps: int) -> Callable:
    import torch

    def run(b: int) -> dict[str, Any]:
        groups: dict[int, list[int]] = {}
        for row, index in enumerate(batches[b]):
            groups.setdefault(index, []).append(row)
        swap = 0.0
        for index, rows in groups.items():
            state = catalogue.peft_state(index, "t0")  # prepared in host memory, like the pool's registry
            clock.sync()
            start, c0 = time.perf_counter(), time.process_time()
            hotswap(peft, state, "t0", config)
            clock.sync()
            took = time.perf_counter() - start
            swap += took
            clock.pre += took
            clock.cpu_pre += time.process_time() - c0
            prefill_decode(clock, peft, ids[b][torch.tensor(rows, device=ids[b].device)], steps)
        return {"distinct": len(groups), "swap_ms": 1000 * swap}
    return run


def _check(pool: Any, peft: Any, loaded_all: bool, catalogue: Catalogue, ids: Any, registered: int,
           register_s: float) -> str:
    """The pool's logits against PEFT's on the same rows (after paging), before any timing."""
    import torch

    picks = list(range(min(registered, 4)))
    names = [f"t{i}" for i in picks]
    with torch.inference_mode():
        ours = pool(input_ids=ids[:len(picks), :8], adapter_names=names, use_cache=False).logits.float()
        if loaded_all:
            theirs = peft(input_ids=ids[:len(picks), :8], adapter_names=names, use_cache=False).logits.float()
        else:
            from peft.utils.hotswap import hotswap_adapter_from_state_dict

            parts = []
            for row, index in enumerate(picks):
                hotswap_adapter_from_state_dict(peft, catalogue.peft_state(index, "t0"), "t0",
                                                peft.peft_config["t0"])
                parts.append(peft(input_ids=ids[row:row + 1, :8], use_cache=False).logits.float())
            theirs = torch.cat(parts)
    return (f"{registered} registered: registering took {register_s:.2f} s; max abs logit difference to PEFT "
            f"on {len(picks)} rows {float((ours - theirs).abs().max()):.2e}")


def _alternate(contenders: dict[str, Callable[[int], dict]], clock: Clock, repeats: int) -> dict[str, list[dict]]:
    import torch

    results: dict[str, list[dict]] = {name: [] for name in contenders}
    with torch.inference_mode(), common.quiet_gc():
        for b in range(repeats + 1):
            for name, fn in contenders.items():
                gc.collect()
                clock.reset()
                extra = fn(b) or {}
                row = {"pre": clock.pre, "dec": clock.dec, "cpu_pre": clock.cpu_pre, "cpu_dec": clock.cpu_dec, **extra}
                progress(f"  batch {b}{' (warm-up)' if b == 0 else ''}: {name}: prefill {clock.pre:.3f} s, "
                         f"decode {clock.dec:.3f} s, {extra}")
                if b:
                    results[name].append(row)
    return results


def _traffic_report(args: Any, results: dict[str, list[dict]], labels: dict[str, tuple[str, str]],
                    correctness: list[str], rows: int, slots: int, steps: int) -> list[str]:
    prompt_tokens, new_tokens = rows * args.prompt, rows * steps
    tokens = prompt_tokens + new_tokens
    headers = ["contender", "registered", "traffic", "prefill tok/s", "decode tok/s",
               "tok/s (min / **median** / max)", "tok per CPU-s", "per batch"]
    table = []
    for name, runs in results.items():
        pre = statistics.median(prompt_tokens / r["pre"] for r in runs)
        dec = statistics.median(new_tokens / r["dec"] for r in runs) if steps else float("nan")
        total = [tokens / (r["pre"] + r["dec"]) for r in runs]
        cpu = statistics.median(tokens / (r["cpu_pre"] + r["cpu_dec"]) for r in runs)
        notes = []
        for key, label in (("distinct", "distinct adapters"), ("page_ins", "page-ins"),
                           ("page_in_ms", "ms paging"), ("swap_ms", "ms swapping")):
            if key in runs[0]:
                notes.append(f"{statistics.median(r[key] for r in runs):.1f} {label}")
        lo, mid, hi = common.stats(total)
        table.append([name, *labels[name], f"{pre:.0f}", f"{dec:.1f}", f"{lo:.0f} / **{mid:.0f}** / {hi:.0f}",
                      f"{cpu:.0f}", ", ".join(notes)])
    lines = [common.table(headers, table), ""]

    def median_time(name: str, cpu: bool = False) -> float:
        keys = ("cpu_pre", "cpu_dec") if cpu else ("pre", "dec")
        return statistics.median((r[keys[0]] + r[keys[1]]) / tokens for r in results[name])

    resident = f"{slots} resident adapters (AdapterPool)"
    for registered in args.registered:
        for kind in ("zipf", "uniform"):
            ours = f"AdapterPool, {registered} registered / {slots} slots, {kind}"
            if ours not in results:
                continue
            peer = next((n for n in results if labels[n] == (str(registered), kind) and n.startswith("PEFT")), None)
            target = registered == max(args.registered) and kind == "zipf" and registered > slots
            value = median_time(ours) / median_time(resident)
            lines.append(common.ratio_line(
                f"{registered} registered / {slots} slots, {kind}: paging, time per token", value,
                1.25 if target else None, of=f"{slots} resident adapters",
                note=f"throughput {1 / value:.2f}x theirs; by CPU time {median_time(ours, True) / median_time(resident, True):.3f}x"))
            if peer:
                value = median_time(ours) / median_time(peer)
                swapping = "swapping" in peer
                lines.append(common.ratio_line(
                    f"{registered} registered / {slots} slots, {kind}: vs PEFT, time per token", value,
                    0.25 if target and swapping else None,
                    of="PEFT swapping" if swapping else f"PEFT ({registered} loaded, adapter_names=)",
                    note=f"throughput {1 / value:.2f}x theirs; by CPU time "
                         f"{median_time(ours, True) / median_time(peer, True):.3f}x"))
    lines += ["", *[f"- correctness: {text}" for text in correctness]]
    return lines


# ---- part 2: one decode step --------------------------------------------------------------

def part_decode(args: Any, base: Any, catalogue: Catalogue) -> list[str]:
    import torch

    from adapterkit.core.runtime.pool import AdapterPool

    rows, steps = args.decode_rows, args.decode_steps
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (rows, args.prompt), generator=gen).to(args.device)
    kernels = ["gather"]
    if args.device == "cuda":
        try:
            import adapterkit.core.runtime.lora_triton  # noqa: F401
            kernels.append("triton")
        except ImportError as exc:
            progress(f"no Triton: {exc}")
    contenders: dict[str, Callable[[], Any]] = {}
    clock = Clock(args.device)
    pools = {}
    for count in args.decode_adapters:
        pool = AdapterPool(sharing(base), max_adapters=count, max_rank=catalogue.rank, target_modules=args.targets)
        for index in range(count):
            pool.load(f"t{index}", catalogue.adapter(index))
        pools[count] = pool
    contenders["base model alone"] = lambda: prefill_decode(clock, base, ids, steps)
    for count, pool in pools.items():
        names = [f"t{i % count}" for i in range(rows)]
        for kernel in kernels:
            def run(pool: Any = pool, names: list[str] = names, kernel: str = kernel) -> None:
                pool.kernel = kernel
                prefill_decode(clock, pool.model, ids, steps, pool.routed(names, rows))
            contenders[f"AdapterPool, {count} adapters, {kernel}"] = run
    times = {}
    with torch.inference_mode():
        for round_ in range(args.repeats + 1):
            for name, fn in contenders.items():
                clock.reset()
                fn()
                progress(f"  round {round_}{' (warm-up)' if not round_ else ''}: {name}: prefill {clock.pre:.4f} s, "
                         f"decode step {clock.dec / max(steps, 1):.5f} s")
                if round_:
                    times.setdefault(name, []).append((clock.pre, clock.dec / max(steps, 1)))
    graphs = _decode_graphs(args, base, pools, ids, kernels) if args.device == "cuda" and not args.no_graphs else {}
    base_pre = statistics.median(t[0] for t in times["base model alone"])
    base_step = statistics.median(t[1] for t in times["base model alone"])
    table = []
    for name, values in times.items():
        pre, step = [statistics.median(v[i] for v in values) for i in (0, 1)]
        table.append([name, "eager", f"{pre * 1000:.1f} ms ({pre / base_pre:.3f}x)",
                      f"{step * 1000:.2f} ms ({step / base_step:.3f}x)"])
    graph_base = graphs.get("base model alone")
    for name, step in graphs.items():
        if name != "base model alone":
            ratio = f" ({step / graph_base:.3f}x)" if isinstance(step, float) and isinstance(graph_base, float) else ""
            table.append([name, "CUDA graphs", "-", f"{step * 1000:.2f} ms{ratio}" if isinstance(step, float)
                          else step])
        else:
            table.append([name, "CUDA graphs", "-", f"{step * 1000:.2f} ms" if isinstance(step, float) else step])
    lines = [common.table(["contender", "mode", "prefill (vs base)", "decode step (vs base)"], table), ""]
    for count in args.decode_adapters:
        for kernel in kernels:
            name = f"AdapterPool, {count} adapters, {kernel}"
            step = statistics.median(v[1] for v in times[name])
            target = 1.15 if args.device == "cuda" and count == max(args.decode_adapters) else None
            lines.append(common.ratio_line(f"decode step, {count} adapters, {kernel}, eager", step / base_step,
                                           None, of="the base's"))
            graph = graphs.get(f"{name}, compiled")
            if isinstance(graph, float) and isinstance(graph_base, float):
                lines.append(common.ratio_line(f"decode step, {count} adapters, {kernel}, CUDA graphs",
                                               graph / graph_base, target, of="the base's (CUDA graphs)"))
    return lines


def _decode_graphs(args: Any, base: Any, pools: dict[int, Any], ids: Any, kernels: list[str]) -> dict[str, Any]:
    """Median seconds of one decode step replayed from a CUDA graph (static KV cache), or the error text."""
    import torch
    from transformers import StaticCache

    rows, length = ids.shape
    out: dict[str, Any] = {}

    def measure(label: str, make_step: Callable[[], Callable[..., Any]], model: Any, enter: Callable[[], Any]) -> None:
        try:
            step = make_step()
            cache = StaticCache(config=model.config, max_cache_len=length + args.decode_steps + 8)
            with torch.inference_mode(), enter():
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = ids[:, -1:].clone()
            times = []
            for i in range(args.decode_steps):
                position = torch.tensor([length + i], device=ids.device)
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.inference_mode():
                    logits = step(input_ids=token, past_key_values=cache, cache_position=position,
                                  use_cache=True).logits
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                token = logits[:, -1:].argmax(-1)
            out[label] = statistics.median(times[3:]) if len(times) > 4 else statistics.median(times)
        except Exception as exc:  # reported in the table: the eager numbers stand either way
            out[label] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        progress(f"  CUDA graphs: {label}: {out[label]}")

    options = {"mode": "reduce-overhead"} if args.compile_backend == "inductor" else {"backend": "cudagraphs"}
    compiled_base = torch.compile(base, **options)
    measure("base model alone", lambda: compiled_base, base, _null)
    largest = max(pools)
    for count, pool in pools.items():
        names = [f"t{i % count}" for i in range(rows)]
        # each compile traces the whole model: the fast kernel at every count, the gather path at the largest
        for kernel in [k for k in kernels if k == kernels[-1] or count == largest]:
            def make(pool: Any = pool, kernel: str = kernel, names: list[str] = names) -> Callable[..., Any]:
                pool.kernel = kernel
                pool.compile(**options)
                return lambda **kw: pool(**kw, adapter_names=names)
            measure(f"AdapterPool, {count} adapters, {kernel}, compiled", make, pools[count].model,
                    lambda pool=pool, names=names: pool.routed(names, rows))
    return out


# ---- main -------------------------------------------------------------------------------------

def progress(text: str) -> None:
    common.progress(text)


def run(args: Any) -> str:
    import torch

    threads = common.set_threads(args.threads) if args.device == "cpu" else torch.get_num_threads()
    started = time.perf_counter()
    with common.workdir(args, "bench-serve-") as work:
        base_path = None if args.shape else common.base_of(args, work)
        base = load_base(args, base_path)
        label = f"{args.shape} shape, random weights" if args.shape else common.base_label(args, base_path)
        catalogue = Catalogue(base, args.targets, args.rank, args.distinct)
        load_start = common.machine()["load_average"]
        lines = [f"LoRA r={args.rank} (alpha {args.rank}) on {', '.join(args.targets)}; {args.distinct} distinct random "
                 f"weight sets cycled over the registered names; contenders alternate batch by batch, "
                 f"{args.repeats} measured batches after 1 warm-up; min / **median** / max.", ""]
        if not args.skip_traffic:
            lines += [f"#### Traffic: {args.rows} requests per batch, each {args.prompt} prompt tokens + "
                      f"{args.generate} generated tokens (greedy, KV cache); {args.slots} device slots; Zipf s="
                      f"{args.zipf}; LRU warmed with {args.warm} batches", ""]
            lines += part_traffic(args, base, catalogue, args.tiny)
            lines.append("")
        if not args.skip_decode:
            lines += [f"#### Decode step: {args.decode_rows} rows x {args.prompt} prompt tokens, "
                      f"{args.decode_steps} decode steps, row i on adapter i % N (all resident)", ""]
            lines += part_decode(args, base, catalogue)
    machine = common.machine_line(threads if args.device == "cpu" else None)  # after the runs: the load at the end
    lines = [f"### Serving at scale: {label}, {args.dtype}, {args.device}", "",
             machine.removesuffix(".") + f" ({load_start} at the start)." + (
                 f" GPU: {torch.cuda.get_device_name()}." if args.device == "cuda" else ""), "", *lines]
    lines += ["", f"`python benchmarks/bench_serve.py {' '.join(args.argv)}`: "
                  f"{time.perf_counter() - started:.0f} s in all."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, repeats=3, tiny_repeats=1, profile=False)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 (default on the CPU) or bfloat16 (default on CUDA)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of a base folder")
    parser.add_argument("--registered", default=None, help="comma-separated N (default 1,100,1000)")
    parser.add_argument("--slots", type=int, default=None, help="device slots (default 16)")
    parser.add_argument("--rows", type=int, default=None, help="requests per batch (default 16)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per request (default 64)")
    parser.add_argument("--generate", type=int, default=None, help="generated tokens per request (default 64)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the skewed traffic")
    parser.add_argument("--warm", type=int, default=None, help="warm-up batches of the LRU (default 40)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(QKVO), help="comma-separated module suffixes")
    parser.add_argument("--distinct", type=int, default=64, help="distinct weight sets cycled over the names")
    parser.add_argument("--peft-loaded-max", type=int, default=None,
                        help="PEFT loads every adapter up to this N (adapter_names=), swaps above it (default 100)")
    parser.add_argument("--decode-rows", type=int, default=None, help="rows of the decode-step part (default 16)")
    parser.add_argument("--decode-adapters", default=None, help="comma-separated adapter counts (default 16,128)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps timed (default 16)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph measurements")
    parser.add_argument("--compile-backend", default="cudagraphs", choices=["cudagraphs", "inductor"],
                        help='CUDA graphs through torch.compile(backend="cudagraphs") (eager kernels, quick to build) '
                             'or mode="reduce-overhead" (inductor)')
    parser.add_argument("--skip-traffic", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    defaults = ({"registered": "1,10,40", "slots": 4, "rows": 4, "prompt": 8, "generate": 4, "warm": 4,
                 "peft_loaded_max": 10, "decode_rows": 6, "decode_adapters": "2,4", "decode_steps": 3} if args.tiny else
                {"registered": "1,100,1000", "slots": 16, "rows": 16, "prompt": 64, "generate": 64, "warm": 40,
                 "peft_loaded_max": 100, "decode_rows": 16, "decode_adapters": "16,128", "decode_steps": 16})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rows > args.slots:
        parser.error(f"--rows {args.rows} > --slots {args.slots}: a batch would name more distinct adapters than there "
                     "are slots (a server admits at most --slots distinct adapters per batch)")
    args.registered = [int(v) for v in str(args.registered).split(",")]
    args.decode_adapters = [int(v) for v in str(args.decode_adapters).split(",")]
    args.targets = args.targets.split(",")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = common.repeats_of(args)
    common.quiet()
    common.emit(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
