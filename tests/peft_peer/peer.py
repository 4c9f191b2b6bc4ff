"""Peer side of the PEFT version tests: loads adapters with an old PEFT release put first on ``PYTHONPATH``.

    PYTHONPATH=.venv-peft/0.14.0 .venv/bin/python tests/peft_peer/peer.py JOBS.json

(the Makefile's install target puts each release there: ``pip install --no-deps --target .venv-peft/X
peft==X``; torch, transformers and accelerate are the main venv's). JOBS.json is a list of
``{"model": DIR, "adapter": DIR, "inputs": X.npy, "logits": OUT.npy}``. For each job one JSON line is
printed: the PEFT version and file, the config keys the release's ``LoraConfig`` does not have, the ``r``
that ``PeftConfig.from_pretrained`` and ``LoraConfig.from_pretrained`` read (PEFT 0.14.0 drops every LoRA
field through the first when the file has a key it does not know), the warnings raised while loading,
each LoRA layer's r / lora_alpha / scaling and DoRA flag as built, and the error when loading fails.
The logits of ``PeftModel.from_pretrained(base, adapter)`` are saved. Nothing here imports adapterkit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
import warnings

import numpy as np
import torch
import transformers

import peft
from peft import LoraConfig, PeftConfig, PeftModel


def run(job: dict) -> dict:
    report: dict = {"adapter": job["adapter"], "peft": peft.__version__, "peft_file": peft.__file__}
    with open(f"{job['adapter']}/adapter_config.json", encoding="utf-8") as file:
        keys = set(json.load(file))
    report["unknown_keys"] = sorted(keys - {f.name for f in dataclasses.fields(LoraConfig)})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report["peft_config_r"] = PeftConfig.from_pretrained(job["adapter"]).r
            report["lora_config_r"] = LoraConfig.from_pretrained(job["adapter"]).r
            base = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
            model = PeftModel.from_pretrained(base, job["adapter"]).eval()
        report["warnings"] = sorted({str(w.message)[:300] for w in caught
                                     if "unexpected" in str(w.message).lower() or "missing" in str(w.message).lower()})
    except Exception as exc:  # noqa: BLE001 - the test asserts on the message
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        report["traceback"] = traceback.format_exc()[-2000:]
        return report
    layers = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            layers[name] = {"r": module.r["default"], "lora_alpha": module.lora_alpha["default"],
                            "scaling": float(module.scaling["default"]),
                            "dora": bool(getattr(module, "use_dora", {}).get("default", False))}
    report["layers"] = layers
    ids = torch.from_numpy(np.load(job["inputs"]))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()
    np.save(job["logits"], logits)
    return report


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        jobs = json.load(file)
    for job in jobs:
        print(json.dumps(run(job)), flush=True)


if __name__ == "__main__":
    main()
