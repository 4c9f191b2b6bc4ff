"""Peer side of the torchtune acceptance tests; runs in the separate torchtune venv (.venv-torchtune).

    .venv-torchtune/bin/python tests/torchtune_peer/peer.py JOBS.json

torchtune needs torchao, and torchao in a venv makes every ``import transformers.modeling_utils`` import it
(slow, and it prints warnings), so torchtune lives in its own venv and the main-venv tests drive it through
this script. Tensors are exchanged as ``torch.save`` dicts (read back with ``weights_only=True``), logits as
``.npy``, configs as JSON. JOBS.json is a list of jobs:

- ``{"op": "to_peft", "weights": IN.pt, "heads": {...}, "out": OUT.pt}``: torchtune's own
  ``tune_to_peft_adapter_weights`` of a torchtune adapter state dict (``heads``: num_heads, num_kv_heads,
  dim, head_dim).
- ``{"op": "peft_config", "recipe": {"r", "lora_alpha", "peft_type"}, "lora": LORA, "base_model_name_or_path":
  NAME, "out": OUT.json}``: ``tune_to_peft_adapter_config`` of the recipe, its ``target_modules`` from
  ``get_lora_module_names`` (``LORA``: {"attn": [...], "mlp": bool, "output": bool}).
- ``{"op": "logits", "model": KWARGS, "lora": LORA, "rank": R, "alpha": A, "base": HF.pt, "heads": {...},
  "adapter": IN.pt, "inputs": X.npy, "logits": OUT.npy}``: ``lora_llama2(**KWARGS)``, the HF base weights
  through ``hf_to_tune``, the adapter loaded with ``load_state_dict(strict=False)`` and checked with
  ``validate_missing_and_unexpected_for_lora`` (the report says ``valid`` or the error), then the logits.
- ``{"op": "make", "model": KWARGS, "lora": LORA, "rank": R, "alpha": A, "seed": S, "scale": 0.3, "heads":
  {...}, "base_model_name_or_path": NAME, "out": DIR}``: a checkpoint folder as torchtune's
  ``FullModelHFCheckpointer`` writes it for a LoRA run: ``adapter_model.pt`` (``get_adapter_state_dict`` of a
  ``lora_llama2`` with random LoRA weights), ``adapter_config.json`` (``tune_to_peft_adapter_config``) and
  the PEFT copy of the weights (``tune_to_peft_adapter_weights``) as ``peft_weights.pt``; the caller writes it
  as ``adapter_model.safetensors`` (this venv has no safetensors).

The first line printed is the versions; then one JSON report line per job. Nothing here imports adapterkit.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torchao
import torchtune
from torchtune.models.convert_weights import hf_to_tune, tune_to_peft_adapter_config, tune_to_peft_adapter_weights
from torchtune.models.llama2 import lora_llama2
from torchtune.modules.peft import (
    get_adapter_state_dict,
    get_lora_module_names,
    validate_missing_and_unexpected_for_lora,
)


def load(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def build(job: dict) -> torch.nn.Module:
    lora = job["lora"]
    return lora_llama2(lora["attn"], lora["mlp"], lora["output"], lora_rank=job["rank"], lora_alpha=job["alpha"],
                       **job["model"]).eval()


def to_peft(job: dict) -> dict:
    exported = tune_to_peft_adapter_weights(load(job["weights"]), **job["heads"])
    torch.save(exported, job["out"])
    return {"keys": len(exported)}


def peft_config(job: dict) -> dict:
    lora = job["lora"]
    recipe = {**job["recipe"], "target_modules": get_lora_module_names(lora["attn"], lora["mlp"], lora["output"])}
    config = tune_to_peft_adapter_config(recipe, base_model_name_or_path=job["base_model_name_or_path"])
    with open(job["out"], "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return {}


def logits(job: dict) -> dict:
    model = build(job)
    lora = job["lora"]
    base_missing, base_unexpected = model.load_state_dict(hf_to_tune(load(job["base"]), **job["heads"]), strict=False)
    lora_missing, lora_unexpected = model.load_state_dict(load(job["adapter"]), strict=False)
    report = {"base_missing": base_missing, "base_unexpected": base_unexpected,
              "lora_missing": lora_missing, "lora_unexpected": lora_unexpected}
    try:
        validate_missing_and_unexpected_for_lora(lora["attn"], lora["mlp"], lora["output"], base_missing,
                                                 base_unexpected, lora_missing, lora_unexpected)
        report["valid"] = True
    except AssertionError as error:
        report["valid"] = f"{type(error).__name__}: {error}"
    with torch.no_grad():
        np.save(job["logits"], model(torch.from_numpy(np.load(job["inputs"]))).numpy())
    return report


def make(job: dict) -> dict:
    torch.manual_seed(job["seed"])
    model = build(job)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.copy_(torch.randn_like(param) * job["scale"])
    state = get_adapter_state_dict(model.state_dict())
    torch.save(state, f"{job['out']}/adapter_model.pt")
    torch.save(tune_to_peft_adapter_weights(state, **job["heads"]), f"{job['out']}/peft_weights.pt")
    lora = job["lora"]
    recipe = {"r": job["rank"], "lora_alpha": job["alpha"], "peft_type": "LORA",
              "target_modules": get_lora_module_names(lora["attn"], lora["mlp"], lora["output"])}
    with open(f"{job['out']}/adapter_config.json", "w", encoding="utf-8") as handle:
        json.dump(tune_to_peft_adapter_config(recipe, base_model_name_or_path=job["base_model_name_or_path"]), handle)
    return {"keys": sorted(state)}


OPS = {"to_peft": to_peft, "peft_config": peft_config, "logits": logits, "make": make}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        jobs = json.load(handle)
    print(json.dumps({"versions": {"torchtune": torchtune.__version__, "torchao": torchao.__version__,
                                   "torch": torch.__version__}}), flush=True)
    for job in jobs:
        print(json.dumps({"op": job["op"], "id": job["id"], **OPS[job["op"]](job)}), flush=True)


if __name__ == "__main__":
    main()
