"""Peer side of the runtime-composition tests; runs in the AdapterHub venv (.venv-adapterhub).

    .venv-adapterhub/bin/python tests/adapterhub_peer/composition_peer.py JOBS.json

JOBS.json is a list of ``{"model": DIR, "adapters": [DIR, ...], "inputs": X.npy, "setups": {KEY: SETUP},
"out": DIR}``: load the model, ``adapters.init``, ``load_adapter`` each folder, then for each setup (an
AdapterHub composition as ``AdapterCompositionBlock.to_dict`` writes it, or an adapter name)
``set_active_adapters`` it and save the logits as ``OUT/KEY.npy``. Prints one JSON line per job.
Nothing here imports adapterkit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import adapters
import transformers
from adapters.composition import AdapterCompositionBlock


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text("utf-8"))
    print(json.dumps({"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__}}),
          flush=True)
    for job in jobs:
        config = transformers.AutoConfig.from_pretrained(job["model"])
        model = getattr(transformers, config.architectures[0]).from_pretrained(job["model"], attn_implementation="eager")
        adapters.init(model)
        names = [model.load_adapter(folder) for folder in job["adapters"]]
        model.eval()
        ids = torch.from_numpy(np.load(job["inputs"]))
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        for key, setup in job["setups"].items():
            block = setup if isinstance(setup, str) else AdapterCompositionBlock.from_dict(setup)
            model.set_active_adapters(block)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            np.save(out / f"{key}.npy", logits.float().numpy())
        print(json.dumps({"model": job["model"], "names": names, "setups": sorted(job["setups"])}), flush=True)


if __name__ == "__main__":
    main()
