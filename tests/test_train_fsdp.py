"""``adapterkit train --fsdp`` and ``--resume`` under torchrun: two gloo processes on a tiny Llama.

- the CLI trains with the base sharded (FSDP2), the output validates, and the report and the manifest say so,
  with each rank holding half the base;
- every built-in method trains sharded and ends bit for bit as data-parallel training (one process group);
- 3 steps with --checkpoint-every 3, resumed with --max-steps 6, equal 6 steps in one go (bit for bit);
- a SIGKILL of the whole torchrun tree while rank 0 writes a checkpoint leaves the previous one intact, and the
  run resumes from it to the same end.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit.core.train import checkpoint
from adapterkit.testing import save_tiny_base
from train_helpers import (kill_tree, number_rows, quiet_env, run_checked, torchrun_command, wait_for,
                           write_jsonl)

TRAIN = ["--method", "lora", "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--lr", "1e-2", "--batch-size", "7",
         "--eval-every", "2", "--seed", "0"]

# every built-in method, sharded and not, in one process group (train() keeps a group its caller initialised);
# rank 0 saves each sharded adapter and prints how the two runs compare
METHODS = """
import json, sys
import numpy as np
import torch, torch.distributed as dist
import adapterkit
from adapterkit.core.train.run import train

torch.set_num_threads(1)
dist.init_process_group("gloo")
base, data, out = sys.argv[1:4]
configs = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "dora": {"r": 4}, "qlora": {"r": 4},
           "prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4},
           "bottleneck": {"reduction_factor": 4}}
report = {}
for method, config in configs.items():
    # batch 3 over 2 ranks in 2 micro-batches: rank 1 has an empty micro-batch every step (a zero-weighted pass);
    # gradient checkpointing where the method allows it (prefix tuning refuses it)
    runs = [train(base, method, data, None, config=config, lr=1e-2, max_steps=4, batch_size=3, grad_accum=2,
                  eval_every=2, fsdp=fsdp, gradient_checkpointing=method != "prefix") for fsdp in (True, False)]
    sharded, plain = runs
    if dist.get_rank() == 0:
        adapterkit.save(sharded.adapter, f"{out}/{method}")
        report[method] = {
            "max_difference": max(float(np.abs(sharded.adapter.tensors[k] - plain.adapter.tensors[k]).max())
                                  for k in plain.adapter.tensors),
            "sharding": [sharded.sharding, plain.sharding], "base_bytes": sharded.base_bytes,
            "per_rank": [sharded.base_bytes_per_rank, plain.base_bytes_per_rank],
            "val_loss": [sharded.initial_val_loss, sharded.best_val_loss]}
if dist.get_rank() == 0:
    print(json.dumps(report))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {"root": root, "base": save_tiny_base("llama", root / "llama", tokenizer=True),
            "data": write_jsonl(root / "numbers.jsonl", number_rows())}


def adapterkit_train(setup, out: Path, *extra: str) -> list[str]:
    return [*torchrun_command(2), "-m", "adapterkit", "train", "--base", str(setup["base"]), "--data",
            str(setup["data"]), "-o", str(out), *TRAIN, "--fsdp", *extra]


@pytest.fixture(scope="module")
def straight(setup) -> dict:
    """6 steps in one go, sharded: the CLI's JSON report, and the adapter every resumed run must end with."""
    out = setup["root"] / "straight"
    proc = run_checked(adapterkit_train(setup, out, "--max-steps", "6", "--json"), setup["root"])
    return {"out": out, "report": json.loads(proc.stdout), "adapter": adapterkit.load(out)}


def same_tensors(a: adapterkit.Adapter, b: adapterkit.Adapter) -> bool:
    assert a.tensors.keys() == b.tensors.keys()
    return all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_fsdp_trains_validates_and_says_the_base_was_sharded(setup, straight):
    report, out = straight["report"], straight["out"]
    assert report["world_size"] == 2 and report["sharding"] == "fsdp" and report["steps"] == 6
    assert report["path"] == str(out) and report["best_val_loss"] < report["initial_val_loss"]
    per_rank, whole = report["base_bytes_per_rank"], report["base_bytes"]
    assert len(per_rank) == 2 and sum(per_rank) >= whole and max(per_rank) <= 0.55 * whole  # about 1/world each
    assert adapterkit.validate(out, base=setup["base"]).valid
    training = json.loads((out / "adapter.json").read_text())["provenance"]["training"]
    assert training["sharding"] == "fsdp" and training["world_size"] == 2 and training["backend"] == "gloo"
    assert training["base_bytes_per_rank"] == per_rank and training["fsdp_units"] == 3  # 2 decoder layers + root
    assert training["ranks_max_difference"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]  # rank 0 alone wrote


