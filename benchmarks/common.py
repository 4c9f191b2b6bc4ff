"""Shared helpers of the benchmark scripts: timing, child processes, tables, models, adapters.

Conventions every script follows (and :mod:`run_all` relies on):

- argparse; ``--tiny`` runs a tiny seeded llama (seconds; what CI runs), the default
  is the real SmolLM2-135M in float32 (:func:`adapterkit.core.demo.real_models.smollm2_path`);
- contenders alternate (A B C A B C ...) after a warm-up round, so that caches,
  allocator state and thermal state favour no one; min / **median** / max;
- ``torch.set_num_threads`` is fixed and printed (``--threads``, default: all cores);
- the report is markdown on stdout, progress on stderr;
- a ratio is printed by :func:`ratio_line`::

      - <label>: **0.123x** PEFT (target <= 0.5x: meets)

  which :mod:`run_all` collects into the summary table of docs/benchmarks.md.
- ``--profile`` adds the top cProfile entries of the adapterkit side.
"""

from __future__ import annotations

import contextlib
import cProfile
import datetime as dt
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the seven linear kinds of a Llama block (210 modules in SmolLM2-135M's 30 layers)
LINEAR_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
             "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def quiet() -> None:
    """Offline, no progress bars, no warnings: set before transformers is imported."""
    for name, value in CHILD_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")


# ---- arguments and threads -----------------------------------------------------------

def parser(doc: str, *, repeats: int, tiny_repeats: int = 2, profile: bool = True) -> Any:
    """An ArgumentParser with the options every scenario script shares."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny seeded llama instead of SmolLM2 (seconds; CI smoke)")
    p.add_argument("--base", type=Path, help="a local HF causal LM folder (default: SmolLM2-135M, float32)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"measured rounds per contender after a warm-up (default {repeats}; --tiny: {tiny_repeats})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temporary folder)")
    if profile:
        p.add_argument("--profile", action="store_true", help="add the top cProfile entries of the adapterkit side")
    p.set_defaults(default_repeats=repeats, tiny_repeats=tiny_repeats)
    return p


def repeats_of(args: Any) -> int:
    return args.repeats or (args.tiny_repeats if args.tiny else args.default_repeats)


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (default: every core) and give child processes the same."""
    import torch

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        CHILD_ENV[name] = str(threads)
    return threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare numbers (no torch import)."""
    versions = {}
    for name in ("torch", "transformers", "peft"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load_average": load, **versions}


def machine_line(threads: int | None = None) -> str:
    info = machine()
    parts = [f"{info['cpu']}, {info['cores']} cores", f"Python {info['python']}"]
    parts += [f"{name} {info[name]}" for name in ("torch", "transformers", "peft") if name in info]
    if threads:
        parts.append(f"torch threads {threads}")
    parts.append(f"load average {info['load_average']} at the end")
    return "; ".join(parts) + "."


# ---- timing ----------------------------------------------------------------------------

def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              between: Callable[[str], Any] | None = None) -> dict[str, list[float]]:
    """Seconds of each contender, in turn (A B C A B C ...), ``repeats`` rounds after ``warmup`` rounds.

    ``between(name)`` runs untimed before each call (e.g. a fresh model for an injection).
    Garbage is collected before each call and the collector is off during it (as ``timeit``
    does); the objects alive at the start are frozen first, so that collecting costs
    microseconds instead of a full pass over torch's and transformers' millions of objects.
    """
    from adapterkit.core.bench.measure import timed_call  # the one adapterkit bench uses (imports torch)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    with quiet_gc():
        for round_ in range(warmup + repeats):
            for name, fn in contenders.items():
                if between is not None:
                    between(name)
                times_call = timed_call(fn)
                if round_ >= warmup:
                    times[name].append(times_call)
    return times


_FROZEN = [0]


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect once, then freeze what is alive (``gc.freeze``) for the block; unfrozen after (re-entrant)."""
    if not _FROZEN[0]:
        gc.collect()
        gc.freeze()
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1
        if not _FROZEN[0]:
            gc.unfreeze()


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: Sequence[float], unit: str = "s", digits: int = 3) -> str:
    lo, mid, hi = stats(values)
    return f"{lo:.{digits}f} / **{mid:.{digits}f}** / {hi:.{digits}f} {unit}".rstrip()


