"""Training-step benchmark: an adapterkit LoRA step side by side with a PEFT LoRA step and full fine-tuning.

One step = forward with labels (causal-LM cross-entropy) + backward + ``AdamW.step``
+ ``zero_grad``, batch 4 x 128 seeded random tokens, float32, ``use_cache=False``.
The LoRA contenders train r=16, alpha 32 on all seven linear kinds (210 modules in
SmolLM2-135M), fresh adapters (``adapterkit.inject`` / ``get_peft_model``); full
fine-tuning trains every parameter of a third copy of the base. The three models
live in one process and alternate (A B C A B C ...) after a warm-up step.

Peak memory (``--memory``, on by default except with ``--tiny``): each contender
again in a fresh process (load the base, build the contender, two steps), peak RSS
from the kernel.

Usage::

    python benchmarks/bench_train_step.py             # SmolLM2-135M
    python benchmarks/bench_train_step.py --tiny      # a tiny seeded llama (CI smoke)
    python benchmarks/bench_train_step.py --profile   # + cProfile / torch profiler of one adapterkit step

Target (issue): the adapterkit LoRA step <= 0.9x PEFT's (PEFT here: 2.13 s; full fine-tuning 2.95 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 0.9
R, ALPHA, LR = 16, 32, 1e-4
BATCH, SEQ = 4, 128

# the child of --memory: base folder, contender, batch, seq, steps -> prints JSON
CHILD = """
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import bench_train_step as b, common
model, params = b.build(sys.argv[3], common.load_model(sys.argv[2]))
step = b.stepper(model, params, common.token_inputs(model, int(sys.argv[4]), int(sys.argv[5])))
for _ in range(int(sys.argv[6])):
    step()
print(json.dumps({"trainable": sum(p.numel() for p in params)}))
"""

CONTENDERS = ("adapterkit LoRA", "PEFT LoRA", "full fine-tuning")


def build(name: str, model: Any) -> tuple[Any, list[Any]]:
    """(model, trainable parameters) of contender ``name`` built on ``model``."""
    if name == "adapterkit LoRA":
        import adapterkit

        handle = adapterkit.inject(model, "lora", r=R, alpha=ALPHA, target_modules=common.LINEAR_KINDS)
        return model, handle.parameters()
    if name == "PEFT LoRA":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=common.LINEAR_KINDS,
                                                      lora_dropout=0.0))
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    if name == "full fine-tuning":
        for param in model.parameters():
            param.requires_grad_(True)
        return model, list(model.parameters())
    raise ValueError(name)


def stepper(model: Any, params: list[Any], inputs: dict[str, Any]) -> Any:
    """A closure running one training step."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()

    def step() -> float:
        out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def main(argv: list[str] | None = None) -> int:
    common.quiet()
    parser = common.parser(__doc__, repeats=5, tiny_repeats=2)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="peak RSS of each contender in a fresh process (default: on, off with --tiny)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq-len", type=int, default=SEQ)
    args = parser.parse_args(argv)
    repeats = common.repeats_of(args)
    threads = common.set_threads(args.threads)
    memory = (not args.tiny) if args.memory is None else args.memory
    with common.workdir(args, "bench-train-") as work:
        base = common.base_of(args, work)
        models = {name: build(name, common.load_model(base)) for name in CONTENDERS}
        inputs = common.token_inputs(models["PEFT LoRA"][0], args.batch, args.seq_len)
        steps = {name: stepper(model, params, inputs) for name, (model, params) in models.items()}
        losses = {name: step() for name, step in steps.items()}  # also the warm-up
        common.progress("first-step losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        times = common.alternate(steps, repeats, warmup=0)
        trainable = {name: sum(p.numel() for p in params) for name, (_, params) in models.items()}
        profile = common.profiles(steps["adapterkit LoRA"], "one adapterkit LoRA step") if args.profile else []
        del models, steps
        rss = {}
        if memory:
            for name in CONTENDERS:
                run = common.run_code(CHILD, Path(__file__).resolve().parent, base, name, args.batch, args.seq_len, 2)
                rss[name] = run["rss_mb"]
                info = json.loads(run["stdout"].splitlines()[-1])
                common.progress(f"{name}: peak RSS {run['rss_mb']:.0f} MB ({info})")
        common.emit(report(args, base, times, trainable, losses, rss, threads, repeats, profile))
    return 0


def report(args: Any, base: Path, times: dict[str, list[float]], trainable: dict[str, int], losses: dict[str, float],
           rss: dict[str, float], threads: int, repeats: int, profile: list[str]) -> str:
    lines = common.report_head(
        f"train step: LoRA r={R} (7 linear kinds) vs full fine-tuning, batch {args.batch} x {args.seq_len}, AdamW",
        common.base_label(args, base), threads, repeats,
        "One step = forward with labels + backward + AdamW step + zero_grad.")
    rows = []
    for name, values in times.items():
        tokens_per_second = args.batch * args.seq_len / common.stats(values)[1]
        row = [name, f"{trainable[name]:,}", common.fmt(values, "s", 3), f"{tokens_per_second:.0f}"]
        row.append(f"{rss[name]:.0f} MB" if name in rss else "-")
        rows.append(row)
    lines.append(common.table(["contender", "trainable parameters", "seconds per step", "tokens/s (median)",
                               "peak RSS (own process)"], rows))
    lines += [
        "",
        common.ratio_line("LoRA step time", common.ratio(times["adapterkit LoRA"], times["PEFT LoRA"]),
                          None if args.tiny else TARGET),
        common.ratio_line("LoRA step time", common.ratio(times["adapterkit LoRA"], times["full fine-tuning"]),
                          of="full fine-tuning"),
    ]
    if rss:
        lines.append(common.ratio_line("LoRA peak RSS", rss["adapterkit LoRA"] / rss["PEFT LoRA"]))
    lines.append("- first-step loss (the same untrained model, a check): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return "\n".join(lines + profile)


if __name__ == "__main__":
    raise SystemExit(main())
