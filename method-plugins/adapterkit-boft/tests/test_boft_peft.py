"""BOFT against PEFT 0.21 itself: PEFT's folders apply with PEFT's logits, our folders load in PEFT, round trips
are exact, merges equal ``merge_and_unload``; with one butterfly factor (what PEFT runs on a CPU) and with two and
three (PEFT's CUDA-extension path, its ``fbd`` kernel replaced by a torch stand-in)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch

import adapterkit
from adapterkit.testing import TINY_MODELS, PeftInterop, outputs, perturb, sample_inputs, save_tiny_base

from adapterkit_boft.method import BoftMethod, butterfly_perms
from boft_helpers import fake_fbd, set_fbd


@pytest.fixture(scope="module", autouse=True)
def _cpu_peft():
    """One torch thread; PEFT without its CUDA extension (and without trying to compile it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = set_fbd(False)
    yield
    set_fbd(previous)
    torch.set_num_threads(threads)


class TestBoftPeft(PeftInterop):
    """One butterfly factor: what PEFT 0.21 computes on every CPU. (GPT-2 is left out: PEFT's BOFT refuses Conv1D.)"""

    method = "boft"
    peft_configs = {
        "llama": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]),
        "bert": lambda: peft.BOFTConfig(boft_block_num=8, boft_block_size=0, target_modules=["query", "output.dense"],
                                        boft_dropout=0.1),
    }
    configs = {"llama": {"target_modules": ["k_proj", "o_proj"], "boft_block_size": 8},
               "bert": {"target_modules": ["key", "intermediate.dense"], "boft_block_num": 4, "init_weights": False}}


class TestBoftPeftButterfly(PeftInterop):
    """Two and three butterfly factors, through PEFT's own CUDA-extension path (a torch stand-in for the kernel)."""

    method = "boft"
    peft_configs = {
        "llama": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3,
                                         target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"]),
        "bert": lambda: peft.BOFTConfig(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=2,
                                        target_modules=["value", "dense"], exclude_modules=["pooler.dense"]),
    }
    configs = {"llama": {"target_modules": ["v_proj", "up_proj"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}}

    @pytest.fixture(autouse=True)
    def _fbd(self):
        previous = set_fbd(fake_fbd())
        yield
        set_fbd(previous)


@pytest.mark.parametrize("in_features,size,num,factors", [(32, 4, 8, 1), (32, 4, 8, 2), (32, 4, 8, 3), (64, 4, 16, 4),
                                                          (32, 2, 16, 5), (64, 8, 8, 2), (48, 6, 8, 3)])
def test_butterfly_permutations_are_peft_s(in_features, size, num, factors):
    layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(in_features, 4)), peft.BOFTConfig(
        boft_block_size=size, target_modules=["0"])).base_model.model[0]
    for i in range(factors):
        theirs = layer.block_butterfly_perm(in_features, int(num / 2 ** i), int(size / 2), factors - 1)
        assert tuple(theirs.tolist()) == butterfly_perms(in_features, size, num, factors)[i]


