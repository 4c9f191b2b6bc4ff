"""Checkpoints and ``--resume`` in one process: a resumed run ends bit for bit where an uninterrupted one ends.

The runs use adapter dropout (so the RNG state matters), a validation split with evaluations every 2 steps (so
the best adapter and the evaluation at the end of a run matter) and a batch of 7 (epochs end on a short batch).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.errors import UsageError
from adapterkit.core.train import checkpoint, resume
from adapterkit.core.train.run import train
from adapterkit.testing import save_tiny_base
from train_helpers import kill_tree, number_rows, one_torch_thread, quiet_env, wait_for, write_jsonl

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
SETTINGS = {"config": {"r": 4, "alpha": 8, "dropout": 0.1}, "lr": 1e-2, "batch_size": 7, "eval_every": 2, "seed": 0}
TIMING = {"seconds", "train_seconds", "cpu_seconds", "peak_rss_bytes", "checkpoint_every", "resumed_from_step"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    return {"root": root, "base": save_tiny_base("llama", root / "llama", tokenizer=True),
            "data": write_jsonl(root / "numbers.jsonl", number_rows())}


@pytest.fixture(scope="module")
def straight(setup) -> adapterkit.Adapter:
    """6 steps in one go, no checkpoints: what every resumed run must end with."""
    out = setup["root"] / "straight"
    train(setup["base"], "lora", setup["data"], out, max_steps=6, **SETTINGS)
    return adapterkit.load(out)


def same_tensors(a: adapterkit.Adapter, b: adapterkit.Adapter) -> bool:
    assert a.tensors.keys() == b.tensors.keys()
    return all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def training(adapter: adapterkit.Adapter) -> dict:
    return {k: v for k, v in adapter.manifest.provenance["training"].items() if k not in TIMING}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_three_steps_resumed_to_six_equal_six_in_one_run(setup, straight, tmp_path):
    out = tmp_path / "run"
    first = train(setup["base"], "lora", setup["data"], out, max_steps=3, checkpoint_every=3, **SETTINGS)
    assert first.checkpoint == out / "checkpoints" / "step-3" and first.resumed_from is None
    assert adapterkit.validate(out, base=setup["base"]).valid  # the 3-step adapter, beside its checkpoints
    assert not same_tensors(adapterkit.load(out), straight)

    second = train(setup["base"], "lora", setup["data"], out, max_steps=6, checkpoint_every=3, resume=True,
                   **SETTINGS)
    assert second.resumed_from == 3 and second.steps == 6
    resumed = adapterkit.load(out)
    assert same_tensors(resumed, straight)  # bit for bit, not within a tolerance
    assert training(resumed) == training(straight)  # the same evaluations, best step, losses
    assert resumed.manifest.provenance["training"]["resumed_from_step"] == 3
    assert adapterkit.validate(out, base=setup["base"]).valid
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]


def test_without_the_rng_states_the_resumed_run_would_differ(setup, straight, tmp_path, monkeypatch):
    """The control: dropout makes the RNG state part of the result, so the test above can fail."""
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=3, checkpoint_every=3, **SETTINGS)
    monkeypatch.setattr(resume, "_set_rng_state", lambda *args: None)
    train(setup["base"], "lora", setup["data"], out, max_steps=6, resume=True, **SETTINGS)
    assert not same_tensors(adapterkit.load(out), straight)


def test_a_checkpoint_holds_the_whole_state(setup, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=4, checkpoint_every=2, **SETTINGS)
    folder = out / "checkpoints" / "step-4"
    assert checkpoint.problem(folder) is None
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "best.safetensors", "checkpoint.json",
                                                        "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1 and state["sharding"] == "none"
    assert state["data"] == {"epoch": 0, "batch": 4, "batches_per_epoch": 13}  # 90 rows, 7 a step
    assert [e["step"] for e in state["loop"]["evaluations"]] == [0, 2, 4] and state["loop"]["best_step"] == 4
    assert state["options"]["lr"] == 1e-2 and state["options"]["config"]["dropout"] == 0.1
    assert state["scheduler"]["last_epoch"] == 4
    optimizer, _ = adapterkit.read_safetensors(folder / "optimizer.safetensors")
    assert {k.split(".", 1)[1] for k in optimizer} == {"exp_avg", "exp_avg_sq", "step"}
    assert float(optimizer["0.step"]) == 4.0
    rng, _ = adapterkit.read_safetensors(folder / "rng.safetensors")
    assert sorted(rng) == ["numpy.0", "python.0", "torch.0"]


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(setup, straight, tmp_path):
    """SIGKILL inside the write of step-4 (a test hook pauses the writer after its first file): step-2 is untouched
    and complete, no step-4 is visible, and resuming from step-2 ends bit for bit as the uninterrupted run."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "adapterkit", "train", "--base", str(setup["base"]), "--method", "lora",
            "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--data", str(setup["data"]), "-o", str(out),
            "--lr", "1e-2", "--batch-size", "7", "--eval-every", "2", "--seed", "0", "--max-steps", "6",
            "--checkpoint-every", "2"]
    victim = subprocess.Popen(args, env=quiet_env(**{checkpoint.PAUSE_ENV: "4"}), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    root = out / "checkpoints"
    try:
        wait_for(root / ".tmp-step-4" / checkpoint.PAUSE_MARKER, victim)
        before = digests(root / "step-2")
    finally:
        kill_tree(victim)
    assert victim.returncode == -9
    assert digests(root / "step-2") == before and checkpoint.problem(root / "step-2") is None
    assert not (root / "step-4").exists()
    assert sorted(p.name for p in (root / ".tmp-step-4").iterdir()) == ["PAUSED", "adapter.safetensors"]  # torn
    assert checkpoint.latest(root) == root / "step-2"
    assert not (out / "adapter.json").exists()  # the run never finished

    result = CliRunner().invoke(cli, ["train", *map(str, args[4:]), "--resume"])
    assert result.exit_code == 0, result.output
    assert same_tensors(adapterkit.load(out), straight)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # the torn temporary is gone


def test_keep_checkpoints_keeps_the_newest(setup, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=5, checkpoint_every=1, keep_checkpoints=3, **SETTINGS)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4", "step-5"]


def test_resuming_a_finished_run_with_the_same_steps_writes_the_same_adapter(setup, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=4, checkpoint_every=3, **SETTINGS)
    finished = adapterkit.load(out)
    again = train(setup["base"], "lora", setup["data"], out, max_steps=4, resume=True, **SETTINGS)
    assert again.resumed_from == 4 and same_tensors(adapterkit.load(out), finished)
    assert training(adapterkit.load(out)) == training(finished)


def test_early_stopping_survives_a_resume(setup, tmp_path):
    """patience 1 stops the run at its first evaluation without a better loss; a resume does not train on."""
    settings = {**SETTINGS, "lr": 0.5, "eval_every": 1, "patience": 1}
    whole = train(setup["base"], "lora", setup["data"], None, max_steps=12, **settings)
    assert whole.stopped_early and whole.steps < 12
    out = tmp_path / "run"
    stopped = train(setup["base"], "lora", setup["data"], out, max_steps=12, checkpoint_every=1, **settings)
    assert stopped.stopped_early and stopped.steps == whole.steps
    again = train(setup["base"], "lora", setup["data"], out, max_steps=12, resume=True, **settings)
    assert again.stopped_early and again.steps == whole.steps and again.best_step == whole.best_step
    assert all(np.array_equal(again.adapter.tensors[k], whole.adapter.tensors[k]) for k in whole.adapter.tensors)


# ---- refusals ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_steps(setup) -> Path:
    out = setup["root"] / "three"
    train(setup["base"], "lora", setup["data"], out, max_steps=3, checkpoint_every=3, **SETTINGS)
    return out


def invoke(*args) -> object:
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def cli_args(setup, out: Path, *extra) -> list:
    return ["--base", setup["base"], "--method", "lora", "--rank", "4", "--alpha", "8", "--dropout", "0.1",
            "--data", setup["data"], "-o", out, "--lr", "1e-2", "--batch-size", "7", "--eval-every", "2",
            "--seed", "0", *extra]


@pytest.mark.parametrize(("extra", "needles"), [
    (["--max-steps", "6", "--lr", "2e-2"], ["--lr: 0.02 now, 0.01 in the checkpoint"]),
    (["--max-steps", "6", "--seed", "1"], ["--seed: 1 now, 0 in the checkpoint"]),
    (["--max-steps", "6", "--dropout", "0.2"], ["the method config (--rank, --alpha", "0.2", "0.1"]),
    (["--max-steps", "6", "--schedule", "linear"], ["--schedule: linear now, constant in the checkpoint",
                                                    "the total steps"]),
    (["--max-steps", "2"], ["the checkpoint is at step 3, past this run's 2 steps", "--max-steps 3 or more"]),
])
def test_resume_refuses_options_that_change_the_result(setup, three_steps, extra, needles):
    before = digests(three_steps / "checkpoints" / "step-3")
    assert_one_line_error(invoke(*cli_args(setup, three_steps, *extra, "--resume")), *needles)  # the last wins
    assert digests(three_steps / "checkpoints" / "step-3") == before  # nothing written


def test_resume_refuses_a_longer_run_under_a_decaying_schedule(setup, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=3, checkpoint_every=3, schedule="linear", **SETTINGS)
    error = assert_one_line_error(invoke(*cli_args(setup, out, "--max-steps", "6", "--schedule", "linear",
                                                   "--resume")),
                                  "the total steps (--max-steps / --epochs)", "6 now, 3 in the checkpoint")
    assert "constant schedule" in error
    assert invoke(*cli_args(setup, out, "--max-steps", "3", "--schedule", "linear", "--resume")).exit_code == 0


def test_resume_without_a_checkpoint_and_other_usage_errors(setup, tmp_path):
    assert_one_line_error(invoke(*cli_args(setup, tmp_path / "none", "--max-steps", "3", "--resume")),
                          "no complete checkpoint to resume from", "run without --resume")
    assert_one_line_error(invoke(*cli_args(setup, tmp_path / "x", "--resume", "--overwrite")),
                          "--resume continues the run in OUT, --overwrite replaces OUT")
    with pytest.raises(UsageError, match="need an output folder"):
        train(setup["base"], "lora", setup["data"], None, max_steps=2, checkpoint_every=1, **SETTINGS)
    with pytest.raises(UsageError, match="one process"):
        train(setup["base"], "lora", setup["data"], None, max_steps=2, fsdp=True, **SETTINGS)
    result = invoke(*cli_args(setup, tmp_path / "y", "--max-steps", "2", "--fsdp"))
    assert_one_line_error(result, "--fsdp shards the base over the processes of a torchrun run", "torchrun")


def test_an_output_with_checkpoints_is_refused_without_resume(setup, three_steps):
    assert_one_line_error(invoke(*cli_args(setup, three_steps, "--max-steps", "6")),
                          "holds checkpoints/ of an earlier run", "pass --resume to continue that run")


def test_a_broken_newest_checkpoint_is_passed_over(setup, straight, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=4, checkpoint_every=2, **SETTINGS)
    newest = out / "checkpoints" / "step-4" / "optimizer.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: the index's sha256 no longer matches
    newest.write_bytes(bytes(data))
    assert checkpoint.problem(newest.parent) == "optimizer.safetensors: sha256 differs from the index"
    resumed = train(setup["base"], "lora", setup["data"], out, max_steps=6, checkpoint_every=2, resume=True,
                    **SETTINGS)
    assert resumed.resumed_from == 2
    assert same_tensors(adapterkit.load(out), straight)


# ---- the folder format ---------------------------------------------------------------------------

def test_checkpoint_write_is_atomic_and_replaces_a_rewritten_step(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-9").mkdir(parents=True)  # a crashed writer's leftovers
    (root / ".tmp-step-9" / "adapter.safetensors").write_bytes(b"torn")
    first = checkpoint.write(root, 1, {"a.json": b"1", "b.json": b"2"}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # the stale temporary is gone
    assert json.loads((first / "checkpoint.json").read_text())["files"]["a.json"]["size"] == 1
    checkpoint.write(root, 1, {"a.json": b"one"}, keep=2)  # the same step again: replaced whole
    assert sorted(p.name for p in first.iterdir()) == ["a.json", "checkpoint.json"]
    (root / "step-7").mkdir()  # no index: never complete
    assert checkpoint.latest(root) == first and checkpoint.problem(root / "step-7") == "checkpoint.json is missing"
    (first / "a.json").write_bytes(b"two")
    assert checkpoint.problem(first) == "a.json: sha256 differs from the index"
    assert checkpoint.latest(root) is None


def test_the_final_adapter_is_written_beside_the_checkpoints(setup, tmp_path):
    out = tmp_path / "run"
    train(setup["base"], "lora", setup["data"], out, max_steps=2, checkpoint_every=2, **SETTINGS)
    kept = digests(out / "checkpoints" / "step-2")
    adapter = adapterkit.load(out)
    checkpoint.save_adapter_beside(adapter, out, adapterkit.default_registry())
    assert digests(out / "checkpoints" / "step-2") == kept
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors", "checkpoints"]
    assert same_tensors(adapterkit.load(out), adapter) and adapterkit.validate(out, base=setup["base"]).valid


def test_the_data_order_resumes_from_the_step_count():
    import itertools

    from adapterkit.core.train.loop import global_batches

    whole = list(itertools.islice(global_batches(23, 5, 7), 20))  # 5 batches an epoch, the last of 3 rows
    assert [len(b) for b in whole[:5]] == [5, 5, 5, 5, 3] and whole[5] != whole[0]
    for skip in (1, 4, 5, 6, 13):
        assert list(itertools.islice(global_batches(23, 5, 7, skip=skip), 20 - skip)) == whole[skip:]
