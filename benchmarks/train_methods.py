"""Train every built-in method on the real SmolLM2-135M with ``adapterkit train``; write docs/methods.md's table.

The task is the demo's (adapterkit.core.demo.run): write a number in words,
``"47 ->"`` -> ``" forty-seven"``, 84 training numbers and 16 held out (the
validation set, never trained on). Each method trains for ``--steps`` steps of
8 examples (sequences under 16 tokens) with :func:`adapterkit.core.train.run.train`
in its own process, so that the peak resident memory (``ru_maxrss``) is that
method's alone. The validation loss is the mean cross-entropy per completion
token (the answer and EOS) on the 16 held-out numbers: before training
(step 0) and the best evaluation (the adapter ``train`` saves). That saved
adapter is then applied to a fresh base and greedy decoding writes each
held-out answer: "exact answers" counts the ones written exactly.

Times are those of the training loop (evaluations included). Wall time
depends on what else the machine runs; CPU time (``time.process_time``: all
threads of the training process) much less so. Both are reported, with the
load average.

Usage::

    python benchmarks/train_methods.py                 # SmolLM2-135M, rewrites the table in docs/methods.md
    python benchmarks/train_methods.py --no-write      # print only
    python benchmarks/train_methods.py --methods lora,prompt --steps 50
    python benchmarks/train_methods.py --tiny          # tiny random llama, a few steps (seconds; CI smoke)
    python benchmarks/train_methods.py --render WORKDIR/results.json   # the table again, without training

Numbers in docs/methods.md come from this script's output only; they are never typed by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "methods.md"
BEGIN, END = "<!-- train_methods:begin -->", "<!-- train_methods:end -->"

#: (key, label, method, config, learning rate): one row each
METHODS: list[tuple[str, str, str, dict[str, Any], float]] = [
    ("lora", "LoRA r=8, alpha 16, all-linear", "lora", {"r": 8, "alpha": 16}, 2e-3),
    ("dora", "DoRA r=8, alpha 16, all-linear", "dora", {"r": 8, "alpha": 16}, 2e-3),
    ("qlora", "QLoRA r=8, alpha 16, NF4 base", "qlora", {"r": 8, "alpha": 16, "quant_type": "nf4"}, 2e-3),
    ("prompt", "Prompt tuning, 16 tokens (vocab init)", "prompt", {"num_virtual_tokens": 16, "init": "sample_vocab"},
     3e-2),
    ("prefix", "Prefix tuning, 16 tokens (MLP reparameterisation)", "prefix",
     {"num_virtual_tokens": 16, "prefix_projection": True}, 1e-3),
    ("bottleneck", "Bottleneck seq_bn, reduction 16", "bottleneck", {"reduction_factor": 16}, 2e-3),
]
BATCH_SIZE = 8
DEFAULT_STEPS = 40  # a few dozen: enough for every method to lower the held-out loss, minutes on a shared CPU
MAX_LENGTH = 32

WORKER = """
import json, resource, sys
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from adapterkit.core.train.run import train
result = train(spec["base"], spec["method"], spec["train"], None, config=spec["config"], lr=spec["lr"],
               max_steps=spec["steps"], batch_size=spec["batch_size"], eval_every=spec["eval_every"],
               val_data=spec["val"], max_length=spec["max_length"], seed=0, progress=False)
usage = resource.getrusage(resource.RUSAGE_SELF)
out = {k: v for k, v in result.to_dict().items() if k in (
    "trainable_parameters", "steps", "initial_val_loss", "best_val_loss", "best_step", "final_train_loss",
    "peak_rss_bytes", "evaluations", "train_seconds", "cpu_seconds")}
out["process_cpu_seconds"] = usage.ru_utime + usage.ru_stime