def ratio(ours: Sequence[float] | float, theirs: Sequence[float] | float) -> float:
    a = statistics.median(ours) if isinstance(ours, Sequence) else ours
    b = statistics.median(theirs) if isinstance(theirs, Sequence) else theirs
    return a / b if b else float("nan")


def ratio_line(label: str, value: float, target: float | None = None, of: str = "PEFT", note: str = "") -> str:
    """``- label: **0.123x** PEFT (target <= 0.5x: meets)``; run_all's summary parses this shape."""
    if value != value:  # nan: no meaningful ratio
        text = f"- {label}: n/a" + (f" (target <= {target}x: not measurable)" if target is not None else "")
        return text + (f"; {note}" if note else "")
    text = f"- {label}: **{value:.3f}x** {of}"
    if target is not None:
        text += f" (target <= {target}x: {'meets' if value <= target else 'misses'})"
    return text + (f"; {note}" if note else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def profile_top(fn: Callable[[], Any], runs: int = 1, top: int = 25, sort: str = "tottime") -> str:
    """The top ``top`` entries (by own time) of cProfile over ``runs`` calls of ``fn``, as a fenced block."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        fn()
    profiler.disable()
    out = io.StringIO()
    stats_ = pstats.Stats(profiler, stream=out)
    stats_.strip_dirs().sort_stats(sort).print_stats(top)
    text = out.getvalue().strip()
    body = text[text.find("ncalls"):] if "ncalls" in text else text
    head = next((line.strip() for line in text.splitlines() if "function calls" in line), "")
    return f"```text\n{head}\n\n{body}\n```"


# ---- child processes -------------------------------------------------------------------

# A minimal launcher (stdlib only, no site) forks and execs the measured command and reports
# the kernel's accounting of that one process. Linux carries a process's peak RSS across
# fork + exec, so a child forked straight from a torch-loaded script would report the
# script's memory as its own; this launcher is small, so its child starts from a few MB.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as handle:
    json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_kb": usage.ru_maxrss,
               "status": os.waitstatus_to_exitcode(status)}, handle)
"""


def run_process(argv: Sequence[str], env: dict[str, str] | None = None, check: bool = True) -> dict[str, Any]:
    """Run ``argv`` in a fresh process: wall and CPU (user + sys) seconds, peak RSS (MB), stdout, exit status.

    Bytecode caching is on in the child (``PYTHONDONTWRITEBYTECODE`` removed), as for any
    installed package: the warm-up run writes the caches, the measured runs read them.
    """
    env = {k: v for k, v in {**os.environ, **CHILD_ENV, **(env or {})}.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.NamedTemporaryFile(suffix=".json") as record:
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, record.name, *map(str, argv)], env=env,
                              capture_output=True)
        measured = json.loads(Path(record.name).read_text() or "{}")
    status = measured.get("status", proc.returncode)
    if check and (proc.returncode != 0 or status != 0):
        sys.stderr.write(proc.stderr.decode(errors="replace")[-4000:])
        raise SystemExit(f"benchmark child {' '.join(map(str, argv))[:200]} failed with exit status {status}")
    return {"wall": measured.get("wall", float("nan")), "cpu": measured.get("cpu", float("nan")),
            "rss_mb": measured.get("rss_kb", 0) / 1024, "status": status,
            "stdout": proc.stdout.decode(errors="replace"), "stderr": proc.stderr.decode(errors="replace")}


