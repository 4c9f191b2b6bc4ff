"""``train --method adalora --resume`` end to end: a run stopped after its step-3 checkpoint and resumed ends bit for
bit where the uninterrupted 6-step run ends, rank allocator (importance EMAs, masks) and budget schedule included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import save_tiny_base

#: masks every step from the first (tinit 0, deltaT 1) down to one singular value per module, so the allocator's
#: state carried over step 3 decides what steps 4 to 6 keep
CONFIG = {"target_modules": ["q_proj", "v_proj"], "init_r": 4, "target_r": 1, "lora_alpha": 8, "lora_dropout": 0.1,
          "tinit": 0, "tfinal": 1, "deltaT": 1}
SETTINGS = {"max_steps": 6, "checkpoint_every": 3, "lr": 1e-2, "batch_size": 4, "max_length": 16, "seed": 0}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adalora-resume")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    base = save_tiny_base("llama", root / "llama", tokenizer=True)
    straight = root / "straight"
    adapterkit.train(base, "adalora", data, straight, config=CONFIG, **SETTINGS)
    yield {"root": root, "base": base, "data": data, "straight": straight}
    torch.set_num_threads(threads)


def stopped_after_step_3(work: dict[str, Path], out: Path) -> Path:
    """The uninterrupted run's folder as a run killed after writing its step-3 checkpoint leaves it."""
    shutil.copytree(work["straight"], out)
    shutil.rmtree(out / "checkpoints" / "step-6")
    for file in out.iterdir():
        if file.is_file():
            file.unlink()
    return out


def same_tensors(a: adapterkit.Adapter, b: adapterkit.Adapter) -> bool:
    assert a.tensors.keys() == b.tensors.keys()
    return all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_resumed_run_ends_bit_for_bit_as_the_uninterrupted_one(work, tmp_path):
    straight = adapterkit.load(work["straight"])
    assert straight.method == "adalora" and straight.config["total_step"] == 6
    kept = {k: int(np.count_nonzero(v)) for k, v in straight.tensors.items() if k.endswith(".E")}
    assert sum(kept.values()) < 4 * len(kept)  # the allocator pruned: the state it carries matters

    out = stopped_after_step_3(work, tmp_path / "run")
    result = adapterkit.train(work["base"], "adalora", work["data"], out, config=CONFIG, resume=True, **SETTINGS)
    assert result.resumed_from == 3 and result.steps == 6
    resumed = adapterkit.load(out)
    assert same_tensors(resumed, straight)
    assert resumed.config == straight.config  # rank_pattern (the masks) and total_step included
    assert adapterkit.validate(out, base=work["base"]).valid


def test_without_the_allocator_state_the_resumed_run_would_differ(work, tmp_path, monkeypatch):
    """The control: a resume that loses the importance EMAs ends elsewhere, so the test above can fail."""
    from adapterkit_adalora.method import AdaLoraMethod

    monkeypatch.setattr(AdaLoraMethod, "load_training_state", lambda self, *args, **kwargs: None)
    out = stopped_after_step_3(work, tmp_path / "run")
    adapterkit.train(work["base"], "adalora", work["data"], out, config=CONFIG, resume=True, **SETTINGS)
    assert not same_tensors(adapterkit.load(out), adapterkit.load(work["straight"]))
