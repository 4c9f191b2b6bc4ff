"""PEFT VERA folders beyond the interop kit: save_projection false (projections redrawn bit for bit, as PEFT
does), layer selection, refusals of what a VeRA adapter cannot hold, and reading without a base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, sample_inputs, save_tiny_base


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peft_folder(kind: str, config, root: Path, seed: int = 7) -> tuple[Path, Path, torch.Tensor]:
    base = save_tiny_base(kind, root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(TINY_MODELS[kind](0), config)
        perturb([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.3)
        model.eval()
        logits = outputs(model, sample_inputs())
        model.save_pretrained(root / "peft")
    return base, root / "peft", logits


def peft_logits(kind: str, folder: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return outputs(peft.PeftModel.from_pretrained(TINY_MODELS[kind](0), str(folder)).eval(), sample_inputs())


def applied(kind: str, adapter) -> torch.Tensor:
    return outputs(adapterkit.apply(adapter, TINY_MODELS[kind](0)), sample_inputs())


@pytest.mark.parametrize("kind,config", [
    ("llama", lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], save_projection=False,
                                      projection_prng_key=1234)),
    ("gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_proj"], save_projection=False,
                                     fan_in_fan_out=True)),
])
def test_save_projection_false_is_redrawn_bit_for_bit(kind, config, tmp_path):
    base, folder, theirs = peft_folder(kind, config(), tmp_path)
    assert not any("vera_A" in k for k in load_file(folder / "adapter_model.safetensors"))
    adapter = adapterkit.load(folder, base=base)
    # the redrawn projections are PEFT's own: a save_projection=True model with the same key holds the same bits
    reference = peft.get_peft_model(TINY_MODELS[kind](0), config().__class__(**{**config().to_dict(),
                                                                                "save_projection": True}))
    assert adapter.tensors["vera.A"].tobytes() == reference.base_model.vera_A["default"].numpy().tobytes()
    assert adapter.tensors["vera.B"].tobytes() == reference.base_model.vera_B["default"].numpy().tobytes()
    assert (applied(kind, adapter) - theirs).abs().max().item() <= 1e-5
    # written back: still without projections (they redraw exactly), and PEFT gives its own logits
    native = adapterkit.save(adapter, tmp_path / "native")
    written = adapterkit.convert(native, tmp_path / "written", to="peft", base=base)
    assert json.loads((written / "adapter_config.json").read_text())["save_projection"] is False
    assert not any("vera_A" in k for k in load_file(written / "adapter_model.safetensors"))
    assert (peft_logits(kind, written) - theirs).abs().max().item() <= 1e-5
    again = adapterkit.load(written, base=base)
    assert all(again.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())


def test_changed_projections_are_written_even_when_save_projection_is_false(tmp_path):
    base, folder, _ = peft_folder("llama", peft.VeraConfig(r=4, target_modules=["v_proj"], save_projection=False),
                                  tmp_path)
    adapter = adapterkit.load(folder, base=base)
    adapter.tensors["vera.A"] = adapter.tensors["vera.A"] * 2  # no longer what the key redraws
    written = adapterkit.save(adapter, tmp_path / "written", format="peft", base=base)
    assert json.loads((written / "adapter_config.json").read_text())["save_projection"] is True
    assert (peft_logits("llama", written) - applied("llama", adapter)).abs().max().item() <= 1e-5


def test_layers_pattern_and_init_weights_false(tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1],
                             layers_pattern="layers", init_weights=False, vera_dropout=0.1, d_initial=0.5)
    base, folder, theirs = peft_folder("llama", config, tmp_path)
    adapter = adapterkit.load(folder, base=base)
    assert sorted(adapter.targets) == ["model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.k_proj"]
    assert adapter.config["layers_to_transform"] == [1] and adapter.config["layers_pattern"] == "layers"
    assert adapter.config["init_weights"] is False and adapter.config["vera_dropout"] == 0.1
    assert (applied("llama", adapter) - theirs).abs().max().item() <= 1e-5
    # the method config selects the same modules in adapterkit
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "vera", adapter.config)
    assert sorted(handle.targets) == sorted(adapter.targets)
    written = adapterkit.save(adapter, tmp_path / "written", format="peft", base=base)
    fields = json.loads((written / "adapter_config.json").read_text())
    assert fields["layers_to_transform"] == [1] and fields["init_weights"] is False and fields["d_initial"] == 0.5
    assert (peft_logits("llama", written) - theirs).abs().max().item() <= 1e-5


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,field", [({"bias": "all"}, "$.bias"), ({"bias": "vera_only"}, "$.bias"),
                                           ({"modules_to_save": ["lm_head"]}, "$.modules_to_save"),
                                           ({"r": 0}, "$.r"), ({"save_projection": "yes"}, "$.save_projection")])
def test_what_a_vera_adapter_cannot_hold_is_refused(changes, field, tmp_path):
    base, folder, _ = peft_folder("llama", peft.VeraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(adapterkit.AdapterkitError) as caught:
        adapterkit.load(folder, base=base)
    assert caught.value.location == field, str(caught.value)


def test_extra_tensors_missing_projections_and_no_base_are_refused(tmp_path):
    base, folder, _ = peft_folder("llama", peft.VeraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    with pytest.raises(adapterkit.FormatError, match="base model is needed"):
        adapterkit.load(folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(128, 32)}, file, metadata={"format": "pt"})
    with pytest.raises(adapterkit.LossyConversionError, match="would be lost"):
        adapterkit.load(folder, base=base)
    save_file({k: v for k, v in tensors.items() if "vera_B" not in k}, file, metadata={"format": "pt"})
    with pytest.raises(adapterkit.FormatError, match="vera_A / vera_B"):
        adapterkit.load(folder, base=base)
    # a wrong base: the output vector does not fit
    save_file(tensors, file, metadata={"format": "pt"})
    other = save_tiny_base("gpt2", tmp_path / "gpt2")
    with pytest.raises(adapterkit.BaseModelError):
        adapterkit.load(folder, base=other)


def test_larger_projections_are_sliced_with_a_warning(tmp_path):
    """A second PEFT adapter reuses the first one's (larger) projections; only the used slices are kept."""
    base, folder, _ = peft_folder("llama", peft.VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path)
    ours = adapterkit.load(folder, base=base)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors = {k: v for k, v in tensors.items() if "down_proj" not in k}  # q_proj only: in 32, out 32
    save_file(tensors, file, metadata={"format": "pt"})
    _edit_config(folder, target_modules=["q_proj"])
    sliced = adapterkit.load(folder, base=base)
    assert sliced.tensors["vera.A"].shape == (4, 32) and sliced.warnings
    assert sliced.tensors["vera.A"].tobytes() == ours.tensors["vera.A"][:, :32].copy().tobytes()
