"""The end-to-end demo: fine-tune SmolLM2-135M with LoRA on CPU, then ship the adapter.

:func:`run_demo` is what ``adapterkit demo`` runs. It teaches the real
SmolLM2-135M-Instruct (prepared from a PyPI package, nothing downloaded) to
write numbers in words (``47 ->`` `` forty-seven``), a format it does not
follow before training, measures the held-out loss before and after a few
dozen LoRA steps, then walks the adapter through the toolchain: save, validate
against the base, convert to PEFT, load that folder with PEFT itself and compare
logits, convert back and compare tensors, convert to llama.cpp's GGUF and back,
merge it into the base on disk and compare the merged model's logits, export the
merged model to ONNX (checked in ONNX Runtime), and measure it (``adapterkit
bench``: forward latency of the base, the adapter unmerged and merged).
"""

from __future__ import annotations

from adapterkit.core.format.provenance import now_utc

import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterkit.core.demo.real_models import SMOLLM2_NAME, smollm2_path
from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.runtime.models import quiet_transformers

DEFAULT_STEPS = 60
DEFAULT_LR = 2e-3
BATCH_SIZE = 8
VALIDATION_SIZE = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAMPLES = (47, 83, 21)  # shown before and after training, all held out
OUTPUTS = ("adapter", "peft", "roundtrip", "gguf", "merged", "onnx")
PEFT_TOLERANCE = 1e-4
#: merged weights W + s*B@A rounded to float32, over 30 layers, on logits of magnitude ~20
MERGED_TOLERANCE = 5e-3
BENCH_REPEATS, BENCH_TOKENS = 5, 64

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

Example = tuple[str, str]  # (prompt, completion)


def number_words(n: int) -> str:
    """0..99 in English words: 47 -> "forty-seven"."""
    if not 0 <= n <= 99:
        raise ValueError(f"{n} is outside 0..99")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def example(n: int) -> Example:
    return f"{n} ->", f" {number_words(n)}"


def make_task(seed: int = 0, validation_size: int = VALIDATION_SIZE) -> tuple[list[int], list[int]]:
    """Split 0..99 into training numbers and held-out validation numbers (the samples always held out)."""
    rest = [n for n in range(100) if n not in SAMPLES]
    held_out = sorted([*SAMPLES, *random.Random(seed).sample(rest, validation_size - len(SAMPLES))])
    return [n for n in range(100) if n not in held_out], held_out


def encode(tokenizer: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """Right-padded ids, attention mask and labels; labels cover the completion and EOS only."""
    import torch

    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for prompt, completion in examples:
        p = tokenizer(prompt).input_ids
        c = [*tokenizer(completion).input_ids, eos]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [eos] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }


