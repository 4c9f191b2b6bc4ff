"""Peer side of the PEFT version tests: loads (or makes) adapters with an old PEFT release put first on ``PYTHONPATH``.

    PYTHONPATH=.venv-peft/0.14.0 .venv/bin/python tests/peft_peer/peer.py JOBS.json

(the Makefile's install target puts each release there: ``pip install --no-deps --target .venv-peft/X
peft==X``; torch, transformers and accelerate are the main venv's). JOBS.json is a list of jobs:

- ``{"model": DIR, "adapter": DIR, "inputs": X.npy, "logits": OUT.npy}`` loads the adapter. One JSON line
  is printed: the PEFT version and file, the config keys the release's config class of the folder's
  ``peft_type`` does not have, for LoRA the ``r`` that ``PeftConfig.from_pretrained`` and
  ``LoraConfig.from_pretrained`` read (PEFT 0.14.0 drops every LoRA field through the first when the file has
  a key it does not know) and each LoRA layer's r / lora_alpha / scaling and DoRA flag as built, the warnings
  raised while loading, and the error when loading fails. The logits of ``PeftModel.from_pretrained(base,
  adapter)`` are saved.
- ``{"make": {"peft_type": T, "config": {...}, "seed": S}, "model": DIR, "adapter": DIR, "inputs": X.npy,
  "logits": OUT.npy}`` makes the adapter in this release instead: ``get_peft_model`` with the config, every
  trainable parameter given seeded noise (PEFT zero-initialises parts), ``save_pretrained`` into ``adapter``;
  the line reports the version, and the error when the release cannot make it.

Nothing here imports adapterkit.
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


def make(job: dict) -> dict:
    report: dict = {"adapter": job["adapter"], "peft": peft.__version__, "peft_file": peft.__file__}
    spec = job["make"]
    try:
        config = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[spec["peft_type"]](**spec["config"])
        base = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        model = peft.get_peft_model(base, config)
    except Exception as exc:  # noqa: BLE001 - the test asserts on the message
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return report
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.eval()
    ids = torch.from_numpy(np.load(job["inputs"]))
    with torch.no_grad():
        np.save(job["logits"], model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy())
    model.save_pretrained(job["adapter"])
    return report


def run(job: dict) -> dict:
    if "make" in job:
        return make(job)
    report: dict = {"adapter": job["adapter"], "peft": peft.__version__, "peft_file": peft.__file__}
    with open(f"{job['adapter']}/adapter_config.json", encoding="utf-8") as file:
        keys = json.load(file)
    lora = keys.get("peft_type") == "LORA"
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(keys.get("peft_type"), LoraConfig)
    report["unknown_keys"] = sorted(set(keys) - {f.name for f in dataclasses.fields(config_class)})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if lora:
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
        if lora and hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
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
