"""adapterkit.core.ops.merge: streaming merge into a base folder, checked against PEFT's merge_and_unload."""

from __future__ import annotations

import abc

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.errors import AdapterkitError, BaseModelError, UsageError
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.ops.merge import merge_into_base

import torch
import peft

from models import sample_inputs, save_tiny  # noqa: E402

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_MODULES = ["c_attn", "c_proj", "c_fc"]


def load_causal_lm(folder: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_lora(base: Path, seed: int = 0, **config: Any):
    """A PEFT LoRA model on ``base`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(base)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(init_lora_weights=False, **config))


def adapter_from_peft(model, name: str = "default", config: dict | None = None) -> Adapter:
    """The PEFT adapter ``name`` in adapterkit's canonical layout (per-module r and alpha recorded)."""
    from peft.tuners.lora import LoraLayer

    peft_config = model.peft_config[name]
    targets, tensors = {}, {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            base = module.get_base_layer()
            kind = "conv1d" if type(base).__name__ == "Conv1D" else "linear"
            targets[path] = {"kind": kind, "shape": list(base.weight.shape), "r": module.r[name],
                             "alpha": module.lora_alpha[name]}
            tensors[f"{path}.lora.A"] = module.lora_A[name].weight.detach().numpy().copy()
            tensors[f"{path}.lora.B"] = module.lora_B[name].weight.detach().numpy().copy()
    config = config or {"r": peft_config.r, "alpha": peft_config.lora_alpha, "use_rslora": peft_config.use_rslora}
    model_type = model.base_model.model.config.model_type
    return Adapter(Manifest(method="lora", config=config, targets=targets, dtype="float32",
                            base_model={"model_type": model_type}), tensors)


def logits(model) -> Any:
    with torch.no_grad():
        return model(**sample_inputs()).logits


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


CASES = {
    "llama-lora": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_MODULES)),
    "llama-rslora-patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_MODULES,
                                            rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3})),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=16, target_modules=GPT2_MODULES, fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_logits_match_peft_merge_and_unload(case, tiny_base_dirs, tmp_path):
    kind, config = CASES[case]
    base = tiny_base_dirs[kind]
    model = peft_lora(base, **config)
    adapter = adapter_from_peft(model)
    expected = logits(model.merge_and_unload())

    out = merge_into_base(adapter, base, tmp_path / "merged")

    assert out == tmp_path / "merged"
    assert max_diff(logits(load_causal_lm(out)), expected) <= 1e-5
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()


def test_a_peft_folder_merges_directly(tiny_base_dirs, tmp_path):
    """Any installed format is read: here a folder written by PEFT's save_pretrained."""
    base = tiny_base_dirs["gpt2"]
    model = peft_lora(base, r=4, lora_alpha=8, target_modules=GPT2_MODULES, fan_in_fan_out=True)
    model.save_pretrained(tmp_path / "peft")
    expected = logits(model.merge_and_unload())
    out = merge_into_base(tmp_path / "peft", base, tmp_path / "merged")
    assert max_diff(logits(load_causal_lm(out)), expected) <= 1e-5


