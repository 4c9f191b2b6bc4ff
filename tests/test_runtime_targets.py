"""core/runtime_targets.py: ``validate --target vllm | llama.cpp | onnxruntime``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core import runtime_targets
from adapterkit.core.errors import UsageError
from adapterkit.testing import TINY_MODELS, perturb

from helpers import bert_targets, gpt2_targets, llama_targets, make_lora_adapter

LLAMA = {"model_type": "llama", "architecture": "LlamaForCausalLM"}


def codes(report) -> tuple[list[str], list[str]]:
    return [e.code for e in report.errors], [w.code for w in report.warnings]


def save(adapter, folder: Path, fmt: str = "adapterkit", **options) -> Path:
    return adapterkit.save(adapter, folder, fmt, **options)


def injected(kind: str, method: str, folder: Path, **config) -> Path:
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, method, config)
    perturb(handle.parameters(), seed=1)
    return adapterkit.save(handle.to_adapter(), folder)


def test_cli_choices_are_the_library_targets():
    from adapterkit.cli.validate import TARGETS

    assert TARGETS == runtime_targets.TARGETS


def test_an_unknown_target_is_a_usage_error(tmp_path):
    folder = save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    with pytest.raises(UsageError):
        adapterkit.validate(folder, target="tgi")
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "tgi"])
    assert result.exit_code == 2


# ---- vLLM ----------------------------------------------------------------------------------

def test_vllm_accepts_a_plain_lora_and_says_to_convert_to_peft(tmp_path):
    folder = save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert report.valid, report.errors
    assert codes(report)[1] == ["vllm_format"] and "--to peft" in str(report.warnings[0])
    assert "vllm rules" in report.checks
    peft = adapterkit.convert(folder, tmp_path / "peft", "peft")
    report = adapterkit.validate(peft, target="vllm")
    assert report.valid and not report.warnings


@pytest.mark.parametrize(("r", "flag"), [(8, None), (16, None), (24, 32), (300, 320), (512, 512)])
def test_vllm_rank_needs_the_smallest_allowed_max_lora_rank(r, flag, tmp_path):
    folder = save(make_lora_adapter(llama_targets(layers=[0], r=r, alpha=r), base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert report.valid
    rank_warnings = [w for w in report.warnings if w.code == "vllm_rank_flag"]
    if flag is None:
        assert not rank_warnings
    else:
        assert len(rank_warnings) == 1 and f"--max-lora-rank {flag}" in str(rank_warnings[0])


def test_vllm_refuses_a_rank_above_512(tmp_path):
    folder = save(make_lora_adapter(llama_targets(layers=[0], r=520, alpha=520), base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert codes(report)[0] == ["vllm_rank"]


def test_vllm_refuses_per_module_scales_it_would_drop(tmp_path):
    targets = llama_targets(layers=[0], r=4, alpha=8)
    targets["model.layers.0.self_attn.v_proj"]["alpha"] = 16  # scale 4 here, 2 on q_proj
    report = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a"), target="vllm")
    assert codes(report)[0] == ["vllm_scales"]
    # different ranks with one alpha / r are fine: vLLM's single scale is right for every module
    targets = llama_targets(layers=[0], r=4, alpha=8)
    targets["model.layers.0.self_attn.v_proj"].update(r=8, alpha=16)
    report = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "b"), target="vllm")
    assert report.valid, report.errors


def test_vllm_refuses_modules_it_does_not_adapt(tmp_path):
    targets = llama_targets(layers=[0])
    targets["lm_head"] = {"kind": "linear", "shape": [128, 32], "r": 4, "alpha": 8}
    report = adapterkit.validate(save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a"), target="vllm")
    assert codes(report)[0] == ["vllm_modules"] and report.errors[0].location == "lm_head"


def test_vllm_does_not_guess_for_an_architecture_it_has_no_table_for(tmp_path):
    adapter = make_lora_adapter(gpt2_targets(), base_model={"model_type": "gpt2", "architecture": "GPT2LMHeadModel"})
    report = adapterkit.validate(save(adapter, tmp_path / "a"), target="vllm")
    assert report.valid and any("GPT2LMHeadModel" in item for item in report.not_checked)


@pytest.mark.parametrize(("method", "code"), [("dora", "vllm_dora"), ("bottleneck", "vllm_method")])
def test_vllm_refuses_other_methods(method, code, tmp_path):
    folder = injected("llama", method, tmp_path / "a")
    report = adapterkit.validate(folder, target="vllm")
    assert codes(report)[0] == [code]
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm"])
    assert result.exit_code == 1 and code.split("_")[1].lower() in result.output.lower()


# ---- llama.cpp ------------------------------------------------------------------------------

def test_llama_cpp_dry_runs_the_gguf_conversion_against_the_base(tiny_base_dirs, tmp_path):
    folder = injected("llama", "lora", tmp_path / "a", r=2, alpha=4)
    report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target="llama.cpp")
    assert report.valid, report.errors
    assert "llama.cpp rules" in report.checks
    assert not list(tmp_path.glob("adapterkit-target-*"))


def test_llama_cpp_without_a_base_says_what_it_did_not_check(tmp_path):
    report = adapterkit.validate(save(make_lora_adapter(base_model=LLAMA), tmp_path / "a"), target="llama.cpp")
    assert report.valid and any("pass --base" in item and "llama.cpp" in item for item in report.not_checked)


def test_llama_cpp_refuses_an_architecture_its_converter_does_not_map(tiny_base_dirs, tmp_path):
    adapter = make_lora_adapter(bert_targets(), base_model={"model_type": "bert", "architecture": "BertModel"})
    report = adapterkit.validate(save(adapter, tmp_path / "a"), base=tiny_base_dirs["bert"], target="llama.cpp")
    assert "unsupported" in codes(report)[0]
    assert "architecture" in str(report.errors[-1])


def test_llama_cpp_refuses_prompt_tuning(tmp_path):
    report = adapterkit.validate(injected("llama", "prompt", tmp_path / "a", num_virtual_tokens=2), target="llama.cpp")
    assert codes(report)[0] == ["llama_cpp_method"]


# ---- ONNX Runtime ---------------------------------------------------------------------------

def test_onnxruntime_accepts_lora_and_rslora(tmp_path):
    for i, config in enumerate([{"r": 2}, {"r": 4, "use_rslora": True}]):
        report = adapterkit.validate(injected("gpt2", "lora", tmp_path / f"a{i}", **config), target="onnxruntime")
        assert report.valid, report.errors
        assert "onnxruntime rules" in report.checks


@pytest.mark.parametrize("method", ["dora", "bottleneck"])
def test_onnxruntime_refuses_methods_without_factors(method, tmp_path):
    report = adapterkit.validate(injected("llama", method, tmp_path / "a"), target="onnxruntime")
    assert codes(report)[0] == ["onnxruntime_method"]
    assert "--mode merged" in str(report.errors[0])


def test_a_target_is_not_checked_when_the_adapter_did_not_load(tmp_path):
    missing = tmp_path / "nothing"
    report = adapterkit.validate(missing, target="vllm")
    assert not report.valid and not any(c.startswith("vllm") for c in codes(report)[0])


def test_json_report_carries_the_target_findings(tmp_path):
    import json

    targets = llama_targets(layers=[0], r=4, alpha=8)
    targets["model.layers.0.self_attn.v_proj"]["alpha"] = 2
    folder = save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    result = CliRunner().invoke(cli, ["validate", str(folder), "--target", "vllm", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert [e["code"] for e in data["errors"]] == ["vllm_scales"] and "vllm rules" in data["checks"]


def test_bf16_adapters_pass_every_target(tiny_base_dirs, tmp_path):
    adapter = make_lora_adapter(llama_targets(), base_model=LLAMA, dtype="bfloat16")
    folder = adapterkit.save(adapter, tmp_path / "a")
    for target in runtime_targets.TARGETS:
        report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target=target)
        assert report.valid, (target, report.errors)
