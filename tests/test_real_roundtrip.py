"""Real data: a LoRA trained on SmolLM2-135M goes to every format and back.

One LoRA on all seven linear kinds of SmolLM2-135M (210 modules, r 8, alpha 16),
trained for a few AdamW steps (so B is not zero), then for each installed
format: adapterkit -> format -> adapterkit. Formats that store the scale give
back the same tensors bit for bit; the ``.onnx_adapter`` file has no scale
(alpha = r on reading, the scale folded into B) and gives back the same
``delta_weight`` bit for bit (the scale is 2, a power of two). AdapterHub cannot
hold LoRA on ``o_proj`` / ``gate_proj``: it refuses, naming the module, and
takes the adapter restricted to the modules it supports. The PEFT folder is
also loaded by PEFT itself on the real model and must give the logits of the
adapter applied by adapterkit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.core.format.adapter import Adapter, split_key
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.errors import LossyConversionError
from adapterkit.core.plugin.registry import default_registry

pytestmark = pytest.mark.slow

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEEDS_BASE = {"gguf"}  # writing needs the base's config (llama.cpp names, rotary row order)
READ_WITH_BASE = {"gguf", "onnx-adapter"}  # reading maps names back to modules (and Conv1D) through the base
ADAPTERHUB_KINDS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory) -> tuple[Path, Adapter]:
    from adapterkit.core.runtime.models import load_base

    torch.manual_seed(0)
    model = load_base(smollm2_dir)
    handle = adapterkit.inject(model, "lora", {"r": 8, "alpha": 16, "target_modules": KINDS})
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = handle.to_adapter()
    assert len(adapter.manifest.targets) == 30 * 7
    assert all(np.any(v) for k, v in adapter.tensors.items() if k.endswith(".B")), "B is still zero"
    return adapterkit.save(adapter, tmp_path_factory.mktemp("real") / "src"), adapter


BUILT_IN_FORMATS = ["adapterhub", "gguf", "kohya", "mlx", "onnx-adapter", "peft", "torchtune"]


def test_every_built_in_format_is_covered():
    """Third-party formats (an installed plugin's) are not ours to round-trip a LoRA through."""
    formats = default_registry().formats
    ours = {name for name, fmt in formats.items() if type(fmt).__module__.startswith("adapterkit.plugins.")}
    assert ours - {"adapterkit"} == set(BUILT_IN_FORMATS)


@pytest.mark.parametrize("fmt", [f for f in BUILT_IN_FORMATS if f not in ("adapterhub", "onnx-adapter")])
def test_to_the_format_and_back_gives_the_same_adapter(fmt, trained, smollm2_dir, tmp_path):
    src, adapter = trained
    options = {"base": smollm2_dir} if fmt in NEEDS_BASE else {}
    out = adapterkit.convert(src, tmp_path / fmt, fmt, **options)
    assert adapterkit.detect_format(out) == fmt
    back = adapterkit.load(out, **({"base": smollm2_dir} if fmt in READ_WITH_BASE else {}))
    assert back.manifest.targets == adapter.manifest.targets
    assert sorted(back.tensors) == sorted(adapter.tensors)
    for key, value in adapter.tensors.items():
        assert back.tensors[key].dtype == value.dtype and np.array_equal(back.tensors[key], value), key
    assert adapterkit.validate(out, base=smollm2_dir).valid


def test_onnx_adapter_gives_back_the_same_weight_updates(trained, smollm2_dir, tmp_path):
    src, adapter = trained
    out = adapterkit.convert(src, tmp_path / "ort", "onnx-adapter")
    back = adapterkit.load(out, base=smollm2_dir)
    lora = default_registry().method("lora")
    assert sorted(back.manifest.targets) == sorted(adapter.manifest.targets)
    for module, target in adapter.manifest.targets.items():
        want = lora.delta_weight(module, target, adapter.manifest.config, adapter.module_tensors(module))
        got = lora.delta_weight(module, back.manifest.targets[module], back.manifest.config, back.module_tensors(module))
        assert np.array_equal(got, want), module


def test_adapterhub_refuses_what_it_cannot_hold_and_round_trips_the_rest(trained, tmp_path):
    src, adapter = trained
    with pytest.raises(LossyConversionError) as info:
        adapterkit.convert(src, tmp_path / "hub", "adapterhub")
    assert "gate_proj" in str(info.value) or "o_proj" in str(info.value)
    assert not (tmp_path / "hub").exists()
    subset = restrict(adapter, ADAPTERHUB_KINDS)
    out = adapterkit.convert(adapterkit.save(subset, tmp_path / "subset"), tmp_path / "hub", "adapterhub")
    back = adapterkit.load(out)
    assert back.manifest.targets == subset.manifest.targets
    for key, value in subset.tensors.items():
        assert np.array_equal(back.tensors[key], value), key


def test_peft_loads_the_converted_folder_with_the_same_logits(trained, smollm2_dir, tmp_path):
    import peft

    from adapterkit.core.runtime.models import load_base

    src, adapter = trained
    out = adapterkit.convert(src, tmp_path / "peft", "peft")
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = adapterkit.apply(adapter, load_base(smollm2_dir))(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(load_base(smollm2_dir), str(out))(input_ids=ids).logits
        base = load_base(smollm2_dir)(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the model
    assert (ours - theirs).abs().max() <= 1e-4, float((ours - theirs).abs().max())


def restrict(adapter: Adapter, kinds: list[str]) -> Adapter:
    """The adapter on the modules whose last name is in ``kinds`` only (a valid adapter of its own)."""
    manifest = copy.deepcopy(adapter.manifest)
    manifest.targets = {m: t for m, t in manifest.targets.items() if m.rsplit(".", 1)[-1] in kinds}
    manifest.config["target_modules"] = sorted(kinds)
    manifest.base_model["fingerprint"] = targets_fingerprint(manifest.targets)
    manifest.tensors = {}
    tensors = {k: v for k, v in adapter.tensors.items() if split_key(k, "lora")[0] in manifest.targets}
    return Adapter(manifest, tensors)