def test_untouched_tensors_are_byte_identical(tiny_base_dirs, tmp_path):
    base = tiny_base_dirs["llama"]
    adapter = adapter_from_peft(peft_lora(base, r=2, lora_alpha=2, target_modules=["q_proj"]))
    out = merge_into_base(adapter, base, tmp_path / "merged")
    before = safetensors_io.read_header(base / "model.safetensors")
    after = safetensors_io.read_header(out / "model.safetensors")
    assert after.metadata == before.metadata
    assert sorted(after.tensors) == sorted(before.tensors)
    for key in before.tensors:
        old, new = safetensors_io.read_tensor(before, key), safetensors_io.read_tensor(after, key)
        assert new.dtype == old.dtype
        assert np.array_equal(old, new) == ("q_proj" not in key), key


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """Tiny llama saved in several shards, with tokenizer-like files and things that must not be copied."""
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    model = load_causal_lm(save_tiny("llama", tmp_path_factory.mktemp("plain") / "llama"))
    model.save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (folder / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
    (folder / "README.md").write_text("# tiny\n")
    (folder / "pytorch_model.bin").write_bytes(b"stale weights")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    return folder


def test_sharded_base_keeps_shards_index_and_side_files(sharded_llama, tmp_path):
    base = sharded_llama
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = peft_lora(base, r=4, lora_alpha=8, target_modules=LLAMA_MODULES)
    adapter = adapter_from_peft(model)
    expected = logits(model.merge_and_unload())

    out = merge_into_base(adapter, base, tmp_path / "merged")

    assert max_diff(logits(load_causal_lm(out)), expected) <= 1e-5
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    sizes = sum(info.nbytes for shard in set(new_index["weight_map"].values())
                for info in safetensors_io.read_header(out / shard).tensors.values())
    assert new_index["metadata"]["total_size"] == sizes == index["metadata"]["total_size"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md", "config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()
    assert not (out / ".cache").exists()
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))


def test_dtype_bfloat16_rounds_the_float32_sum_once(sharded_llama, tmp_path):
    import ml_dtypes

    base = sharded_llama
    adapter = adapter_from_peft(peft_lora(base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    out = merge_into_base(adapter, base, tmp_path / "merged", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] // 2
    lora = _lora_method()
    for key, shard in index["weight_map"].items():
        got = safetensors_io.read_tensor(safetensors_io.read_header(out / shard), key)
        assert got.dtype == np.dtype(ml_dtypes.bfloat16)
        want = safetensors_io.read_tensor(safetensors_io.read_header(base / shard), key)
        module = key.removesuffix(".weight")
        if module in adapter.targets:
            want = want + lora.delta_weight(module, adapter.targets[module], adapter.config, adapter.tensors)
        assert np.array_equal(got.view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16)), key
    assert load_causal_lm(out).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # loads fine


def _lora_method():
    from adapterkit.core.plugin.registry import default_registry

    return default_registry().method("lora")


@pytest.mark.parametrize("kind", ["gpt2", "llama-tied"])
def test_adapter_on_a_tied_head_unties_it(kind, tiny_base_dirs, tmp_path):
    """lm_head tied to the input embeddings: the merged head is written on its own, embeddings unchanged."""
    if kind == "gpt2":
        base = tiny_base_dirs["gpt2"]
        config = dict(r=4, lora_alpha=8, target_modules=["lm_head", "c_attn"], fan_in_fan_out=True)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = tmp_path / "tied"
        LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                         ).save_pretrained(base)
        config = dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    assert "lm_head.weight" not in safetensors_io.read_header(base / "model.safetensors").tensors
    model = peft_lora(base, **config)
    expected = logits(model)  # unmerged: the embeddings stay as they are, only the head changes
    out = merge_into_base(adapter_from_peft(model), base, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in safetensors_io.read_header(out / "model.safetensors").tensors
    merged = load_causal_lm(out)
    assert max_diff(logits(merged), expected) <= 1e-5
    base_embeddings = load_causal_lm(base).get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, base_embeddings)


