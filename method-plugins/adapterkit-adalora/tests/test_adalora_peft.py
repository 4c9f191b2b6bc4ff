"""The PEFT ADALORA codec against the real PEFT 0.21.2: PEFT's folders (plain and pruned by a rank_pattern) read
with PEFT's logits, ours load in PEFT, round trips exact, merge equals merge_and_unload; the rank allocator
against PEFT's own; the adapter pool serving an AdaLoRA adapter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.testing import PeftInterop, TINY_MODELS, outputs, perturb, sample_inputs

from adalora_helpers import CONFIGS, peft_config, prune

import peft


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="peft")
    yield
    torch.set_num_threads(threads)


class TestAdaLoraPeft(PeftInterop):
    method = "adalora"
    peft_configs = {kind: (lambda kind=kind: peft_config(kind)) for kind in CONFIGS}
    configs = CONFIGS


class TestAdaLoraPeftPruned(PeftInterop):
    """Folders PEFT saves after budget pruning: rank_pattern of boolean masks, tensors cut to the kept ranks (one
    module at rank 0)."""

    method = "adalora"
    peft_configs = {"llama": lambda: peft_config("llama"), "gpt2": lambda: peft_config("gpt2")}

    def randomize(self, peft_model, seed):
        super().randomize(peft_model, seed)
        prune(peft_model, seed)

    def test_folder_is_pruned(self, kind, tmp_path):
        _, folder, _ = self._peft_folder(kind, tmp_path)
        config = json.loads((folder / "adapter_config.json").read_text())
        ranks = [sum(mask) for mask in config["rank_pattern"].values()]
        assert 0 in ranks and CONFIGS[kind]["init_r"] in ranks and all(k.endswith(".lora_E") for k in config["rank_pattern"])
        adapter = self._load(folder, tmp_path / "base")
        # a module pruned to rank 0 adds nothing: no target, no empty tensor; its mask stays in rank_pattern
        assert sorted(t["r"] for t in adapter.targets.values()) == sorted(r for r in ranks if r)
        assert adapter.config["rank_pattern"] == config["rank_pattern"]
        zero = [key.removesuffix(".lora_E") for key, mask in config["rank_pattern"].items() if not any(mask)]
        assert zero and not set(zero) & set(adapter.targets)
        assert all(min(t.shape) > 0 for t in adapter.tensors.values())
        assert adapterkit.validate(adapterkit.save(adapter, tmp_path / "native")).valid


def test_pruned_with_alpha_zero_reads_as_peft_loads_it(tmp_path):
    """lora_alpha <= 0: scaling is the module's rank, which PEFT takes from the resized module when it loads a
    pruned folder (its live model before saving used init_r): we give what PeftModel.from_pretrained gives."""
    model = peft.get_peft_model(TINY_MODELS["gpt2"](0), peft_config("gpt2", lora_alpha=0))
    perturb([p for p in model.parameters() if p.requires_grad], seed=4, scale=0.3)
    prune(model, 4)
    model.save_pretrained(tmp_path / "peft")
    inputs = sample_inputs()
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["gpt2"](0), str(tmp_path / "peft")).eval(), inputs)
    adapter = adapterkit.load(tmp_path / "peft")
    assert {t["kind"] for t in adapter.targets.values()} == {"conv1d"}
    diff = (outputs(adapterkit.apply(adapter, TINY_MODELS["gpt2"](0)), inputs) - theirs).abs().max().item()
    assert diff <= 1e-5
    back = adapterkit.convert(adapterkit.save(adapter, tmp_path / "native"), tmp_path / "back", to="peft")
    again = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["gpt2"](0), str(back)).eval(), inputs)
    assert (again - theirs).abs().max().item() <= 1e-5


def test_adapterkit_pruned_adapter_loads_in_peft(tmp_path):
    """An adapter of adapterkit whose ranks differ per module (no rank_pattern in its config): the writer makes
    one mask per module and PEFT reproduces our logits. The module the config prunes to rank 0 is not adapted."""
    config = {**CONFIGS["llama"], "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [False] * 4,
                                                   "model.layers.1.mlp.down_proj.lora_E": [True, False, True, False]}}
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "adalora", config)
    perturb(handle.parameters(), seed=3, scale=0.3)
    ours = outputs(model, sample_inputs())
    adapter = handle.to_adapter()
    assert "model.layers.0.self_attn.q_proj" not in adapter.targets
    adapter.manifest.config.pop("rank_pattern")
    folder = adapterkit.save(adapter, tmp_path / "peft", format="peft")
    written = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(sum(m) for m in written["rank_pattern"].values()) == [2] + [4] * 4
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(folder)).eval(), sample_inputs())
    diff = (theirs - ours).abs().max().item()
    print(f"\nadapterkit pruned -> PEFT max abs logit diff {diff:.3g}")
    assert diff <= 1e-5


def _peft_train(kind, steps, config):
    """A PEFT AdaLoRA model trained `steps` steps with PEFT's update_and_allocate; returns the model per step."""
    torch.manual_seed(0)
    model = peft.get_peft_model(TINY_MODELS[kind](0), config)
    perturb([p for p in model.parameters() if p.requires_grad], seed=1, scale=0.2)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rank_allocator_matches_peft(kind):
    """Our after_step against PEFT's update_and_allocate on the same model, gradients and optimizer: the same
    masks and parameters at every step, through the budget phase, the final mask and the final phase."""
    extra = {"total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 2}
    peft_model = _peft_train(kind, 8, peft_config(kind, **extra))
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, "adalora", {**CONFIGS[kind], **extra})
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = dict(zip(handle.state_dict(), handle.parameters()))
    leaf = {"A": "lora_A", "E": "lora_E", "B": "lora_B"}
    pairs = [(mine[k], theirs[f"{k.rsplit('.', 2)[0]}.{leaf[k.rsplit('.', 1)[1]]}"]) for k in mine]
    with torch.no_grad():
        for ours, peft_param in pairs:
            ours.copy_(peft_param)
    method = adapterkit.default_registry().method("adalora")
    opt_a = torch.optim.SGD([p for p, _ in pairs], lr=0.05)
    opt_b = torch.optim.SGD([q for _, q in pairs], lr=0.05)
    inputs = sample_inputs()
    patterns = []
    for step in range(1, 9):
        for net, opt in ((model, opt_a), (peft_model, opt_b)):
            net.eval()  # no dropout: the same gradients on both sides
            loss = net(**inputs).logits.float().pow(2).mean()
            loss.backward()
            opt.step()
        method.after_step(model, "default", step, 8)
        peft_model.base_model.update_and_allocate(step)
        for ours, peft_param in pairs:
            assert torch.allclose(ours, peft_param, rtol=0, atol=1e-6), f"step {step}"
            assert torch.equal(ours == 0, peft_param == 0), f"step {step}: another mask"
        opt_a.zero_grad()
        opt_b.zero_grad()
        patterns.append(method.training_state(model, "default")["rank_pattern"])
    final = peft_model.peft_config["default"].rank_pattern
    assert patterns[-1] == {k.replace(".default", ""): v for k, v in final.items()}
    kept = sum(sum(v) for v in final.values())
    assert kept <= CONFIGS[kind]["target_r"] * len(final) < CONFIGS[kind]["init_r"] * len(final)
    assert handle.config["total_step"] == 8


