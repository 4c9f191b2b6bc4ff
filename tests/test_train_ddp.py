"""Data-parallel ``adapterkit train``: two gloo processes (torchrun) equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit.core.train.run import train
from adapterkit.testing import save_tiny_base
from train_helpers import number_rows, one_torch_thread, torchrun_command, write_jsonl

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
TORCHRUN = Path(sys.executable).parent / "torchrun"
# 90 training rows of different lengths (so the ranks hold different token counts), 7 per step: the 13th
# step takes the short last batch of the epoch (6 rows) and the 14th starts the next epoch.
SETTINGS = {"config": {"r": 4, "alpha": 8}, "lr": 1e-2, "max_steps": 14, "batch_size": 7, "eval_every": 7, "seed": 0}
TOLERANCE = 1e-5

# `torchrun -m adapterkit train ...` once cli/main.py lists train; until then this script adds it. Each rank
# also dumps the adapter it ends with (only rank 0 writes the output folder).
CLI = """
import json
import os
import numpy as np
import torch.distributed as dist
import adapterkit.core.train.run as core_train
from adapterkit.cli.main import COMMANDS, main

COMMANDS.setdefault("train", ("adapterkit.cli.train", "Train a new adapter."))
original = core_train.train
reduced = []  # the size of every tensor this rank all-reduces
plain_all_reduce = dist.all_reduce

def counting_all_reduce(tensor, *args, **kwargs):
    reduced.append(tensor.numel())
    return plain_all_reduce(tensor, *args, **kwargs)

dist.all_reduce = counting_all_reduce

def train_and_dump(*args, **kwargs):
    result = original(*args, **kwargs)
    np.savez(f"rank-{os.environ['RANK']}.npz", **result.adapter.tensors)
    with open(f"rank-{os.environ['RANK']}.json", "w") as f:
        json.dump({"reduced": reduced, "trainable": result.trainable_parameters,
                   "tensors": len(result.adapter.tensors)}, f)
    return result

core_train.train = train_and_dump
main()
"""



def test_torchrun_is_installed_beside_python():
    assert TORCHRUN.is_file(), f"{TORCHRUN} is missing: torch installs it with its console scripts"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    return {"root": root, "base": save_tiny_base("llama", root / "llama", tokenizer=True),
            "data": write_jsonl(root / "numbers.jsonl", number_rows())}


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, np.ndarray]:
    """The single-process run (same global batch, seed and order)."""
    return train(setup["base"], "lora", setup["data"], None, **SETTINGS).adapter.tensors


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    # python -m torch.distributed.run: the workers run this interpreter, whatever the torchrun script's shebang says
    proc = subprocess.run([*torchrun_command(2), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_two_processes_under_torchrun_equal_one_process(setup, reference):
    root = setup["root"]
    script = root / "adapterkit_cli.py"
    script.write_text(CLI)
    out = root / "out"
    proc = torchrun([str(script), "train", "--base", str(setup["base"]), "--method", "lora", "--rank", "4",
                     "--alpha", "8", "--data", str(setup["data"]), "-o", str(out), "--lr", "1e-2", "--max-steps", "14",
                     "--batch-size", "7", "--eval-every", "7", "--json"], root)
    report = json.loads(proc.stdout)  # rank 0 alone prints the report
    assert report["world_size"] == 2 and report["path"] == str(out)

    ranks = [dict(np.load(root / f"rank-{r}.npz")) for r in (0, 1)]
    assert max_diff(ranks[0], ranks[1]) == 0.0  # both ranks applied the same summed gradient
    assert max_diff(ranks[0], reference) <= TOLERANCE  # = one process with the same global batch
    assert any(np.abs(v).max() > 0 for k, v in reference.items() if k.endswith(".B"))  # it did train
    # only the adapter is synchronised: one all_reduce a step of its gradients (+ flags, the loss), nothing else
    for rank in (0, 1):
        log = json.loads((root / f"rank-{rank}.json").read_text())
        grads = [n for n in log["reduced"] if n > 3]  # the rest: flags, evaluation totals (3), the divergence check
        assert grads == [log["trainable"] + log["tensors"] + 1] * 14, log["reduced"]  # + a has-grad flag each
        assert log["trainable"] == sum(v.size for v in reference.values())
    # only rank 0 wrote: a valid adapter (the one rank 0 ended with) with the run's summary
    assert max_diff(adapterkit.load(out).tensors, ranks[0]) == 0.0
    assert adapterkit.validate(out, base=setup["base"]).valid
    training = json.loads((out / "adapter.json").read_text())["provenance"]["training"]
    assert training["world_size"] == 2 and training["backend"] == "gloo"
    assert training["ranks_max_difference"] == 0.0 and training["steps"] == 14
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".out", "out"))) == ["out"]  # no leftovers


def test_gradient_accumulation_gives_the_same_adapter(setup, reference):
    accumulated = train(setup["base"], "lora", setup["data"], None, **{**SETTINGS, "grad_accum": 3})
    assert max_diff(accumulated.adapter.tensors, reference) <= TOLERANCE


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from adapterkit.core.train.dist import Dist, sync_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        used, shared, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        if rank == 0:  # rank 1's share of the batch was empty: it has no gradient for `used`
            used.grad = torch.tensor([1.0, 2.0, 3.0])
        shared.grad = torch.full((3,), float(rank + 1))
        loss = sync_gradients(Dist(rank, 2), [used, shared, unused], torch.tensor([0.5 * (rank + 1)]))
        torch.save({"used": used.grad, "shared": shared.grad, "unused": unused.grad, "loss": loss},
                   f"{out_dir}/sync-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_gradients_sums_and_keeps_missing_gradients_missing(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"sync-{rank}.pt", weights_only=True)
        assert torch.equal(got["used"], torch.tensor([1.0, 2.0, 3.0]))
        assert torch.equal(got["shared"], torch.full((3,), 3.0))
        assert got["unused"] is None  # as in one process: AdamW skips it (no decay, no state)
        assert torch.equal(got["loss"], torch.tensor([1.5]))