# held-out exact answers: the saved (best) adapter applied to a fresh base, greedy decoding
import adapterkit
from transformers import AutoModelForCausalLM, AutoTokenizer
from adapterkit.core.demo.run import greedy
tokenizer = AutoTokenizer.from_pretrained(spec["base"])
model = adapterkit.apply(result.adapter, AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)).eval()
rows = [json.loads(line) for line in open(spec["val"])]
out["exact"] = sum(greedy(model, tokenizer, r["prompt"]).strip() == r["completion"].strip() for r in rows)
out["held_out"] = len(rows)
print("RESULT " + json.dumps(out))
"""


def write_task(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    from adapterkit.core.demo.run import example, make_task

    train_numbers, held_out = make_task(seed)
    paths = []
    for name, numbers in (("train.jsonl", train_numbers), ("val.jsonl", held_out)):
        path = folder / name
        rows = [dict(zip(("prompt", "completion"), example(n), strict=True)) for n in numbers]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


def tiny_base(folder: Path) -> Path:
    """A random 2-layer llama with the character tokenizer of the tests."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import save_tiny_base

    return save_tiny_base("llama", folder / "tiny-llama")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("RESULT "):])


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ("| method | trainable parameters | val loss before | val loss after (best step) | held-out exact answers "
            "| steps | train time (wall) | CPU time | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['trainable_parameters']:,} | {r['initial_val_loss']:.3g} | "
            f"{r['best_val_loss']:.3g} ({r['best_step']}) | {r['exact']} / {r['held_out']} | {r['steps']} | "
            f"{r['train_seconds']:.0f} s | {r['cpu_seconds']:.0f} s | {r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    steps = next((r["evaluations"] for _, r in rows if "evaluations" in r), [])
    if steps:
        lines += ["", "Validation loss at each evaluation:", "",
                  "| method | " + " | ".join(f"step {e['step']}" for e in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for label, r in rows:
            if "evaluations" in r:
                lines.append(f"| {label} | " + " | ".join(f"{e['val_loss']:.3g}" for e in r["evaluations"]) + " |")
    return "\n".join(lines)


def environment(base_label: str, steps: int, threads: int, load_before: tuple[float, ...],
                load_after: tuple[float, ...], load_peak: float | None = None) -> str:
    import torch
    import transformers

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busiest = max(load_before[0], load_after[0], load_peak or 0.0)
    note = (f" The machine was shared and loaded (load average up to {busiest:.1f} on {cpus} cores): wall times "
            "are inflated by other work; CPU time is the steadier figure." if busiest > 0.75 * cpus else "")
    return (f"{base_label}, float32 on CPU ({cpus} cores, {platform.machine()}, {threads} torch thread"
            f"{'s' if threads != 1 else ''} per run), torch {torch.__version__}, "
            f"transformers {transformers.__version__}; {steps} steps of {BATCH_SIZE} examples, AdamW, "
            f"constant learning rate (per method in the script), seed 0; "
            f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
            + (f", at most {load_peak:.1f} when a method ended" if load_peak is not None else "") + "; "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}. Produced by `python benchmarks/train_methods.py`." + note)


def rewrite_doc(text: str, doc: Path = DOC) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    current = doc.read_text() if doc.exists() else ""
    if BEGIN in current and END in current:
        start, end = current.index(BEGIN), current.index(END) + len(END)
        updated = current[:start] + block + current[end:]
    else:
        updated = current.rstrip("\n") + ("\n\n" if current else "") + block + "\n"
    doc.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random llama, a few steps: a smoke run")
    parser.add_argument("--steps", type=int, help=f"steps per method (default {DEFAULT_STEPS}; 4 with --tiny)")
    parser.add_argument("--methods", help=f"comma list of {[m[0] for m in METHODS]} (default: all registered)")
    parser.add_argument("--base", help="another local HF causal LM folder with a tokenizer")
    parser.add_argument("--workdir", type=Path, help="folder for the data (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/methods.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on a shared machine OpenMP's spinning threads made "
                             "two threads 10-20x slower than one)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="rewrite the table from a results.json an earlier run left in its workdir (no training)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        text = table([(name, result) for name, result in saved["results"]]) + "\n\n" + saved["environment"]
        print(text)
        if not args.no_write:
            rewrite_doc(text)
        return 0

    from adapterkit.core.plugin.registry import default_registry

    registered = set(default_registry().methods)
    wanted = args.methods.split(",") if args.methods else [m[0] for m in METHODS]
    chosen = [m for m in METHODS if m[0] in wanted and m[2] in registered]
    skipped = [m[0] for m in METHODS if m[0] in wanted and m[2] not in registered]
    steps = args.steps or (4 if args.tiny else DEFAULT_STEPS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adapterkit-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, val_file = write_task(work)
    if args.tiny:
        base, label = tiny_base(work), "tiny random llama (smoke run)"
    elif args.base:
        base, label = Path(args.base), args.base
    else:
        from adapterkit.core.demo.real_models import SMOLLM2_NAME, smollm2_path

        base, label = smollm2_path(), f"{SMOLLM2_NAME} (135M)"

    load_before = os.getloadavg()
    loads: list[float] = []  # the 1-minute load average as each method ends
    results = []
    for key, name, method, config, lr in chosen:
        spec = {"base": str(base), "method": method, "config": config, "lr": lr, "steps": steps,
                "batch_size": BATCH_SIZE, "eval_every": max(1, steps // 4), "max_length": MAX_LENGTH,
                "train": str(train_file), "val": str(val_file), "threads": args.threads}
        started = time.perf_counter()
        result = run_one(spec)
        print(f"{key}: {time.perf_counter() - started:.0f} s "
              + (result["error"] if "error" in result else
                 f"val loss {result['initial_val_loss']:.3f} -> {result['best_val_loss']:.3f}"), file=sys.stderr)
        results.append((name, result))
        loads.append(os.getloadavg()[0])
    about = environment(label, steps, args.threads, load_before, os.getloadavg(), max(loads, default=None))
    if skipped:
        about += f" Not registered, skipped: {', '.join(skipped)}."
    (work / "results.json").write_text(json.dumps({"results": results, "environment": about}, indent=2) + "\n")
    text = table(results) + "\n\n" + about
    print(text)
    if args.json:
        print(json.dumps(dict(results), indent=2, sort_keys=True))
    if not args.tiny and not args.no_write:
        rewrite_doc(text)
        print(f"rewrote the table in {DOC}", file=sys.stderr)
    return 1 if any("error" in r for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
