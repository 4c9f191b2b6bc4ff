"""Peer side of the AdapterHub acceptance tests; runs in the separate AdapterHub venv (.venv-adapterhub).

    .venv-adapterhub/bin/python tests/adapterhub_peer/peer.py JOBS.json

JOBS.json is a list of jobs; each writes its results (logits as .npy, a JSON report) where the job says:

- ``{"op": "run", "model": DIR, "adapter": DIR, "inputs": X.npy, "logits": OUT.npy, "base_logits": OUT.npy,
  "safetensors": false}``: load the model folder, ``adapters.init``, ``model.load_adapter(adapter)``,
  ``set_active_adapters``, and save the logits (and the logits without the adapter).
- ``{"op": "make", "model": DIR, "config": "seq_bn" | "double_seq_bn" | "par_bn" | "lora", "options": {...},
  "name": NAME, "out": DIR, "inputs": X.npy, "logits": OUT.npy, "seed": 0, "safetensors": false}``: add a
  fresh adapter, give every adapter parameter non-trivial values, ``save_adapter`` it, and save its logits.

A report (keys loaded, missing, unexpected) is printed as one JSON line per job. Nothing here imports adapterkit.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import adapters
import transformers
from adapters import DoubleSeqBnConfig, LoRAConfig, ParBnConfig, SeqBnConfig

CONFIGS = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "par_bn": ParBnConfig, "lora": LoRAConfig}


def load_model(folder: str) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    adapters.init(model)
    return model


def logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    input_ids = torch.from_numpy(ids)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float().numpy()


def run(job: dict) -> dict:
    model = load_model(job["model"])
    ids = np.load(job["inputs"])
    report: dict = {"op": "run", "adapter": job["adapter"]}
    if job.get("base_logits"):
        np.save(job["base_logits"], logits(model, ids))
    info: dict = {}
    name = model.load_adapter(job["adapter"], use_safetensors=job.get("safetensors", False), loading_info=info)
    model.set_active_adapters(name)
    model.eval()
    report.update(name=name, missing=sorted(info.get("missing_keys", [])), unexpected=sorted(info.get("unexpected_keys", [])),
                  adapter_params=sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n))
    np.save(job["logits"], logits(model, ids))
    return report


def make(job: dict) -> dict:
    model = load_model(job["model"])
    ids = np.load(job["inputs"])
    name = job["name"]
    model.add_adapter(name, config=CONFIGS[job["config"]](**job.get("options", {})))
    generator = torch.Generator().manual_seed(job.get("seed", 0))
    seen = set()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key and id(param) not in seen:
                seen.add(id(param))
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_adapter(job["out"], name, use_safetensors=job.get("safetensors", False))
    model.set_active_adapters(name)
    model.eval()
    np.save(job["logits"], logits(model, ids))
    return {"op": "make", "name": name, "out": job["out"], "params": len(seen)}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        jobs = json.load(handle)
    print(json.dumps({"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                                   "torch": torch.__version__}}), flush=True)
    for job in jobs:
        report = run(job) if job["op"] == "run" else make(job)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