def test_orthogonal_penalty_matches_peft():
    config = peft_config("llama", orth_reg_weight=0.3)
    peft_model = peft.get_peft_model(TINY_MODELS["llama"](0), config)
    perturb([p for p in peft_model.parameters() if p.requires_grad], seed=2, scale=0.3)
    folder_model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(folder_model, "adalora", {**CONFIGS["llama"], "orth_reg_weight": 0.3})
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if p.requires_grad}
    leaf = {"A": "lora_A", "E": "lora_E", "B": "lora_B"}
    with torch.no_grad():
        for key, param in zip(handle.state_dict(), handle.parameters()):
            param.copy_(theirs[f"{key.rsplit('.', 2)[0]}.{leaf[key.rsplit('.', 1)[1]]}"])
    inputs = {**sample_inputs(), "labels": sample_inputs()["input_ids"]}
    peft_model.train()
    with_reg = peft_model(**inputs).loss
    plain = peft_model.base_model.model(**inputs).loss
    method = adapterkit.default_registry().method("adalora")
    term = method.training_loss(folder_model, "default")
    assert abs(term.item() - (with_reg - plain).item()) <= 1e-5


def test_pool_serves_an_adalora_adapter(tmp_path):
    """The adapter pool (LowRank) runs an AdaLoRA adapter in a mixed batch: its rows get the adapter's logits."""
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "adalora", {**CONFIGS["llama"], "target_modules": ["q_proj", "v_proj"],
                                                  "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [False] * 4}})
    perturb(handle.parameters(), seed=5, scale=0.3)
    adapter = handle.to_adapter()
    inputs = sample_inputs(batch=3)
    alone = outputs(adapterkit.apply(adapter, TINY_MODELS["llama"](0)), inputs)
    base = outputs(TINY_MODELS["llama"](0), inputs)
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=2, max_rank=4,
                                  target_modules=["q_proj", "v_proj"])
    pool.load("ada", adapter)
    with torch.no_grad():
        mixed = pool(**inputs, adapter_names=["ada", None, "ada"]).logits
    for row, want in ((0, alone), (1, base), (2, alone)):
        diff = (mixed[row] - want[row]).abs().max().item()
        assert diff <= 1e-5, (row, diff)
    assert (alone - base).abs().max().item() > 1e-3


