"""Multi-adapter serving benchmark: ``adapterkit.AdapterPool`` side by side with PEFT, in one process.

Two measurements, each alternating the contenders (A B C A B C ...) so that caches
and thermal state favour no one, reported as min / median / max and as ratios:

1. **Mixed batch.** 8 LoRA adapters (r=16 on q/k/v/o by default) loaded into one
   base model; a batch of 16 rows x 64 tokens, row ``i`` using adapter ``i % 8``
   (interleaved: no two neighbouring rows share an adapter). Contenders: the base
   model alone (no adapter code at all), PEFT's ``model(..., adapter_names=...)``,
   and the pool's gather kernel (per-row gathered weights + ``bmm``: what ``auto``
   runs on the CPU; the segment kernel was retired in issue 16). Throughput in
   tokens/s and the overhead over the base; the target is an overhead of at most a
   third of PEFT's. Paging many adapters through few slots: ``bench_serve.py``.
2. **Hot-swap from disk** (reading the file included) of an r=16 adapter into a
   loaded model: PEFT's ``load_adapter`` (a new name), PEFT's
   ``peft.utils.hotswap.hotswap_adapter`` (in place), and ``pool.load`` of an existing
   name (in place), from the adapterkit folder and from the same adapter in PEFT's
   format. Target: ``pool.load`` <= 0.5x ``hotswap_adapter``.

Usage::

    python benchmarks/bench_pool.py                    # SmolLM2-135M, float32, 2 threads
    python benchmarks/bench_pool.py --targets all-linear
    python benchmarks/bench_pool.py --tiny             # a tiny random llama (seconds; CI smoke)
    python benchmarks/bench_pool.py --profile          # + torch profiler of one pool forward
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)
warnings.filterwarnings("ignore")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---- setup ------------------------------------------------------------------------

def tiny_base(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder / "tiny-base")
    return folder / "tiny-base"


def load_base(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapters(base: Path, folder: Path, count: int, r: int, targets: Any) -> list[tuple[Path, Path]]:
    """``count`` random LoRA adapters: (PEFT folder, adapterkit folder) each, the same weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    import adapterkit

    out = []
    for index in range(count):
        torch.manual_seed(index)
        config = LoraConfig(r=r, lora_alpha=2 * r if index % 2 else r, target_modules=targets,
                            init_lora_weights=False)
        model = get_peft_model(load_base(base), config)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and "default" in module.lora_B:
                    module.lora_B["default"].weight.normal_(0, 0.02)  # a trained-like, small update
        peft_dir, native_dir = folder / f"peft-{index}", folder / f"adapterkit-{index}"
        model.save_pretrained(peft_dir)
        adapterkit.convert(peft_dir, native_dir, to="adapterkit", from_format="peft")
        out.append((peft_dir, native_dir))
        del model
    return out


# ---- measuring --------------------------------------------------------------------

def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each contender, run in turn (A B C A B C ...) ``repeats`` times after ``warmup`` rounds.

    ``cpu``, when given, receives the process CPU seconds of each call (user + system, all threads).
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            print(f"  round {round_}{' (warm-up)' if round_ < warmup else ''}: {name}: {elapsed:.3f} s wall, "
                  f"{elapsed_cpu:.3f} s CPU", file=sys.stderr, flush=True)
            if round_ >= warmup:
                times[name].append(elapsed)
                if cpu is not None:
                    cpu.setdefault(name, []).append(elapsed_cpu)
    return times


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


# ---- the benchmark ------------------------------------------------------------------