def _peft_folder(root: Path, kind: str, config: peft.BOFTConfig, seed: int = 5) -> tuple[Path, torch.Tensor]:
    model = peft.get_peft_model(TINY_MODELS[kind](0), config)
    perturb([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.2)
    model.eval()
    logits = outputs(model, sample_inputs())
    model.save_pretrained(root / "peft")
    return root / "peft", logits


def test_cpu_saved_folder_reads_as_the_one_factor_function_peft_computes(tmp_path):
    """On a CPU PEFT replaces boft_n_butterfly_factor by 1: its folder says 2, its tensors hold one factor."""
    folder, theirs = _peft_folder(tmp_path, "llama", peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                     target_modules=["q_proj", "v_proj"]))
    assert json.loads((folder / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    adapter = adapterkit.load(folder)  # the tensors give every shape: no base needed
    assert {t["n_butterfly_factor"] for t in adapter.targets.values()} == {1}
    assert any("one butterfly factor" in w for w in adapter.warnings)
    ours = outputs(adapterkit.apply(adapter, TINY_MODELS["llama"](0)), sample_inputs())
    assert (ours - theirs).abs().max().item() <= 1e-5
    written = adapterkit.convert(folder, tmp_path / "written", to="peft")
    assert json.loads((written / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 1
    again = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(written)).eval(), sample_inputs())
    assert (again - theirs).abs().max().item() <= 1e-5


def test_layers_pattern_is_read_kept_and_selects_as_peft_does(tmp_path):
    folder, theirs = _peft_folder(tmp_path, "llama", peft.BOFTConfig(
        boft_block_size=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"))
    adapter = adapterkit.load(folder)
    assert adapter.config["layers_pattern"] == "layers" and adapter.config["layers_to_transform"] == [1]
    assert sorted(adapter.targets) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert (outputs(adapterkit.apply(adapter, TINY_MODELS["llama"](0)), sample_inputs()) - theirs).abs().max() <= 1e-5
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "boft", adapter.config)  # the same selection, anew
    assert sorted(handle.to_adapter().targets) == sorted(adapter.targets)


def test_to_lora_with_the_base_is_the_same_function(tmp_path):
    """MergedWeight: to-lora takes diag(s) W M^T - W from the base, full rank exact."""
    base = save_tiny_base("llama", tmp_path / "base")
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "boft", {"target_modules": ["q_proj", "down_proj"], "boft_block_size": 4,
                                               "boft_n_butterfly_factor": 2})
    perturb(handle.parameters(), seed=2, scale=0.2)
    ours = outputs(model, sample_inputs())
    saved = adapterkit.save(handle.to_adapter(), tmp_path / "boft")
    with pytest.raises(adapterkit.AdapterkitError):
        adapterkit.to_lora(saved)  # a rotation needs the base weight
    lowered = adapterkit.to_lora(saved, base=base)
    assert lowered.adapter.method == "lora" and lowered.total_error < 1e-5
    lora = outputs(adapterkit.apply(lowered.adapter, TINY_MODELS["llama"](0)), sample_inputs())
    assert (lora - ours).abs().max().item() <= 1e-4


def test_numpy_merge_equals_the_torch_layer_on_conv1d(tmp_path):
    """GPT-2's Conv1D (stored [in, out]): merged_weight in the stored orientation, as the layer's own merge."""
    model = TINY_MODELS["gpt2"](0)
    handle = adapterkit.inject(model, "boft", {"target_modules": ["c_attn", "c_fc"], "boft_block_size": 8,
                                               "boft_n_butterfly_factor": 2})
    perturb(handle.parameters(), seed=3, scale=0.2)
    adapter = handle.to_adapter()
    bases = {name: m.weight.detach().clone() for name, m in TINY_MODELS["gpt2"](0).named_modules()
             if type(m).__name__ == "Conv1D"}
    handle.merge()
    method = BoftMethod()
    for module, target in adapter.targets.items():
        assert target["kind"] == "conv1d"
        tensors = {p: adapter.tensors[f"{module}.boft.{p}"] for p in ("R", "s")}
        merged = method.merged_weight(module, target, adapter.config, tensors, bases[module].numpy())
        layer_merged = model.get_submodule(module).base_layer.weight.detach().numpy()
        assert merged.shape == layer_merged.shape and np.abs(merged - layer_merged).max() <= 1e-5


def test_conv1d_targets_are_not_written_to_peft(tmp_path):
    model = TINY_MODELS["gpt2"](0)
    handle = adapterkit.inject(model, "boft", {"target_modules": ["c_attn"]})
    saved = adapterkit.save(handle.to_adapter(), tmp_path / "boft")
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D"):
        adapterkit.convert(saved, tmp_path / "peft", to="peft")
    assert not (tmp_path / "peft").exists()


def test_dropout_acts_in_training_only_and_never_in_a_merge():
    torch.manual_seed(0)
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "boft", {"target_modules": ["q_proj"], "boft_block_size": 4,
                                               "boft_dropout": 0.5})
    perturb(handle.parameters(), seed=4, scale=0.3)
    inputs = sample_inputs()
    evaluated = outputs(model, inputs)
    model.train()
    trained = outputs(model, inputs)
    assert not torch.equal(trained, evaluated)
    handle.merge()  # in training mode: the merge holds the whole rotation
    model.eval()
    assert (outputs(model, inputs) - evaluated).abs().max().item() <= 1e-5


def _tamper(folder: Path, **fields) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("field,value", [("bias", "boft_only"), ("modules_to_save", ["lm_head"])])
def test_a_peft_field_boft_cannot_hold_is_refused(tmp_path, field, value):
    folder, _ = _peft_folder(tmp_path, "llama", peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    _tamper(folder, **{field: value})
    with pytest.raises(adapterkit.LossyConversionError) as info:
        adapterkit.load(folder)
    assert info.value.location == f"$.{field}"


def test_inconsistent_peft_folders_are_refused(tmp_path):
    folder, _ = _peft_folder(tmp_path, "llama", peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    _tamper(folder, boft_block_size=8)
    with pytest.raises(adapterkit.FormatError, match="blocks of 4"):
        adapterkit.load(folder)
    _tamper(folder, boft_block_size=4, boft_block_num=8)
    with pytest.raises(adapterkit.FormatError, match="exactly one"):
        adapterkit.load(folder)
    _tamper(folder, boft_block_size=4, boft_block_num=0)
    with pytest.raises(adapterkit.BaseModelError):
        adapterkit.load(folder, base=save_tiny_base("bert", tmp_path / "bert"))


def test_the_butterfly_permutations_peft_0_11_saved_are_checked_and_not_kept(tmp_path):
    """PEFT 0.11 / 0.12 saved each module's boft_P buffer: a file holding PEFT's own buffers (two butterfly
    factors, through the CUDA-extension path) reads as the file without them; any other permutation is refused."""
    from safetensors.numpy import load_file, save_file

    previous = set_fbd(fake_fbd())
    try:
        folder, _ = _peft_folder(tmp_path, "llama", peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                    target_modules=["q_proj", "down_proj"]))
        model = peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(folder))
        buffers = {f"{name}.boft_P": module.boft_P.detach().numpy() for name, module in model.named_modules()
                   if hasattr(module, "boft_P") and isinstance(module.boft_P, torch.Tensor)}
    finally:
        set_fbd(previous)
    assert buffers and all(b.shape[0] == 2 for b in buffers.values())
    without = adapterkit.load(folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({**tensors, **buffers}, file, metadata={"format": "pt"})
    with_p = adapterkit.load(folder)
    assert with_p.targets == without.targets and with_p.tensors.keys() == without.tensors.keys()
    assert all(np.array_equal(with_p.tensors[k], v) for k, v in without.tensors.items())
    key = sorted(buffers)[0]
    wrong = buffers[key].copy()
    wrong[0, [0, 1]] = wrong[0, [1, 0]]  # swap two rows: a permutation, not PEFT's
    save_file({**tensors, **buffers, key: wrong}, file, metadata={"format": "pt"})
    with pytest.raises(adapterkit.LossyConversionError, match="not the butterfly permutation") as caught:
        adapterkit.load(folder)
    assert caught.value.location == key