def completion_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, float]:
    """Mean cross-entropy over completion tokens, and the share of rows whose tokens are all argmax-right.

    The output head runs on completion positions only (most of a row is prompt).
    With teacher forcing, "all argmax-right" is exactly "greedy decoding writes the answer".
    """
    import torch

    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][mask])
    loss = torch.nn.functional.cross_entropy(logits, targets[mask])
    right = torch.ones_like(targets, dtype=torch.bool)
    right[mask] = logits.argmax(-1) == targets[mask]
    return loss, float(right.all(dim=1).float().mean())


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 6) -> str:
    """The model's greedy continuation of ``prompt``, up to EOS or a newline."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            if "\n" in tokenizer.decode(new):
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new).split("\n")[0]


def run_demo(
    out_dir: str | os.PathLike[str] | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    echo: Callable[[str], Any] = print,
    *,
    lr: float = DEFAULT_LR,
    batch_size: int = BATCH_SIZE,
    rank: int = 8,
    alpha: float = 16,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune SmolLM2-135M with LoRA, then save, validate, convert and cross-check the adapter.

    Writes ``adapter/`` (adapterkit), ``peft/`` and ``roundtrip/`` (PEFT converted
    back) under ``out_dir`` (default: a new temporary folder) and returns the
    numbers, with ``checks`` (name -> passed) and ``ok``. ``progress`` shows a
    tqdm bar on stderr while training. Sets torch's thread count to the CPUs available.
    """
    if steps < 1:
        raise UsageError("steps must be at least 1", found=steps)
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="adapterkit-demo-"))
    _check_outputs(out, overwrite)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2_path(cache_dir, echo=echo)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    train_numbers, val_numbers = make_task(seed)
    val = encode(tokenizer, [example(n) for n in val_numbers])
    echo(f"Base model: {SMOLLM2_NAME} ({_count(model)} parameters, float32, {threads} CPU threads) at {base}")
    echo(f"Task: write numbers in words, e.g. {example(47)[0]!r} -> {example(47)[1]!r}; "
         f"{len(train_numbers)} training numbers, {len(val_numbers)} held out")

    numbers: dict[str, Any] = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    with torch.no_grad():
        loss, numbers["accuracy_before"] = completion_loss(model, val)
    numbers["loss_before"] = float(loss)
    echo(f"Before training: held-out loss {numbers['loss_before']:.3f}, exact answers {numbers['accuracy_before']:.0%}")
    _show_samples(model, tokenizer, echo)

    torch.manual_seed(seed)
    handle = _train(model, tokenizer, train_numbers, numbers, rank, alpha, progress, echo)
    with torch.no_grad():
        loss, numbers["accuracy_after"] = completion_loss(model, val)
    numbers["loss_after"] = float(loss)
    echo(f"After training ({numbers['train_seconds']:.0f} s): held-out loss {numbers['loss_after']:.3f}, "
         f"exact answers {numbers['accuracy_after']:.0%}")
    _show_samples(model, tokenizer, echo)

    adapter = handle.to_adapter(task="causal-lm", base_name=SMOLLM2_NAME,
                                provenance={"created_at": now_utc(), "training": _provenance(numbers)})
    numbers["trainable_parameters"] = adapter.num_parameters
    del model, handle
    results = _ship(adapter, out, base, val, overwrite, echo)
    results.update(_deploy(results, out, base, val, overwrite, progress, echo))
    checks = {
        "held-out loss dropped": numbers["loss_after"] < numbers["loss_before"],
        "adapter valid against the base": results["valid"],
        f"PEFT logits within {PEFT_TOLERANCE:g}": results["peft_max_abs_diff"] <= PEFT_TOLERANCE,
        "round trip identical": results["roundtrip_identical"],
        "GGUF round trip identical": results["gguf_identical"],
        f"merged model logits within {MERGED_TOLERANCE:g}": results["merged_disk_max_abs_diff"] <= MERGED_TOLERANCE,
        "ONNX Runtime matches torch": results["onnx_max_abs_diff"] is not None,
    }
    seconds = time.perf_counter() - start
    echo(f"Done in {seconds:.0f} s: {sum(checks.values())} of {len(checks)} checks passed. Outputs in {out}")
    return {"checks": checks, "ok": all(checks.values()), "out_dir": out, "base_path": base,
            **numbers, **results, "seconds": seconds}