def test_head_missing_without_tying_is_refused(tiny_base_dirs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dirs["gpt2"], base)
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    adapter = _numpy_adapter({"lm_head": ("linear", [128, 32])}, model_type="gpt2")
    with pytest.raises(BaseModelError, match="which the base model does not have"):
        merge_into_base(adapter, base, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _numpy_adapter(modules: dict[str, tuple[str, list[int]]], model_type: str = "llama", r: int = 2,
                   method: str = "lora") -> Adapter:
    rng = np.random.default_rng(0)
    targets, tensors = {}, {}
    for module, (kind, shape) in modules.items():
        fan_in, fan_out = (shape[0], shape[1]) if kind == "conv1d" else (shape[1], shape[0])
        targets[module] = {"kind": kind, "shape": shape, "r": r, "alpha": r}
        tensors[f"{module}.{method}.A"] = rng.standard_normal((r, fan_in)).astype(np.float32)
        tensors[f"{module}.{method}.B"] = rng.standard_normal((fan_out, r)).astype(np.float32)
    return Adapter(Manifest(method=method, config={"r": r, "alpha": r}, targets=targets, dtype="float32",
                            base_model={"model_type": model_type}), tensors)


def test_wrong_base_is_refused_before_writing(tiny_base_dirs, tmp_path):
    adapter = _numpy_adapter({"model.layers.0.self_attn.q_proj": ("linear", [32, 32])})
    with pytest.raises(BaseModelError, match="model_type differs"):
        merge_into_base(adapter, tiny_base_dirs["gpt2"], tmp_path / "out")
    wrong_shape = _numpy_adapter({"model.layers.0.self_attn.q_proj": ("linear", [64, 32])})
    with pytest.raises(BaseModelError, match="shape differs"):
        merge_into_base(wrong_shape, tiny_base_dirs["llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _method_class(method_name: str, *capabilities: type, **attributes: Any):
    """A throwaway Method (with ``capabilities``) whose tensors are ``<module>.<name>.A`` [2, in] and ``.B`` [out, 2]."""
    from models import TorchlessMethod

    class Throwaway(TorchlessMethod, *capabilities):
        name = method_name
        description = "test method"

        def config_schema(self):
            return {"type": "object"}

        def expected_tensors(self, module, target, config):
            out, fan_in = target["shape"]
            return {f"{module}.{method_name}.A": (2, fan_in), f"{module}.{method_name}.B": (out, 2)}

    for key, value in attributes.items():
        setattr(Throwaway, key, value)
    abc.update_abstractmethods(Throwaway)
    return Throwaway


@pytest.fixture
def throwaway_registry():
    """Build a registry with extra throwaway methods; unregister them afterwards."""
    from adapterkit.core.plugin.hookspecs import hookimpl
    from adapterkit.core.plugin.registry import Registry, get_plugin_manager

    managers = []

    def build(*methods):
        class Plugin:
            @staticmethod
            @hookimpl
            def adapterkit_register_methods(register):
                for method in methods:
                    register(method)

        pm, infos = get_plugin_manager(plugins=[("throwaway-test", Plugin)])
        managers.append(pm)
        return Registry(pm, infos)

    yield build
    for pm in managers:
        pm.unregister(name="throwaway-test")


def test_non_mergeable_method_is_refused_with_the_reason(throwaway_registry, tiny_base_dirs, tmp_path):
    reason = "its update depends on the input (a gated bottleneck), not only on the weights"
    registry = throwaway_registry(_method_class("nomerge", merge_refusal=lambda self, config: reason)())
    adapter = _numpy_adapter({"model.layers.0.self_attn.q_proj": ("linear", [32, 32])}, method="nomerge")
    with pytest.raises(UsageError, match=re.escape(f"cannot merge this adapter: {reason}")) as info:
        merge_into_base(adapter, tiny_base_dirs["llama"], tmp_path / "out", registry=registry)
    assert info.value.code == "not_mergeable"
    assert not (tmp_path / "out").exists()


def test_a_method_with_a_non_additive_merge_uses_merged_weight(throwaway_registry, tiny_base_dirs, tmp_path):
    """A MergedWeight method's merged_weight(module, target, config, tensors, weight) replaces base + delta (DoRA's
    kind of merge)."""
    seen = []

    def merged_weight(self, module, target, config, tensors, base_weight):
        seen.append((module, sorted(tensors), base_weight.dtype))
        norms = np.linalg.norm(base_weight, axis=0, keepdims=True)
        return base_weight / norms  # a column renormalisation: not base + something independent of base

    from adapterkit import MergedWeight

    registry = throwaway_registry(_method_class("rescale", MergedWeight, merged_weight=merged_weight)())
    module = "model.layers.0.self_attn.q_proj"
    adapter = _numpy_adapter({module: ("linear", [32, 32])}, method="rescale")
    base = tiny_base_dirs["llama"]
    out = merge_into_base(adapter, base, tmp_path / "out", registry=registry)
    before = safetensors_io.read_tensor(safetensors_io.read_header(base / "model.safetensors"), f"{module}.weight")
    after = safetensors_io.read_tensor(safetensors_io.read_header(out / "model.safetensors"), f"{module}.weight")
    np.testing.assert_allclose(after, before / np.linalg.norm(before, axis=0, keepdims=True), rtol=1e-6)
    assert seen == [(module, ["A", "B"], np.dtype(np.float32))]  # the module's tensors by parameter name


def test_failure_midway_leaves_no_output(sharded_llama, tmp_path, monkeypatch):
    import adapterkit.core.ops.merge as merge_mod

    adapter = adapter_from_peft(peft_lora(sharded_llama, r=2, lora_alpha=2, target_modules=["q_proj"]))
    real = merge_mod.write_tensor
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "write_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_into_base(adapter, sharded_llama, tmp_path / "out")
    assert len(calls) == 7
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind


def test_existing_output_needs_overwrite(tiny_base_dirs, tmp_path):
    adapter = _numpy_adapter({"model.layers.0.self_attn.q_proj": ("linear", [32, 32])})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(AdapterkitError, match="already exists"):
        merge_into_base(adapter, tiny_base_dirs["llama"], out)
    merge_into_base(adapter, tiny_base_dirs["llama"], out, overwrite=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(UsageError, match="base model folder"):
        merge_into_base(adapter, tiny_base_dirs["llama"], tiny_base_dirs["llama"], overwrite=True)


# ---- CLI ------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    from click.testing import CliRunner

    from adapterkit.cli import main

    monkeypatch.setitem(main.COMMANDS, "merge", ("adapterkit.cli.merge", "Merge an adapter into its base model."))
    runner = CliRunner()
    return lambda *args: runner.invoke(main.cli, list(map(str, args)))


def test_cli_merge(cli, tiny_base_dirs, tmp_path):
    from adapterkit.core.store.adapters import save

    base = tiny_base_dirs["llama"]
    model = peft_lora(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save(adapter_from_peft(model, config={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
         tmp_path / "adapter")
    expected = logits(model.merge_and_unload())

    result = cli("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "merged")

    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert max_diff(logits(load_causal_lm(tmp_path / "merged")), expected) <= 1e-5
    again = cli("merge", tmp_path / "adapter", "--base", tiny_base_dirs["gpt2"], "-o", tmp_path / "other")
    assert again.exit_code == 1
    assert again.output.startswith("error: ") and "Traceback" not in again.output
    assert len(again.output.strip().splitlines()) == 1


def test_qlora_merge_rewrites_the_layers_it_quantised(tiny_base_dirs, tmp_path):
    """QLoRA trained on Q(W) everywhere ("all-linear"): non-adapted layers are written as Q(W) too."""
    import bitsandbytes  # noqa: F401
    import adapterkit
    from adapterkit.testing import perturb
    from models import BUILDERS

    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "qlora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    perturb(handle.parameters())
    out = merge_into_base(handle.to_adapter(), tiny_base_dirs["llama"], tmp_path / "merged")
    assert max_diff(logits(load_causal_lm(out)), logits(model)) <= 1e-5
    base = safetensors_io.read_header(tiny_base_dirs["llama"] / "model.safetensors")
    merged = safetensors_io.read_header(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"  # quantised, not adapted
    assert not np.array_equal(safetensors_io.read_tensor(base, key), safetensors_io.read_tensor(merged, key))
    key = "lm_head.weight"  # neither
    assert np.array_equal(safetensors_io.read_tensor(base, key), safetensors_io.read_tensor(merged, key))
