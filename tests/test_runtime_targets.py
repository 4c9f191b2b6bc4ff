"""core/check/targets/: ``validate --target vllm | sglang | llama.cpp | mlx | onnxruntime`` and its load plans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.check import targets as runtime_targets
from adapterkit.core.errors import UsageError
from adapterkit.testing import TINY_MODELS, perturb

from helpers import bert_targets, gpt2_targets, llama_targets, make_lora_adapter

LLAMA = {"model_type": "llama", "architecture": "LlamaForCausalLM"}
QWEN2 = {"model_type": "qwen2", "architecture": "Qwen2ForCausalLM"}
MISTRAL = {"model_type": "mistral", "architecture": "MistralForCausalLM"}


def codes(report) -> tuple[list[str], list[str]]:
    return [e.code for e in report.errors], [w.code for w in report.warnings]


def save(adapter, folder: Path, fmt: str = "adapterkit", **options) -> Path:
    return adapterkit.save(adapter, folder, fmt, **options)


def injected(kind: str, method: str, folder: Path, **config) -> Path:
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, method, config)
    perturb(handle.parameters(), seed=1)
    return adapterkit.save(handle.to_adapter(), folder)


def statuses(report) -> dict[str, str]:
    return {m["module"]: m["status"] for m in report.plan["modules"]}


def qv(layers=(0, 1), **kwargs) -> dict:
    return llama_targets(layers=layers, **kwargs)


def full_llama(layers=(0, 1), r: int = 4, alpha: float = 8, names=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj")) -> dict:
    shapes = {"q_proj": [32, 32], "k_proj": [16, 32], "v_proj": [16, 32], "o_proj": [32, 32],
              "gate_proj": [64, 32], "up_proj": [64, 32], "down_proj": [32, 64]}
    part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"model.layers.{i}.{part.get(n, 'mlp')}.{n}": {"kind": "linear", "shape": shapes[n], "r": r, "alpha": alpha}
            for i in layers for n in names}


def test_cli_choices_are_the_library_targets():
    from adapterkit.cli.validate import TARGETS

    assert TARGETS == runtime_targets.TARGETS == ("vllm", "sglang", "llama.cpp", "mlx", "onnxruntime")


def test_an_unknown_target_or_version_is_a_usage_error(tmp_path):
    folder = save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    with pytest.raises(UsageError):
        adapterkit.validate(folder, target="tgi")
    with pytest.raises(UsageError, match="release number"):
        adapterkit.validate(folder, target="vllm", target_version="latest")
    with pytest.raises(UsageError, match="needs a target"):
        adapterkit.validate(folder, target_version="0.31")
    assert CliRunner().invoke(cli, ["validate", str(folder), "--target", "tgi"]).exit_code == 2
    assert CliRunner().invoke(cli, ["validate", str(folder), "--target-version", "0.31"]).exit_code == 2


# ---- vLLM ----------------------------------------------------------------------------------

def test_vllm_accepts_a_plain_lora_and_says_to_convert_to_peft(tmp_path):
    folder = save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert report.valid, report.errors
    assert codes(report)[1] == ["vllm_format"] and "--to peft" in str(report.warnings[0])
    assert report.plan["steps"] == [f"adapterkit convert {folder} OUT --to peft"]
    peft = adapterkit.convert(folder, tmp_path / "peft", "peft")
    report = adapterkit.validate(peft, target="vllm")
    assert report.valid and not report.warnings and report.plan["steps"] == []
    assert any(c.startswith("vllm load plan (vLLM 0.34.0") for c in report.checks)


def test_vllm_plan_of_an_r32_lora_packs_modules_and_needs_max_lora_rank_32(tiny_base_dirs, tmp_path):
    """The acceptance case: validate --target vllm --base B --json of an r=32 LoRA."""
    folder = adapterkit.convert(save(make_lora_adapter(full_llama(r=32, alpha=64), base_model=LLAMA), tmp_path / "a"),
                                tmp_path / "peft", "peft")
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm", "--base",
                                      str(tiny_base_dirs["llama"]), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    assert plan["runtime"] == "vllm" and plan["version"] == "0.34.0" and plan["reads"] == "peft" and plan["loads"]
    assert 0.0 <= plan["coverage"] <= 1.0 and plan["coverage"] == 1.0
    assert "--max-lora-rank 32" in plan["flags"] and "--enable-lora" in plan["flags"]
    modules = {m["module"]: m for m in plan["modules"]}
    assert len(modules) == 14
    assert modules["model.layers.0.self_attn.k_proj"]["runtime_module"] == "model.layers.0.self_attn.qkv_proj[k]"
    assert modules["model.layers.1.mlp.up_proj"]["runtime_module"] == "model.layers.1.mlp.gate_up_proj[up]"
    assert modules["model.layers.1.mlp.down_proj"]["runtime_module"] == "model.layers.1.mlp.down_proj"
    assert {m["status"] for m in plan["modules"]} == {"applied"} and all(m["rank"] == 32 for m in plan["modules"])
    assert plan["parameters"]["total"] == plan["parameters"]["applied"] > 0
    text = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm", "--base", str(tiny_base_dirs["llama"])])
    assert "qkv_proj[q]" in text.output and "--max-lora-rank 32" in text.output and "coverage 100.0%" in text.output


@pytest.mark.parametrize(("r", "flag"), [(8, None), (16, None), (24, 32), (300, 320), (512, 512)])
def test_vllm_rank_needs_the_smallest_allowed_max_lora_rank(r, flag, tmp_path):
    folder = save(make_lora_adapter(llama_targets(layers=[0], r=r, alpha=r), base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert report.valid
    rank_warnings = [w for w in report.warnings if w.code == "vllm_rank_flag"]
    if flag is None:
        assert not rank_warnings and not any(f.startswith("--max-lora-rank") for f in report.plan["flags"])
    else:
        assert len(rank_warnings) == 1 and f"--max-lora-rank {flag}" in str(rank_warnings[0])
        assert f"--max-lora-rank {flag}" in report.plan["flags"]


def test_vllm_refuses_a_rank_above_512(tmp_path):
    folder = save(make_lora_adapter(llama_targets(layers=[0], r=520, alpha=520), base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert codes(report)[0] == ["vllm_rank"]
    assert not report.plan["loads"] and report.plan["coverage"] == 0.0


def _patterned_peft(tmp_path: Path) -> Path:
    """A PEFT LoRA saved by PEFT with rank_pattern / alpha_pattern: down_proj r=32, v_proj alpha 3."""
    import peft
    import torch

    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 32}, alpha_pattern={"v_proj": 3})
    peft.get_peft_model(TINY_MODELS["llama"](0), config).save_pretrained(tmp_path / "patterns")
    return tmp_path / "patterns"


def test_vllm_applies_rank_and_alpha_patterns_from_0_32_and_serves_them_wrong_before(tmp_path, tiny_base_dirs):
    folder = _patterned_peft(tmp_path)
    base = tiny_base_dirs["llama"]
    report = adapterkit.validate(folder, base=base, target="vllm")
    assert report.valid, [str(e) for e in report.errors]
    assert set(statuses(report).values()) == {"applied"} and report.plan["coverage"] == 1.0
    assert "--max-lora-rank 32" in report.plan["flags"]  # the pattern's rank, not r = 4
    old = adapterkit.validate(folder, base=base, target="vllm", target_version="0.31")
    assert codes(old)[0] == ["vllm_scales"] and "vLLM 0.31" in str(old.errors[0])
    wrong = {m for m, s in statuses(old).items() if s == "wrong"}
    # v_proj's alpha 3 and down_proj's rank 32 change their scale from the config's 8 / 4; q_proj keeps it
    assert wrong == {m for m in statuses(old) if m.endswith(("v_proj", "down_proj"))}
    assert 0.0 < old.plan["coverage"] < 1.0 and old.plan["version"] == "0.31"
    assert "--max-lora-rank 32" in old.plan["flags"]
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm", "--target-version", "0.31"])
    assert result.exit_code == 1 and "wrong" in result.output


def test_vllm_before_0_32_takes_ranks_that_differ_with_one_alpha_over_r(tmp_path):
    targets = llama_targets(layers=[0], r=4, alpha=8)
    targets["model.layers.0.self_attn.v_proj"].update(r=8, alpha=16)  # the same scale 2
    report = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "b"), target="vllm",
                                 target_version="0.20")
    assert report.valid, report.errors


def test_vllm_modules_follow_the_model_class(tmp_path):
    targets = llama_targets(layers=[0])
    targets["lm_head"] = {"kind": "linear", "shape": [128, 32], "r": 4, "alpha": 8}
    llama = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a"), target="vllm")
    assert llama.valid and statuses(llama)["lm_head"] == "applied"  # Llama lists lm_head in embedding_modules
    for meta in (QWEN2, MISTRAL):
        report = adapterkit.validate(save(make_lora_adapter(targets, base_model=meta), tmp_path / meta["model_type"]),
                                     target="vllm")
        assert codes(report)[0] == ["vllm_modules"] and report.errors[0].location == "lm_head"
        assert statuses(report)["lm_head"] == "unsupported" and report.plan["coverage"] == 0.0


def test_vllm_does_not_guess_for_an_architecture_it_has_no_table_for(tmp_path):
    adapter = make_lora_adapter(gpt2_targets(), base_model={"model_type": "gpt2", "architecture": "GPT2LMHeadModel"})
    report = adapterkit.validate(save(adapter, tmp_path / "a"), target="vllm")
    assert report.valid and any("GPT2LMHeadModel" in item for item in report.not_checked)
    assert set(statuses(report).values()) == {"unknown"}


@pytest.mark.parametrize("method", ["dora", "bottleneck"])
def test_vllm_refuses_methods_without_low_rank_factors(method, tmp_path):
    folder = injected("llama", method, tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert codes(report)[0] == ["vllm_method"]
    assert f"method '{method}' gives no low-rank factors" in str(report.errors[0])
    assert set(statuses(report).values()) == {"unsupported"}
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm"])
    assert result.exit_code == 1 and method in result.output.lower()


def _peft_folder(tmp_path: Path) -> Path:
    folder = save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    return adapterkit.convert(folder, tmp_path / "peft", "peft")


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_vllm_refuses_peft_fields_by_release(tmp_path):
    peft = _peft_folder(tmp_path)
    biased = _edit_config(Path(shutil.copytree(peft, tmp_path / "lb")), lora_bias=True)
    from adapterkit.core.check.targets import load_plan
    from adapterkit.core.format.report import ValidationReport

    report = ValidationReport(str(biased), format="peft")
    report.adapter = adapterkit.load(peft)  # the tensors as they are; the config vLLM reads says lora_bias
    new = load_plan(report, "vllm", adapterkit.default_registry())
    old = load_plan(report, "vllm", adapterkit.default_registry(), version="0.31.0")
    assert [r.code for r in new.refusals] == ["vllm_bias"] and not new.loads and new.coverage == 0.0
    assert old.refusals == [] and old.loads  # 0.31 does not read lora_bias


def test_vllm_drops_modules_whose_path_the_base_lacks(tmp_path, tiny_base_dirs):
    targets = {f"model.{m}": t for m, t in llama_targets().items()}
    folder = save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target="vllm")
    assert "missing_module" in codes(report)[0]
    assert set(statuses(report).values()) == {"dropped"}
    assert "vllm_dropped" in codes(report)[0]  # every module dropped: an error (the base model would be served)
    assert report.plan["coverage"] == 0.0 and report.plan["loads"]


# ---- SGLang --------------------------------------------------------------------------------

def test_sglang_plan_of_q_and_v(tmp_path):
    report = adapterkit.validate(save(make_lora_adapter(base_model=LLAMA), tmp_path / "a"), target="sglang")
    assert report.valid, [str(e) for e in report.errors]
    plan = report.plan
    assert plan["coverage"] == 1.0 and plan["reads"] == "peft"
    assert plan["flags"] == ["--max-lora-rank 4", "--lora-target-modules qkv_proj"]
    assert plan["modules"][0]["runtime_module"] == "model.layers.0.self_attn.qkv_proj[q]"


@pytest.mark.parametrize(("names", "bad"), [
    (("q_proj",), {"q_proj"}),
    (("q_proj", "k_proj"), {"q_proj", "k_proj"}),
    (("k_proj", "v_proj"), {"k_proj", "v_proj"}),
    (("v_proj",), {"v_proj"}),
    (("q_proj", "v_proj", "gate_proj"), set()),
    (("q_proj", "v_proj", "up_proj"), {"up_proj"}),
    (("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"), set()),
])
def test_sglang_packs_q_k_v_and_gate_up_only_in_some_subsets(names, bad, tmp_path):
    adapter = make_lora_adapter(full_llama(names=names), base_model=LLAMA)
    report = adapterkit.validate(save(adapter, tmp_path / "a"), target="sglang")
    unsupported = {m.rsplit(".", 1)[-1] for m, s in statuses(report).items() if s == "unsupported"}
    assert unsupported == bad
    assert report.valid == (not bad)
    if bad:
        assert "sglang_packing" in codes(report)[0] and report.plan["coverage"] == 0.0


def test_sglang_reads_one_scale_and_one_rank(tmp_path):
    folder = _patterned_peft(tmp_path)
    report = adapterkit.validate(folder, target="sglang")
    by_leaf = {m.rsplit(".", 1)[-1]: s for m, s in statuses(report).items()}
    assert by_leaf == {"q_proj": "applied", "v_proj": "wrong", "down_proj": "unsupported"}
    assert {"sglang_scales", "sglang_rank"} <= set(codes(report)[0])
    rslora = save(make_lora_adapter(qv(), base_model=LLAMA, config={"r": 4, "alpha": 8, "use_rslora": True,
                                                                    "target_modules": ["q_proj", "v_proj"]}),
                  tmp_path / "rs")
    report = adapterkit.validate(rslora, target="sglang")
    assert set(statuses(report).values()) == {"wrong"} and codes(report)[0] == ["sglang_scales"]


def test_sglang_refuses_a_regex_target_modules(tmp_path):
    """adapterkit's PEFT writer selects a set that leaf names would over-select with an exact regex, which SGLang
    refuses."""
    targets = full_llama(names=("q_proj", "v_proj"))
    targets["model.layers.0.self_attn.o_proj"] = full_llama(layers=[0], names=("o_proj",))[
        "model.layers.0.self_attn.o_proj"]  # o_proj in layer 0 only: leaf names would select layer 1's too
    adapter = make_lora_adapter(targets, base_model=LLAMA, config={"r": 4, "alpha": 8})
    folder = adapterkit.convert(save(adapter, tmp_path / "a"), tmp_path / "peft", "peft")
    assert isinstance(json.loads((folder / "adapter_config.json").read_text())["target_modules"], str)
    report = adapterkit.validate(folder, target="sglang")
    assert codes(report)[0] == ["sglang_target_modules"]
    assert "['o_proj', 'q_proj', 'v_proj']" in report.errors[0].hint and report.plan["coverage"] == 0.0
    fixed = _edit_config(folder, target_modules=["o_proj", "q_proj", "v_proj"])
    assert adapterkit.validate(fixed, target="sglang").valid


# ---- llama.cpp ------------------------------------------------------------------------------

def test_llama_cpp_plan_names_the_gguf_tensors(tiny_base_dirs, tmp_path):
    targets = full_llama(layers=[1])
    targets["model.layers.1.mlp.down_proj"]["alpha"] = 3  # folded into B under the one global alpha
    folder = save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target="llama.cpp")
    assert report.valid, report.errors
    names = {m["module"]: m["runtime_module"] for m in report.plan["modules"]}
    assert names["model.layers.1.self_attn.q_proj"] == "blk.1.attn_q"
    assert names["model.layers.1.self_attn.o_proj"] == "blk.1.attn_output"
    assert names["model.layers.1.mlp.gate_proj"] == "blk.1.ffn_gate"
    assert names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down"
    assert report.plan["coverage"] == 1.0 and report.plan["flags"] == ["--lora ADAPTER.gguf"]
    assert not list(tmp_path.glob("adapterkit-target-*"))


def test_llama_cpp_without_a_base_says_what_it_did_not_check(tmp_path):
    report = adapterkit.validate(save(make_lora_adapter(base_model=LLAMA), tmp_path / "a"), target="llama.cpp")
    assert report.valid and any("pass --base" in item and "llama.cpp" in item for item in report.not_checked)
    assert set(statuses(report).values()) == {"unknown"}


def test_llama_cpp_refuses_an_architecture_its_converter_does_not_map(tiny_base_dirs, tmp_path):
    adapter = make_lora_adapter(bert_targets(), base_model={"model_type": "bert", "architecture": "BertModel"})
    report = adapterkit.validate(save(adapter, tmp_path / "a"), base=tiny_base_dirs["bert"], target="llama.cpp")
    assert codes(report)[0] == ["llama_cpp_unsupported"] and "architecture" in str(report.errors[0])
    assert set(statuses(report).values()) == {"unsupported"} and not report.plan["loads"]


def test_llama_cpp_refuses_prompt_tuning(tmp_path):
    report = adapterkit.validate(injected("llama", "prompt", tmp_path / "a", num_virtual_tokens=2), target="llama.cpp")
    assert codes(report)[0] == ["llama_cpp_method"]


@pytest.fixture
def tied_llama(tmp_path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_a_head_tied_to_the_embeddings_is_refused_by_llama_cpp_and_mlx(tied_llama, tmp_path):
    targets = qv(layers=[0])
    targets["lm_head"] = {"kind": "linear", "shape": [128, 32], "r": 4, "alpha": 8}
    folder = save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    for target, code in (("llama.cpp", "llama_cpp_tied_head"), ("mlx", "mlx_tied_head")):
        report = adapterkit.validate(folder, base=tied_llama, target=target)
        assert statuses(report)["lm_head"] == "unsupported" and code in codes(report)[0], (target, report.errors)
        assert not report.plan["loads"] and report.plan["coverage"] == 0.0


# ---- mlx-lm ---------------------------------------------------------------------------------

def test_mlx_pads_ranks_and_folds_scales(tiny_base_dirs, tmp_path):
    targets = full_llama(layers=[1], names=("q_proj", "v_proj", "down_proj"))
    targets["model.layers.1.mlp.down_proj"].update(r=2, alpha=5)
    report = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a"),
                                 base=tiny_base_dirs["llama"], target="mlx")
    assert report.valid, report.errors
    assert set(statuses(report).values()) == {"applied"} and report.plan["reads"] == "mlx"
    assert report.plan["steps"][0].endswith("--to mlx --base BASE")


def test_mlx_refuses_dora_and_does_not_guess_gpt2_paths(tmp_path):
    report = adapterkit.validate(injected("llama", "dora", tmp_path / "d"), target="mlx")
    assert codes(report)[0] == ["mlx_method"]
    gpt2 = make_lora_adapter(gpt2_targets(), base_model={"model_type": "gpt2", "architecture": "GPT2LMHeadModel"})
    report = adapterkit.validate(save(gpt2, tmp_path / "g"), target="mlx")
    # adapterkit's mlx writer holds nn.Linear modules only: no file, nothing served
    assert codes(report)[0] == ["mlx_unsupported_module"] and "Conv1D" in str(report.errors[0])
    assert set(statuses(report).values()) == {"unsupported"} and report.plan["coverage"] == 0.0
    qwen = make_lora_adapter(qv(), base_model={"model_type": "phi", "architecture": "PhiForCausalLM"})
    report = adapterkit.validate(save(qwen, tmp_path / "p"), target="mlx")
    assert set(statuses(report).values()) == {"unknown"} and any("PhiForCausalLM" in n for n in report.not_checked)


# ---- ONNX Runtime ---------------------------------------------------------------------------

def test_onnxruntime_accepts_lora_and_rslora(tmp_path):
    for i, config in enumerate([{"r": 2}, {"r": 4, "use_rslora": True}]):
        report = adapterkit.validate(injected("gpt2", "lora", tmp_path / f"a{i}", **config), target="onnxruntime")
        assert report.valid, report.errors
        assert report.plan["coverage"] == 1.0
        assert report.plan["modules"][0]["runtime_module"].startswith("transformer.h.0.attn.c_attn.lora_A.weight")
        assert any("graph inputs" in n or "factor inputs" in n for n in report.not_checked)


@pytest.mark.parametrize("method", ["dora", "bottleneck"])
def test_onnxruntime_refuses_methods_without_factors(method, tmp_path):
    report = adapterkit.validate(injected("llama", method, tmp_path / "a"), target="onnxruntime")
    assert codes(report)[0] == ["onnxruntime_method"]
    assert "--mode merged" in str(report.errors[0])


# ---- every target ---------------------------------------------------------------------------

def test_a_target_is_not_checked_when_the_adapter_did_not_load(tmp_path):
    missing = tmp_path / "nothing"
    report = adapterkit.validate(missing, target="vllm")
    assert not report.valid and not any(c.startswith("vllm") for c in codes(report)[0])
    assert report.plan is None and any("vllm load plan" in n for n in report.not_checked)


def test_json_report_carries_the_plan_and_its_findings(tmp_path):
    targets = llama_targets(layers=[0], r=4, alpha=8)
    targets["model.layers.0.self_attn.v_proj"]["alpha"] = 2
    folder = save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm", "--target-version", "0.30.0",
                                      "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert [e["code"] for e in data["errors"]] == ["vllm_scales"]
    assert data["plan"]["counts"] == {"applied": 1, "wrong": 1} and data["plan"]["version"] == "0.30.0"


def test_bf16_adapters_pass_every_target(tiny_base_dirs, tmp_path):
    adapter = make_lora_adapter(llama_targets(), base_model=LLAMA, dtype="bfloat16")
    folder = adapterkit.save(adapter, tmp_path / "a")
    for target in runtime_targets.TARGETS:
        report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target=target)
        assert report.valid, (target, report.errors)
        assert 0.0 <= report.plan["coverage"] <= 1.0 and report.plan["coverage"] == 1.0, target


def test_plans_work_on_any_low_rank_methods_factors(tiny_base_dirs, tmp_path):
    """A third party's LowRank method gets every plan (tests/gated_lora.py: no LoRA names anywhere)."""
    from adapterkit.core.plugin.registry import Registry, get_plugin_manager
    from gated_lora import NAME, Plugin

    registry = Registry(*get_plugin_manager(plugins=[("gated-lora", Plugin())]))
    handle = adapterkit.inject(TINY_MODELS["llama"](0), NAME, {}, registry=registry)
    perturb(handle.parameters(), scale=0.3)
    folder = adapterkit.save(handle.to_adapter(), tmp_path / "g", registry=registry)
    for target in runtime_targets.TARGETS:
        report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target=target, registry=registry)
        assert report.method == NAME and report.valid, (target, [str(e) for e in report.errors])
        assert report.plan["coverage"] == 1.0, target
        if target != "onnxruntime":  # the .onnx_adapter writer takes any LowRank method's factors itself
            assert report.plan["steps"][0].startswith(f"adapterkit compose {folder} -o LORA --strategy cat"), target
