"""adapterkit.core.train.hf_trainer: a real ``transformers.Trainer`` trains an adapterkit adapter and checkpoints it."""

from __future__ import annotations

import hashlib
import json

import pytest

import accelerate  # noqa: F401  (transformers.Trainer needs it; installed with peft)
import torch
from transformers import Trainer, TrainingArguments

import adapterkit
from adapterkit.core.train.hf_trainer import SUBDIR, AdapterkitCallback, prepare
from adapterkit.testing import sample_inputs, tiny_llama  # noqa: E402
from train_helpers import one_torch_thread  # noqa: E402

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def rows(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 128, (12,), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def arguments(folder, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(folder), max_steps=6, save_strategy="steps", save_steps=3,
                    per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **overrides})


def test_prepare_freezes_all_but_the_adapter():
    model, handle = prepare(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in handle.parameters()} and trainable


def test_trainer_checkpoints_hold_valid_adapters_and_the_final_one_reloads_exactly(tmp_path):
    model, handle = prepare(tiny_llama(), "lora", r=4, alpha=8)
    callback = AdapterkitCallback(handle, tmp_path / "final")
    trainer = Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=rows(16, 0), callbacks=[callback])
    trainer.train()

    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    for checkpoint in checkpoints:
        report = adapterkit.validate(checkpoint / SUBDIR)
        assert report.valid, [str(e) for e in report.errors]
        training = json.loads((checkpoint / SUBDIR / "adapter.json").read_text())["provenance"]["training"]
        assert training["steps"] == int(checkpoint.name.split("-")[1])
        assert training["trainer"] == "transformers.Trainer" and training["lr"] == 1e-2
    first, last = (adapterkit.load(c / SUBDIR) for c in checkpoints)
    assert any(not (first.tensors[k] == last.tensors[k]).all() for k in first.tensors)  # it kept training
    assert adapterkit.validate(tmp_path / "final").valid

    inputs = sample_inputs()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        fresh = adapterkit.apply(adapterkit.load(tmp_path / "final"), tiny_llama())
        assert torch.equal(fresh(**inputs).logits, expected)
        with handle.disabled():
            assert not torch.equal(model(**inputs).logits, expected)  # the adapter changed the model


def test_load_best_model_at_end_saves_the_best_checkpoints_adapter(tmp_path):
    model, handle = prepare(tiny_llama(), "prompt", num_virtual_tokens=4)
    callback = AdapterkitCallback(handle, tmp_path / "final")
    args = arguments(tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", save_total_limit=3, learning_rate=5e-2)
    trainer = Trainer(model=model, args=args, train_dataset=rows(16, 0), eval_dataset=rows(8, 1), callbacks=[callback])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    final, at_best = adapterkit.load(tmp_path / "final"), adapterkit.load(f"{best}/{SUBDIR}")
    assert all((final.tensors[k] == at_best.tensors[k]).all() for k in final.tensors)
    training = final.manifest.provenance["training"]
    assert training["best_checkpoint"] == best.rsplit("/", 1)[-1] and "best_metric" in training


@pytest.mark.parametrize(("method", "options"), [
    ("dora", {"r": 4}),
    ("bottleneck", {"reduction_factor": 4}),
    ("prefix", {"num_virtual_tokens": 4}),
    ("qlora", {"r": 4}),
])
def test_trainer_trains_every_method(tmp_path, method, options):
    model, handle = prepare(tiny_llama(), method, **options)
    before = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", max_steps=2, save_steps=2),
                      train_dataset=rows(8, 0), callbacks=[AdapterkitCallback(handle)])
    trainer.train()
    saved = adapterkit.load(tmp_path / "run" / "checkpoint-2" / SUBDIR)
    assert saved.manifest.method == method and adapterkit.validate(tmp_path / "run" / "checkpoint-2" / SUBDIR).valid
    assert saved.tensors.keys() == before.keys()
    assert any(not torch.equal(torch.as_tensor(saved.tensors[k]), before[k]) for k in before)  # the Trainer trained it


@pytest.mark.parametrize("reentrant", [True, False])
def test_trainer_gradient_checkpointing_trains_every_adapter_tensor(tmp_path, reentrant):
    """With a frozen base, reentrant checkpointing loses the gradients of checkpointed layers unless the inputs
    require grad; every LoRA tensor, first layer included, must still move."""
    model, handle = prepare(tiny_llama(), "lora", r=4)
    before = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    args = arguments(tmp_path / "run", max_steps=2, save_strategy="no", gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    Trainer(model=model, args=args, train_dataset=rows(8, 0)).train()
    after = handle.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []


# The Trainer under torchrun on the CPU: `use_cpu=True` is what makes it join the gloo group as DDP (without it,
# each process trains alone and both write the same folders). Each rank dumps what it saw.
TRAINER_DDP = """
import hashlib, json, os, sys
import torch
from transformers import Trainer, TrainingArguments
from adapterkit.core.train.hf_trainer import AdapterkitCallback, prepare
from adapterkit.testing import tiny_llama

torch.set_num_threads(1)
out = sys.argv[1]
generator = torch.Generator().manual_seed(0)
rows = []
for _ in range(32):
    ids = torch.randint(0, 128, (12,), generator=generator)
    rows.append({"input_ids": ids, "labels": ids.clone()})
model, handle = prepare(tiny_llama(), "lora", r=4, alpha=8)
args = TrainingArguments(output_dir=f"{out}/run", max_steps=4, save_strategy="steps", save_steps=2,
                         per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[],
                         use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                         ddp_find_unused_parameters=False)
callback = AdapterkitCallback(handle, f"{out}/final")
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
trainer.train()
state = handle.state_dict()
digest = hashlib.sha256(b"".join(state[k].detach().numpy().tobytes() for k in sorted(state))).hexdigest()
with open(f"{out}/rank-{os.environ['RANK']}.json", "w") as f:
    json.dump({"world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
               "wrapped": type(trainer.model_wrapped).__name__, "steps": trainer.state.global_step,
               "saved": [os.path.relpath(p, out) for p in callback.saved], "adapter": digest}, f)
"""


def test_the_callback_under_torchrun_ddp_writes_once_from_rank_0(tmp_path):
    from train_helpers import run_checked, torchrun_command

    script = tmp_path / "trainer_ddp.py"
    script.write_text(TRAINER_DDP)
    run_checked([*torchrun_command(2), str(script), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["world_size"] == 2 and seen["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert seen["wrapped"] == "DistributedDataParallel" and seen["steps"] == 4
    assert ranks[0]["adapter"] == ranks[1]["adapter"]  # DDP kept the replicas equal
    assert ranks[0]["saved"] == [f"run/checkpoint-2/{SUBDIR}", f"run/checkpoint-4/{SUBDIR}", "final"]
    assert ranks[1]["saved"] == []  # only the main process writes
    for folder in ("run/checkpoint-2", "run/checkpoint-4"):
        assert adapterkit.validate(tmp_path / folder / SUBDIR).valid
    final = adapterkit.load(tmp_path / "final")
    training = final.manifest.provenance["training"]
    assert training["world_size"] == 2 and training["batch_size"] == 8 and training["steps"] == 4
    digest = hashlib.sha256(b"".join(final.tensors[k].tobytes() for k in sorted(final.tensors))).hexdigest()
    assert digest == ranks[0]["adapter"]  # the saved adapter is the one the ranks ended with