def run(args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, tmp: Path) -> str:
    import torch
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    from adapterkit.core.runtime.pool import AdapterPool  # adapterkit.AdapterPool

    torch.set_num_threads(args.threads)
    if args.tiny:
        base_path = tiny_base(tmp)
        rows, tokens, repeats = 16, 16, args.repeats or 5
    else:
        from adapterkit.core.demo.real_models import smollm2_path

        base_path = Path(args.base) if args.base else smollm2_path(echo=lambda m: print(m, file=sys.stderr))
        rows, tokens, repeats = args.rows, args.tokens, args.repeats or 5
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    n = args.adapters
    print(f"making {n} adapters (r={args.rank}, targets={args.targets}) in {tmp}", file=sys.stderr)
    adapters = make_adapters(base_path, tmp, n, args.rank, targets)
    names = [f"a{i}" for i in range(n)]

    base = load_base(base_path)
    peft_model = PeftModel.from_pretrained(load_base(base_path), adapters[0][0], adapter_name=names[0]).eval()
    for name, (peft_dir, _) in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(peft_dir, adapter_name=name)
    pooled = load_base(base_path)
    load_start = time.perf_counter()
    pool = AdapterPool(pooled, max_adapters=n, max_rank=args.rank)
    for name, (_, native_dir) in zip(names, adapters):
        pool.load(name, native_dir)
    load_all = time.perf_counter() - load_start

    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (rows, tokens), generator=generator)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    row_names = [names[i % n] for i in range(rows)]

    def pool_forward(kernel: str, names: list[str] = row_names) -> Callable[[], Any]:
        def forward() -> Any:
            pool.kernel = kernel
            return pool(**inputs, adapter_names=names).logits
        return forward

    contenders = {
        "base model alone": lambda: base(**inputs).logits,
        "PEFT adapter_names=": lambda: peft_model(**inputs, adapter_names=row_names).logits,
        "AdapterPool, gather kernel": pool_forward("gather"),
    }
    with torch.inference_mode():
        reference = contenders["PEFT adapter_names="]()
        diffs = {name: max_diff(fn(), reference) for name, fn in contenders.items() if name.startswith("AdapterPool")}
        forward_cpu: dict[str, list[float]] = {}
        load_before = os.getloadavg()[0]
        forward_times = alternate(contenders, repeats, cpu=forward_cpu)
        load_after = os.getloadavg()[0]
        profile = profile_forward(pool_forward("gather")) if args.profile else ""

    # hot-swap: adapter k's weights into the slot / PEFT adapter of a0, k cycling over 1..n-1
    cycle = {"k": 0}

    def next_k() -> int:
        cycle["k"] = cycle["k"] % (n - 1) + 1
        return cycle["k"]

    def peft_load() -> None:
        peft_model.load_adapter(adapters[next_k()][0], adapter_name="swap")

    def peft_cleanup() -> None:
        if "swap" in peft_model.peft_config:
            peft_model.delete_adapter("swap")

    swaps = {
        "PEFT load_adapter (new name)": peft_load,
        "PEFT hotswap_adapter (in place)": lambda: hotswap_adapter(peft_model, str(adapters[next_k()][0]),
                                                                   adapter_name=names[0]),
        "pool.load, adapterkit folder (in place)": lambda: pool.load(names[0], adapters[next_k()][1]),
        "pool.load, PEFT folder (in place)": lambda: pool.load(names[0], adapters[next_k()][0]),
    }
    swap_times: dict[str, list[float]] = {name: [] for name in swaps}
    with torch.inference_mode():
        for round_ in range(1 + args.swap_repeats):
            for name, fn in swaps.items():
                peft_cleanup()
                gc.collect()
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if round_:
                    swap_times[name].append(elapsed)
        peft_cleanup()
        # after the swaps both hold the same weights in a0: the outputs must agree again
        k = next_k()
        hotswap_adapter(peft_model, str(adapters[k][0]), adapter_name=names[0])
        pool.load(names[0], adapters[k][1])
        swap_diff = max_diff(pool(**inputs, adapter_names=row_names).logits,
                             peft_model(**inputs, adapter_names=row_names).logits)

    return report(args, base_path, rows, tokens, repeats, forward_times, forward_cpu, diffs, swap_times, swap_diff,
                  load_all, pool, profile, (load_before, load_after))