def run_code(code: str, *args: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -c code args`` in a fresh process (see :func:`run_process`)."""
    return run_process([sys.executable, "-c", code, *map(str, args)], env=env)


def console_script(name: str = "adapterkit") -> list[str]:
    """The installed console script beside this interpreter, else ``python -m adapterkit``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.is_file() else [sys.executable, "-m", "adapterkit"]


# ---- bases, inputs and adapters ---------------------------------------------------------

@contextlib.contextmanager
def workdir(args: Any, prefix: str) -> Iterator[Path]:
    """``--workdir`` (kept) or a temporary folder (removed at the end)."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tiny_base(folder: Path) -> Path:
    """A seeded 2-layer llama (hidden 64, 4 heads, 2 kv heads) saved as a local HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = folder / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def base_of(args: Any, folder: Path) -> Path:
    """``--base``, else the tiny llama with ``--tiny``, else SmolLM2-135M (prepared once, cached)."""
    if args.base is not None:
        return args.base
    if args.tiny:
        return tiny_base(folder)
    from adapterkit.core.demo.real_models import smollm2_path

    return smollm2_path(echo=lambda text: print(text, file=sys.stderr))


def base_label(args: Any, base: Path) -> str:
    return "tiny seeded llama (2 layers, hidden 64)" if args.tiny and args.base is None else base.name


def load_model(base: Path) -> Any:
    """The base in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def token_inputs(model: Any, batch: int, length: int, seed: int = 0) -> dict[str, Any]:
    """Seeded random token ids and an all-ones mask (the same for every contender)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_lora_pair(base: Path, folder: Path, r: int = 16, alpha: int = 32, targets: Sequence[str] | str = LINEAR_KINDS,
                   seed: int = 0, name: str = "lora") -> tuple[Path, Path]:
    """One random LoRA adapter (trained-like: B ~ N(0, 0.02)) as (PEFT folder, adapterkit folder), same weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    import adapterkit

    peft_dir, native_dir = folder / f"peft-{name}", folder / f"adapterkit-{name}"
    if (peft_dir / "adapter_config.json").is_file() and (native_dir / "adapter.json").is_file():
        return peft_dir, native_dir
    torch.manual_seed(seed)
    modules = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.02)
    shutil.rmtree(peft_dir, ignore_errors=True)
    model.save_pretrained(peft_dir)
    adapterkit.convert(peft_dir, native_dir, to="adapterkit", from_format="peft", overwrite=True)
    return peft_dir, native_dir


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def report_head(title: str, base_text: str, threads: int | None, repeats: int, extra: str = "") -> list[str]:
    """The heading and the lines every report starts with."""
    lines = [f"### {title}", "", f"Base: {base_text}, float32. {repeats} measured round(s) per contender, "
             "alternating, after one warm-up round; min / **median** / max." + (f" {extra}" if extra else ""),
             "", machine_line(threads), ""]
    return lines


def emit(text: str) -> None:
    """Print the report on stdout (flushed; progress goes to stderr)."""
    sys.stdout.write(text.rstrip() + "\n")
    sys.stdout.flush()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def torch_profile_top(fn: Callable[[], Any], top: int = 15) -> str:
    """The top ``top`` torch operators by own CPU time over one call of ``fn``, as a fenced block."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"```text\n{text.strip()}\n```"


def profiles(fn: Callable[[], Any], what: str) -> list[str]:
    """Markdown: cProfile (Python-level own time) and torch profiler (operators) of one call of ``fn``."""
    fn()  # warm
    return ["", f"#### profile: {what}, Python level (cProfile, own time)", "", profile_top(fn),
            "", f"#### profile: {what}, torch operators (own CPU time)", "", torch_profile_top(fn)]


PROFILE_CLI = """
import cProfile, sys
record, args = sys.argv[1], sys.argv[2:]
sys.argv = ["adapterkit", *args]
from adapterkit.cli.main import main
profiler = cProfile.Profile()
try:
    profiler.runcall(main)
except SystemExit:
    pass
profiler.dump_stats(record)
"""


def profile_cli(*cli_args: Any, top: int = 25) -> str:
    """cProfile of one whole ``adapterkit ...`` command in a fresh process (its imports included),
    the top entries by cumulative time, as a fenced block."""
    with tempfile.NamedTemporaryFile(suffix=".prof") as record:
        run_code(PROFILE_CLI, record.name, *cli_args)
        text = io.StringIO()
        pstats.Stats(record.name, stream=text).strip_dirs().sort_stats("cumulative").print_stats(top)
    body = text.getvalue()
    return "```text\n" + body[body.find("ncalls"):].strip() + "\n```"