def test_every_built_in_method_trains_sharded_as_it_trains_data_parallel(setup):
    root = setup["root"] / "methods"
    root.mkdir()
    script = root / "methods.py"
    script.write_text(METHODS)
    proc = run_checked([*torchrun_command(2), str(script), str(setup["base"]), str(setup["data"]), str(root)], root)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == ["bottleneck", "dora", "lora", "prefix", "prompt", "qlora"]
    for method, row in report.items():
        assert row["max_difference"] == 0.0, (method, row)  # bit for bit, dropout and dummy passes included
        assert row["sharding"] == ["fsdp", "ddp"], method
        sharded, whole = row["per_rank"]
        assert whole == [row["base_bytes"]] * 2 and max(sharded) <= 0.55 * row["base_bytes"], (method, row)
        assert row["val_loss"][1] < row["val_loss"][0], (method, row)  # it trained
        assert adapterkit.validate(root / method, base=setup["base"]).valid, method
    # QLoRA's 4-bit base is sharded too: its packed weights are what each rank holds half of
    assert report["qlora"]["base_bytes"] < report["lora"]["base_bytes"] / 2


def test_three_sharded_steps_resumed_to_six_equal_six_in_one_run(setup, straight):
    out = setup["root"] / "resumed"
    run_checked(adapterkit_train(setup, out, "--max-steps", "3", "--checkpoint-every", "3"), setup["root"])
    assert checkpoint.latest(out / "checkpoints") == out / "checkpoints" / "step-3"
    state = json.loads((out / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["world_size"] == 2 and state["sharding"] == "fsdp" and len(state["rng"]) == 2  # every rank's RNG
    proc = run_checked(adapterkit_train(setup, out, "--max-steps", "6", "--checkpoint-every", "3", "--resume",
                                        "--json"), setup["root"])
    assert json.loads(proc.stdout)["resumed_from"] == 3
    assert same_tensors(adapterkit.load(out), straight["adapter"])


def test_sigkill_of_the_torchrun_tree_while_writing_a_checkpoint(setup, straight):
    out = setup["root"] / "killed"
    root = out / "checkpoints"
    victim = subprocess.Popen(adapterkit_train(setup, out, "--max-steps", "6", "--checkpoint-every", "3"),
                              cwd=setup["root"], env=quiet_env(**{checkpoint.PAUSE_ENV: "6"}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(root / ".tmp-step-6" / checkpoint.PAUSE_MARKER, victim)
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "step-3").iterdir()}
    finally:
        killed = kill_tree(victim)
    assert killed >= 3  # torchrun's agent and both workers
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "step-3").iterdir()}
    assert after == before and checkpoint.problem(root / "step-3") is None
    assert not (root / "step-6").exists() and checkpoint.latest(root) == root / "step-3"

    run_checked(adapterkit_train(setup, out, "--max-steps", "6", "--checkpoint-every", "3", "--resume"),
                setup["root"])
    assert same_tensors(adapterkit.load(out), straight["adapter"])
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-6"]


# train() owning the group leaves it with its threads joined; each rank writes the gloo threads it still has
# to a file of its own (two ranks printing to one stdout can interleave their lines)
THREADS_LEFT = """
import json, os, sys
from adapterkit.core.train.run import train

base, data, fsdp = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp"
train(base, "lora", data, None, config={"r": 4}, max_steps=2, batch_size=7, eval_every=1, fsdp=fsdp)
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
with open(f"threads-{os.environ['RANK']}.json", "w") as f:
    json.dump(sorted(n for n in names if "gloo" in n), f)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_the_process_group_is_gone_with_its_threads_when_train_returns(setup, sharding):
    """A gloo worker thread alive at interpreter shutdown can abort the process as it drops a finished
    collective (exit -6, "terminate called without an active exception"; seen on rank 1 in CI-like runs).
    train() ends with a barrier and frees the group it created: torch.distributed.nn imported after the group
    (transformers does, while loading the model) and DTensor's caches (FSDP) kept it, and its threads, alive."""
    root = setup["root"] / f"threads-{sharding}"
    root.mkdir()
    script = root / "threads.py"
    script.write_text(THREADS_LEFT)
    run_checked([*torchrun_command(2), str(script), str(setup["base"]), str(setup["data"]), sharding], root)
    left = {rank: json.loads((root / f"threads-{rank}.json").read_text()) for rank in (0, 1)}
    assert left == {0: [], 1: []}


# ---- without a process group ------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "paths"), [
    ("llama", ["model.layers"]), ("gpt2", ["transformer.h"]), ("bert", ["bert.encoder.layer"]),
])
def test_the_blocks_to_shard_are_found_in_any_architecture(kind, paths):
    from adapterkit.core.train.sharding import block_lists
    from adapterkit.testing import TINY_MODELS

    model = TINY_MODELS[kind](0)
    adapterkit.inject(model, "lora", r=2)  # a wrapped model: the adapter's modules sit inside the blocks
    found = block_lists(model)
    assert [path for path, _ in found] == paths and all(len(blocks) == 2 for _, blocks in found)


def test_a_model_without_a_stack_of_layers_is_refused():
    import torch

    from adapterkit.core.errors import UsageError
    from adapterkit.core.train.dist import Dist
    from adapterkit.core.train.sharding import block_lists, shard_base

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()]))
    assert block_lists(model) == []  # a list of unlike modules is no stack of layers
    with pytest.raises(UsageError, match="found no stack of repeated layers in Sequential") as caught:
        shard_base(model, [], Dist(rank=0, world=2))
    assert "without --fsdp" in str(caught.value)