def test_config_fields_peft_cannot_hold_are_refused(tmp_path):
    folder = tmp_path / "peft"
    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft_config("llama"))
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert adapterkit.load(folder).method == "adalora"
    for field, value, error in (("bias", "all", adapterkit.LossyConversionError),
                                ("modules_to_save", ["lm_head"], adapterkit.LossyConversionError),
                                ("beta1", 1.5, adapterkit.FormatError)):
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(error) as info:
            adapterkit.load(folder)
        assert field in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("field,value", [("init_r", "eight"), ("init_r", 0),
                                         ("rank_pattern", {"model.layers.0.self_attn.q_proj.lora_E": [True]})])
def test_a_bad_config_value_is_named_before_the_tensors_are_checked(tmp_path, field, value):
    """The tensor checks rely on init_r and rank_pattern: a bad value is named at its field, not as a shape error."""
    folder = tmp_path / "peft"
    peft.get_peft_model(TINY_MODELS["llama"](0), peft_config("llama")).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(adapterkit.FormatError) as caught:
        adapterkit.load(folder)
    assert caught.value.code == "bad_config" and caught.value.location.startswith(f"$.{field}"), caught.value


def test_writer_refuses_without_total_step(tmp_path):
    model = TINY_MODELS["llama"](0)
    config = {k: v for k, v in CONFIGS["llama"].items() if k != "total_step"}
    adapter = adapterkit.inject(model, "adalora", config).to_adapter()
    with pytest.raises(adapterkit.LossyConversionError, match="total_step"):
        adapterkit.save(adapter, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


def test_a_rank_0_target_is_refused_as_empty_tensors(tmp_path):
    """adapterkit's format has no empty tensor: an adapter whose manifest keeps a module at rank 0 (zero-sized
    factors, as PEFT stores a pruned module) does not validate; the reader leaves such a module out instead."""
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "adalora", CONFIGS["llama"])
    adapter = handle.to_adapter()
    module = sorted(adapter.targets)[0]
    adapter.targets[module]["r"] = 0
    adapter.tensors[f"{module}.adalora.A"] = adapter.tensors[f"{module}.adalora.A"][:0]
    adapter.tensors[f"{module}.adalora.E"] = adapter.tensors[f"{module}.adalora.E"][:0]
    adapter.tensors[f"{module}.adalora.B"] = adapter.tensors[f"{module}.adalora.B"][:, :0]
    with pytest.raises(adapterkit.AdapterkitError) as caught:
        adapterkit.save(adapter, tmp_path / "zero")
    # the target schema (r >= 1), the method's check_target, and one empty_tensor per factor
    assert caught.value.code == "invalid_adapter" and "(5 problem(s))" in caught.value.message
    assert "minimum of 1" in caught.value.message and not (tmp_path / "zero").exists()
