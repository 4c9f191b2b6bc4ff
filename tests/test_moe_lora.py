"""LoRA on fused mixture-of-experts parameters (PEFT ``target_parameters``), against PEFT itself.

Tiny seeded models built here (4 experts, top-2, hidden 32, expert width 24 so that no
orientation is square); PEFT inits B to zero, so every factor is perturbed first.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import adapterkit

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def make_model(kind: str, seed: int = 0):
    T = transformers
    if kind == "qwen3_moe":
        config = T.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                  num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    elif kind == "mixtral":
        config = T.MixtralConfig(**COMMON, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "gpt_oss":  # experts applied as x @ W[e] (is_transposed), always stored fused
        config = T.GptOssConfig(**COMMON, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    else:
        config = T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim > 1 else 0.05)
                    + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return model.eval()


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def setup(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The Qwen3-MoE case, converted to an adapterkit folder."""
    kind, base_dir, peft_dir, _, _, tmp = build("qwen3_moe", tmp_path_factory.mktemp("qwen-cli"))
    ak = tmp / "ak"
    adapterkit.convert(peft_dir, ak, to="adapterkit", base=str(base_dir))
    return base_dir, peft_dir, ak, tmp


def build(kind, tmp):
    base_dir = tmp / "base"
    make_model(kind).save_pretrained(base_dir)  # transformers' default: per-expert keys on disk
    config = peft.LoraConfig(r=2, lora_alpha=5, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             target_parameters=EXPERTS, rank_pattern={"down_proj": 3})
    model = peft.get_peft_model(make_model(kind), config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_dir = tmp / "peft"
    model.save_pretrained(peft_dir)
    expected = logits(model)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    return kind, base_dir, peft_dir, expected, merged, tmp


def test_peft_expert_lora_applies_with_peft_logits(setup):
    kind, base_dir, peft_dir, expected, _, _ = setup
    adapter = adapterkit.load(peft_dir, base=str(base_dir))
    stacked = {m: t for m, t in adapter.targets.items() if t["kind"] == "parameter"}
    assert len(stacked) == 4 and all(len(t["shape"]) == 3 and t["shape"][0] == 4 for t in stacked.values())
    model = adapterkit.apply(adapter, make_model(kind))
    diff = (logits(model) - expected).abs().max().item()
    print(f"{kind}: max |logits - PEFT| = {diff:.2e}")
    assert diff <= 1e-5
    assert (logits(make_model(kind)) - expected).abs().max().item() > 0.1  # the adapter matters


def test_round_trip_to_peft_is_exact(setup):
    kind, base_dir, peft_dir, expected, _, tmp = setup
    ak = tmp / "ak"
    adapterkit.convert(peft_dir, ak, to="adapterkit", base=str(base_dir), overwrite=True)
    back = tmp / "back"
    adapterkit.convert(ak, back, to="peft", overwrite=True)
    before = load_file(peft_dir / "adapter_model.safetensors")
    after = load_file(back / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    config = json.loads((back / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    reloaded = peft.PeftModel.from_pretrained(make_model(kind), back)
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5


def test_merge_matches_peft_merge_and_unload(setup):
    kind, base_dir, peft_dir, expected, merged, tmp = setup
    ak = tmp / "ak-merge"
    adapterkit.convert(peft_dir, ak, to="adapterkit", base=str(base_dir), overwrite=True)
    out = tmp / "merged"
    adapterkit.merge(ak, base_dir, out, overwrite=True)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    worst = max((state[k] - v).abs().max().item() for k, v in merged.items())
    print(f"{kind}: max |merged - PEFT merge_and_unload| = {worst:.2e}")
    assert worst <= 1e-5
    base = make_model(kind).state_dict()
    assert max((state[k] - base[k]).abs().max().item() for k in base if "experts" in k) > 0.01
    # the other on-disk layout: the fused parameters as the live model holds them
    fused = tmp / "base-fused"
    if not fused.exists():
        make_model(kind).save_pretrained(fused, save_original_format=False)
    adapterkit.merge(ak, fused, tmp / "merged-fused", overwrite=True)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp / "merged-fused", output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in merged.items()) <= 1e-5


def test_inject_train_merge_unmerge_unload(setup):
    kind = setup[0]
    model = make_model(kind)
    before = logits(model)
    injected = adapterkit.inject(model, "lora", r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    names = [n for n, t in injected.targets.items() if t["kind"] == "parameter"]
    layout = "in_out" if kind == "gpt_oss" else "out_in"  # from the experts module, not a list of models
    assert len(names) == 4 and all(injected.targets[n]["layout"] == layout for n in names)
    opt = torch.optim.SGD(injected.parameters(), lr=0.5)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    trained = logits(model)
    assert (trained - before).abs().max().item() > 1e-4  # B moved off zero: the experts' LoRA trains
    injected.merge()
    assert (logits(model) - trained).abs().max().item() <= 1e-5
    injected.unmerge()
    assert torch.equal(logits(model), trained)
    injected.merge()
    model = injected.method.unload(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert (logits(model) - trained).abs().max().item() <= 1e-5


def cli(*args):
    from click.testing import CliRunner

    from adapterkit.cli.main import cli as main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_json_names_the_expert_parameters(qwen):
    _, _, ak, _ = qwen
    result = cli("inspect", ak, "--json")
    assert result.exit_code == 0, result.output
    experts = json.loads(result.output)["expert_parameters"]
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    gate_up = experts["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up == {"experts": 4, "shape": [4, 48, 32], "parameters": 4 * 2 * 32 + 4 * 48 * 2, "r": 2,
                       "layout": "out_in"}
    assert experts["model.layers.0.mlp.experts.down_proj"]["parameters"] == 4 * 3 * 24 + 4 * 32 * 3  # rank_pattern 3


def test_validate_base_and_vllm(qwen, tmp_path):
    base_dir, peft_dir, ak, _ = qwen
    result = cli("validate", ak, "--base", base_dir)
    assert result.exit_code == 0 and "valid" in result.output, result.output
    assert adapterkit.load(ak).manifest.base_model["architecture"] == "Qwen3MoeForCausalLM"
    result = cli("validate", peft_dir, "--base", base_dir, "--target", "vllm", "--json")
    report = json.loads(result.output)
    assert "Traceback" not in result.output
    assert any(w.get("code") == "vllm_experts" and "is_3d_lora_weight" in w["message"] for w in report["warnings"])
    # rank_pattern gives down_proj another alpha / r: vLLM's one scale would serve it wrong
    assert result.exit_code == 1 and [e["code"] for e in report["errors"]] == ["vllm_scales"]
    wrong = {m["module"] for m in report["plan"]["modules"] if m["status"] == "wrong"}
    assert wrong and all(m.endswith("experts.down_proj") for m in wrong)
    # a wrong base: the expert shapes differ (another expert count)
    other = tmp_path / "other"
    transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24, num_experts=3,
                                    num_experts_per_tok=2, mlp_only_layers=[])).save_pretrained(other)
    result = cli("validate", ak, "--base", other)
    assert result.exit_code == 1 and "gate_up_proj" in result.output


def test_vllm_refuses_a_lone_expert_parameter(qwen, tmp_path):
    _, _, ak, _ = qwen
    adapter = adapterkit.load(ak)
    for key in [k for k in adapter.tensors if "down_proj" in k]:
        del adapter.tensors[key]
    for name in [n for n in adapter.targets if n.endswith("down_proj")]:
        del adapter.manifest.targets[name]
    adapter.manifest.base_model["fingerprint"] = adapterkit.targets_fingerprint(adapter.targets)
    adapterkit.save(adapter, tmp_path / "lone")
    result = cli("validate", tmp_path / "lone", "--target", "vllm")
    assert result.exit_code == 1 and "gate_up_proj and down_proj together" in result.output


@pytest.mark.parametrize("fmt", ["kohya", "mlx", "torchtune", "adapterhub", "onnx-adapter", "gguf"])
def test_convert_to_a_format_without_expert_parameters_refuses(qwen, fmt):
    base_dir, _, ak, tmp = qwen
    out = tmp / f"out-{fmt}"
    result = cli("convert", ak, out, "--to", fmt, "--base", base_dir)
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("runtime", ["llama.cpp", "onnxruntime"])
def test_runtimes_without_expert_lora_refuse(qwen, runtime):
    _, _, ak, _ = qwen
    result = cli("validate", ak, "--target", runtime)
    assert result.exit_code == 1 and "stacked expert parameters" in result.output


def test_pool_and_compose_refuse_clearly(qwen):
    _, _, ak, tmp = qwen
    pool = adapterkit.AdapterPool(make_model("qwen3_moe"))
    with pytest.raises(adapterkit.AdapterkitError, match="parameter target"):
        pool.load("a", ak)
    result = cli("compose", ak, ak, "-o", tmp / "composed", "--strategy", "linear")
    assert result.exit_code == 1 and "one rank-r pair per expert" in result.output
    assert not (tmp / "composed").exists()


def test_peft_folder_needs_the_base(qwen):
    _, peft_dir, _, _ = qwen
    result = cli("convert", peft_dir, peft_dir.parent / "nobase", "--to", "adapterkit")
    assert result.exit_code == 1 and "needs the base model" in result.output


def test_peft_factor_layout_permutation_is_exact():
    """A_e = A[e*r:(e+1)*r] and B_e = B[:, e::E] (PEFT's ParamWrapper slicing), and back."""
    from adapterkit.plugins.lora import stacked

    rng = np.random.default_rng(0)
    experts, r, fan_in, fan_out = 4, 3, 5, 7
    a, b = rng.normal(size=(experts * r, fan_in)), rng.normal(size=(fan_out, r * experts))
    a3, b3 = stacked.from_peft(a, b, experts)
    for e in range(experts):
        assert np.array_equal(a3[e], a[e * r:(e + 1) * r]) and np.array_equal(b3[e], b[:, e::experts])
    back_a, back_b = stacked.to_peft(a3, b3)
    assert np.array_equal(back_a, a) and np.array_equal(back_b, b)
    delta = stacked.stacked_delta(a3, b3, 0.5, stacked.IN_OUT)
    assert np.allclose(delta[2], 0.5 * (b[:, 2::experts] @ a[6:9]).T, atol=1e-6)


def test_vllm_serves_3d_expert_lora_for_its_3d_moe_classes(qwen, tmp_path):
    _, _, ak, _ = qwen
    adapter = adapterkit.load(ak)
    adapter.manifest.base_model["architecture"] = "GptOssForCausalLM"  # a vLLM class with is_3d_moe_weight
    adapterkit.save(adapter, tmp_path / "gpt")
    report = json.loads(cli("validate", tmp_path / "gpt", "--target", "vllm", "--json").output)
    assert any("FusedMoE3DWithLoRA" in check for check in report["checks"])
    assert not any(w.get("code") == "vllm_experts" for w in report["warnings"])