def _train(model: Any, tokenizer: Any, train_numbers: list[int], numbers: dict[str, Any], rank: int, alpha: float,
           progress: bool, echo: Callable[[str], Any]) -> Any:
    """Inject LoRA and train it; records ``training_losses`` and ``train_seconds`` in ``numbers``."""
    import torch

    import adapterkit

    steps, batch_size = numbers["steps"], numbers["batch_size"]
    handle = adapterkit.inject(model, "lora", r=rank, alpha=alpha, target_modules=list(TARGET_MODULES))
    params = handle.parameters()
    echo(f"LoRA r={rank} alpha={alpha:g} on {len(handle.targets)} modules: {sum(p.numel() for p in params):,} "
         f"trainable parameters. Training {steps} steps (batch {batch_size}, AdamW lr {numbers['lr']:g} "
         "decaying to 0)...")
    optimizer = torch.optim.AdamW(params, lr=numbers["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay to 0
    rng = random.Random(numbers["seed"])
    losses: list[float] = numbers.setdefault("training_losses", [])
    start = time.perf_counter()
    bar = _progress_bar(steps) if progress else None
    model.train()
    try:
        for _ in range(steps):
            batch = encode(tokenizer, [example(rng.choice(train_numbers)) for _ in range(batch_size)])
            loss, _ = completion_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update(1)
            elif len(losses) % max(1, steps // 5) == 0 or len(losses) == steps:
                echo(f"  step {len(losses):>3}/{steps}  training loss {losses[-1]:.3f}")
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    numbers["train_seconds"] = time.perf_counter() - start
    return handle


def _provenance(numbers: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": "numbers in words (0-99)", "optimizer": "AdamW, linear decay, gradient norm clipped at 1",
        **{k: numbers[k] for k in ("steps", "lr", "batch_size", "seed", "accuracy_before", "accuracy_after")},
        **{k: round(numbers[k], 4) for k in ("loss_before", "loss_after")},
        "seconds": round(numbers["train_seconds"], 1),
    }


def _ship(adapter: Any, out: Path, base: Path, val: dict[str, Any], overwrite: bool,
          echo: Callable[[str], Any]) -> dict[str, Any]:
    """Save, validate against the base, convert to PEFT, load it in PEFT, convert back."""
    import adapterkit

    adapter_dir = adapterkit.save(adapter, out / "adapter", overwrite=overwrite)
    echo(f"Saved the adapter: {adapter_dir}")
    report = adapterkit.validate(adapter_dir, base=base)
    if not report.valid:
        raise AdapterkitError("the demo's adapter did not validate: " + "; ".join(map(str, report.errors)),
                              file=str(adapter_dir), code="demo_failed")
    echo(f"Validated against the base: valid ({'; '.join(report.checks)})")
    for warning in report.warnings:
        echo(f"  warning: {warning}")

    peft_dir = adapterkit.convert(adapter_dir, out / "peft", to="peft", overwrite=overwrite)
    echo(f"Converted to PEFT: {peft_dir} ({', '.join(sorted(p.name for p in peft_dir.iterdir()))})")
    peft_diff, merged_diff, logits = _compare_with_peft(adapter_dir, peft_dir, base, val)
    echo(f"PEFT's PeftModel.from_pretrained vs adapterkit.apply: max |logit difference| {peft_diff:.2e}")

    roundtrip_dir = adapterkit.convert(peft_dir, out / "roundtrip", to="adapterkit", overwrite=overwrite)
    identical = _same_tensors(adapterkit.load(adapter_dir), adapterkit.load(roundtrip_dir))
    echo(f"Converted back to adapterkit: {roundtrip_dir}; tensors identical: {'yes' if identical else 'NO'}")
    return {
        "adapter_path": adapter_dir, "peft_path": peft_dir, "roundtrip_path": roundtrip_dir,
        "valid": report.valid, "warnings": [str(w) for w in report.warnings],
        "peft_max_abs_diff": peft_diff, "merged_max_abs_diff": merged_diff, "roundtrip_identical": identical,
        "logits": logits,
    }


def _deploy(shipped: dict[str, Any], out: Path, base: Path, val: dict[str, Any], overwrite: bool, progress: bool,
            echo: Callable[[str], Any]) -> dict[str, Any]:
    """GGUF and back, merge to disk and compare, export ONNX (verified in ONNX Runtime), a short bench."""
    import torch
    from transformers import AutoModelForCausalLM

    import adapterkit
    from adapterkit.core.bench.measure import bench_adapter
    from adapterkit.core.export.files import read_manifest
    from adapterkit.core.export.onnx import export_onnx

    adapter_dir = shipped["adapter_path"]
    gguf_dir = adapterkit.convert(adapter_dir, out / "gguf", to="gguf", overwrite=overwrite, base=base)
    gguf_identical = _same_tensors(adapterkit.load(adapter_dir), adapterkit.load(gguf_dir, base=base))
    echo(f"Converted to llama.cpp GGUF: {gguf_dir} ({_size(gguf_dir)}); read back, tensors identical: "
         f"{'yes' if gguf_identical else 'NO'}")

    merged_dir = adapterkit.merge(adapter_dir, base, out / "merged", overwrite=overwrite, progress=progress)
    with quiet_transformers():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).logits
    del merged
    merged_diff = float((merged_logits - shipped.pop("logits")).abs().max())
    echo(f"Merged into the base on disk: {merged_dir} ({_size(merged_dir)}); from_pretrained of it vs the adapter "
         f"applied: max |logit difference| {merged_diff:.2e}")

    onnx_dir = export_onnx(adapter_dir, base, out / "onnx", overwrite=overwrite,
                           progress=lambda line: echo(f"  onnx: {line}"))
    verification = read_manifest(onnx_dir).get("verification") or {}
    diffs = list((verification.get("max_abs_diff") or {}).values())
    onnx_diff = max(diffs) if diffs else None
    echo(f"Exported the merged model to ONNX: {onnx_dir} ({_size(onnx_dir)}); ONNX Runtime vs torch: "
         f"max |logit difference| {onnx_diff:.2e}" if onnx_diff is not None else f"Exported to ONNX: {onnx_dir}")

    report = bench_adapter(adapter_dir, base, repeats=BENCH_REPEATS, seq_len=BENCH_TOKENS, batch_sizes=(1,),
                           pool=False)
    forward = report.forward[0]
    bench = {"adapter_bytes": report.sizes["adapter_file_bytes"], "base_bytes": report.sizes["base_bytes"],
             "base_ms": forward.base.median * 1e3, "unmerged_ms": forward.unmerged.median * 1e3,
             "merged_ms": forward.merged.median * 1e3 if forward.merged else None,
             "spread_percent": _spread(forward.base.runs)}
    echo(f"Sizes: the adapter {bench['adapter_bytes'] / 1e6:.1f} MB, the base {bench['base_bytes'] / 1e6:.0f} MB: "
         f"ten tenants cost {10 * bench['adapter_bytes'] / 1e6:.0f} MB as adapters, "
         f"{10 * bench['base_bytes'] / 1e9:.1f} GB as fine-tuned copies")
    echo(f"Bench (median of {BENCH_REPEATS}, 1 x {BENCH_TOKENS} tokens; the base's runs spread "
         f"+-{bench['spread_percent']:.0f} %, so smaller differences are noise): base {bench['base_ms']:.0f} ms, "
         f"adapter unmerged {bench['unmerged_ms']:.0f} ms ({_percent(bench['unmerged_ms'], bench['base_ms'])}), "
         + (f"merged {bench['merged_ms']:.0f} ms ({_percent(bench['merged_ms'], bench['base_ms'])})"
            if bench["merged_ms"] is not None else "merged: n/a"))
    return {"gguf_path": gguf_dir, "gguf_identical": gguf_identical, "merged_path": merged_dir,
            "merged_disk_max_abs_diff": merged_diff, "onnx_path": onnx_dir, "onnx_max_abs_diff": onnx_diff,
            "bench": bench}


def _spread(runs: Sequence[float]) -> float:
    """Half the range of ``runs`` as a percentage of their median: the run-to-run noise of a timing."""
    import statistics

    return 50 * (max(runs) - min(runs)) / statistics.median(runs)


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return f"{total / 1e6:.1f} MB"


def _percent(value: float, base: float) -> str:
    return f"{(value - base) / base:+.0%} vs base"


def _check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse before training, not after, when an output folder is in the way."""
    if out.exists() and not out.is_dir():
        raise AdapterkitError("the output path is a file, not a folder", file=str(out), code="output_exists")
    if overwrite:
        return
    for name in OUTPUTS:
        path = out / name
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise AdapterkitError("output already exists and is not empty", file=str(path),
                                  hint="choose another --out folder or pass --overwrite", code="output_exists")


def _progress_bar(steps: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="training", unit="step", leave=False)


def _show_samples(model: Any, tokenizer: Any, echo: Callable[[str], Any]) -> None:
    for n in SAMPLES:
        prompt, want = example(n)
        got = greedy(model, tokenizer, prompt).strip()
        echo(f"  {prompt} {got!r:<16} {'ok' if got == want.strip() else f'(want {want.strip()!r})'}")


def _compare_with_peft(adapter_dir: Path, peft_dir: Path, base: Path, batch: dict[str, Any]) -> tuple[float, float, Any]:
    """Max |logit difference| between PEFT's load of ``peft_dir`` and adapterkit's apply of ``adapter_dir``,
    and between adapterkit's model before and after merging the adapter into the base weights; and the
    logits of the adapter applied (unmerged).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import adapterkit
    from adapterkit.core.runtime.inject import attached

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with quiet_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calling deprecated transformers names
        ours = adapterkit.apply(adapterkit.load(adapter_dir), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(peft_dir))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        logits = ours(**inputs).logits
        peft_diff = float((logits - theirs(**inputs).logits).abs().max())
        del theirs
        attached(ours)["default"].merge()
        merged_diff = float((logits - ours(**inputs).logits).abs().max())
    return peft_diff, merged_diff, logits


def _same_tensors(a: Any, b: Any) -> bool:
    import numpy as np

    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def _count(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.0f}M"