def profile_forward(forward: Callable[[], Any]) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def report(args: argparse.Namespace, base_path: Path, rows: int, tokens: int, repeats: int,
           forward_times: dict[str, list[float]], forward_cpu: dict[str, list[float]], diffs: dict[str, float],
           swap_times: dict[str, list[float]], swap_diff: float, load_all: float, pool: Any, profile: str,
           load: tuple[float, float]) -> str:
    import torch
    import transformers

    import peft

    tok = rows * tokens
    lines = [
        f"## AdapterPool vs PEFT ({'tiny llama' if args.tiny else base_path.name}, float32, "
        f"{torch.get_num_threads()} threads)",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{args.adapters} adapters r={args.rank} on {args.targets}; batch {rows} rows x {tokens} tokens, "
        f"row i -> adapter i % {args.adapters}; {repeats} alternating rounds after 1 warm-up.",
        "",
        f"Load average (1 min) before / after the forward rounds: {load[0]:.1f} / {load[1]:.1f} "
        f"on {os.cpu_count()} CPUs (other work on the machine inflates wall times; the CPU-time columns and the "
        "min are the steadier figures then).",
        "",
        "### Mixed batch (one forward)",
        "",
        "| contender | wall s min / median / max | tokens/s min / median / max | overhead (median wall) | "
        "overhead (min wall) | overhead (median CPU s) |",
        "|---|---|---|---|---|---|",
    ]
    base = "base model alone"
    overhead: dict[str, tuple[float, float, float]] = {}
    for name, values in forward_times.items():
        lo, mid, hi = stats(values)
        overhead[name] = (mid / statistics.median(forward_times[base]) - 1, lo / min(forward_times[base]) - 1,
                          statistics.median(forward_cpu[name]) / statistics.median(forward_cpu[base]) - 1)
        cells = " | ".join("-" if name == base else f"{o * 100:+.1f}%" for o in overhead[name])
        lines.append(f"| {name} | {lo:.3f} / **{mid:.3f}** / {hi:.3f} | {tok / hi:.0f} / **{tok / mid:.0f}** / "
                     f"{tok / lo:.0f} | {cells} |")
    peft = overhead["PEFT adapter_names="]
    lines.append("")
    peft_median = statistics.median(forward_times["PEFT adapter_names="])
    for name in [n for n in forward_times if n.startswith("AdapterPool")]:
        ratios = [o / p if p > 0 else float("nan") for o, p in zip(overhead[name], peft)]
        verdict = "meets" if ratios[0] <= 1 / 3 else "misses"
        speed = peft_median / statistics.median(forward_times[name])
        lines.append(f"- {name}: overhead over the base **{ratios[0]:.2f}x** PEFT's by median wall time "
                     f"(target <= 0.33x: {verdict}); {ratios[1]:.2f}x by min wall, {ratios[2]:.2f}x by median CPU "
                     f"time; throughput {speed:.2f}x PEFT's"
                     + (f"; max abs logit diff to PEFT {diffs[name]:.2e}" if name in diffs else ""))
    lines += [
        "",
        "### Hot-swap of an r=16 adapter from disk (file read included)",
        "",
        "| contender | seconds min / median / max | ratio to hotswap_adapter (median) |",
        "|---|---|---|",
    ]
    hot = statistics.median(swap_times["PEFT hotswap_adapter (in place)"])
    for name, values in swap_times.items():
        lo, mid, hi = stats(values)
        lines.append(f"| {name} | {lo:.4f} / **{mid:.4f}** / {hi:.4f} | {mid / hot:.2f}x |")
    pool_swap = statistics.median(swap_times["pool.load, adapterkit folder (in place)"])
    ours = pool_swap / hot
    lines += [
        "",
        f"- pool.load (adapterkit folder): **{ours:.2f}x** hotswap_adapter (target <= 0.5x: "
        f"{'meets' if ours <= 0.5 else 'misses'}); "
        f"{pool_swap / statistics.median(swap_times['PEFT load_adapter (new name)']):.2f}x load_adapter",
        f"- after the swaps, pool vs PEFT max abs logit diff: {swap_diff:.2e}",
        f"- loading all {args.adapters} adapters into a fresh pool (injection included): {load_all:.3f} s; "
        f"slots take {pool.summary()['slot_bytes'] / 2**20:.1f} MiB",
    ]
    if profile:
        lines += ["", "### torch profiler, one pool forward (gather kernel)", "", "```", profile.rstrip(), "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama (CI smoke test)")
    parser.add_argument("--base", help="a local HF causal LM folder (default: SmolLM2-135M)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(QKVO), help='comma-separated suffixes, or "all-linear"')
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=0, help="alternating rounds (default 5)")
    parser.add_argument("--swap-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="add a torch profiler table of one pool forward")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter goes to stderr, the table to stdout
        table = run(args)
    print(table)


if __name__ == "__main__":
    main()
