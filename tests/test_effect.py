"""core/check/effect.py and probe.py: an adapter that changes nothing is reported, from its tensors and by a probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.check.effect import low_rank_is_zero
from adapterkit.core.errors import UsageError
from adapterkit.testing import TINY_MODELS, perturb

from helpers import llama_targets, make_lora_adapter

LLAMA = {"model_type": "llama", "architecture": "LlamaForCausalLM"}


def codes(report) -> tuple[list[str], list[str]]:
    return [e.code for e in report.errors], [w.code for w in report.warnings]


def injected(method: str, folder: Path, *, trained: bool, kind: str = "llama", **config) -> Path:
    handle = adapterkit.inject(TINY_MODELS[kind](0), method, config)
    if trained:
        perturb(handle.parameters(), seed=1)
    return adapterkit.save(handle.to_adapter(), folder)


def zero_b(adapter: adapterkit.Adapter, *modules: str) -> adapterkit.Adapter:
    for module in modules:
        key = f"{module}.lora.B"
        adapter.tensors[key] = np.zeros_like(adapter.tensors[key])
    return adapter


def test_a_lora_saved_before_training_changes_nothing(tmp_path):
    folder = injected("lora", tmp_path / "a", trained=False, r=2, target_modules=["q_proj", "v_proj"])
    report = adapterkit.validate(folder)
    assert report.valid and codes(report)[1] == ["no_effect"]
    assert "changes nothing" in str(report.warnings[0]) and "B is zero" in report.warnings[0].hint
    assert report.effect == {"modules": 4, "zero": sorted(adapterkit.load(folder).targets), "changes": 0, "unknown": []}
    strict = adapterkit.validate(folder, strict=True)
    assert not strict.valid and codes(strict)[0] == ["no_effect"]
    result = CliRunner().invoke(cli, ["validate", str(folder), "--strict"])
    assert result.exit_code == 1 and "changes nothing" in result.output
    assert CliRunner().invoke(cli, ["validate", str(folder)]).exit_code == 0


def test_an_all_zero_peft_adapter_is_reported(tmp_path, tiny_base_dirs):
    """PEFT's own default init (B = 0), saved as is: it loads everywhere and changes nothing."""
    import peft

    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "peft")
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "peft"), "--base", str(tiny_base_dirs["llama"]),
                                      "--json"])
    data = json.loads(result.output)
    assert result.exit_code == 0 and [w["code"] for w in data["warnings"]] == ["no_effect"]
    assert data["effect"]["zero"] and data["effect"]["changes"] == 0


def test_the_modules_that_change_nothing_are_named(tmp_path):
    adapter = zero_b(make_lora_adapter(llama_targets(), base_model=LLAMA), "model.layers.1.self_attn.v_proj")
    report = adapterkit.validate(adapterkit.save(adapter, tmp_path / "a"))
    assert codes(report)[1] == ["zero_modules"]
    warning = report.warnings[0]
    assert "1 of the adapter's 4 modules change nothing" in warning.message
    assert warning.found == "model.layers.1.self_attn.v_proj"
    assert report.effect["zero"] == ["model.layers.1.self_attn.v_proj"] and report.effect["changes"] == 3
    assert codes(adapterkit.validate(tmp_path / "a", strict=True))[0] == ["zero_modules"]


def test_a_trained_lora_is_quiet(tmp_path):
    folder = injected("lora", tmp_path / "a", trained=True, r=2, target_modules=["q_proj", "v_proj"])
    report = adapterkit.validate(folder)
    assert report.valid and not report.warnings
    assert report.effect == {"modules": 4, "zero": [], "changes": 4, "unknown": []}
    assert "whether each module's update is zero" in report.checks


def test_low_rank_zero_from_the_gram_matrices():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 16)).astype(np.float32)
    a[1] = a[0]
    b = rng.standard_normal((8, 2)).astype(np.float32)
    b[:, 1] = -b[:, 0]  # B A = b0 a0 - b0 a0 = 0 with non-zero factors
    assert np.allclose(b @ a, 0, atol=1e-6) and np.any(a) and np.any(b)
    assert low_rank_is_zero(a, b, 2.0)
    b[:, 1] *= 0.5
    assert not low_rank_is_zero(a, b, 2.0)
    assert low_rank_is_zero(a, np.zeros_like(b), 1.0) and low_rank_is_zero(a, b, 0.0)
    assert low_rank_is_zero(np.zeros((0, 16)), np.zeros((8, 0)), 1.0)


def test_dora_identity_needs_the_base_weights(tmp_path, tiny_base_dirs):
    """A fresh DoRA (B = 0, magnitude = the base rows' norm) is the identity only on its own base."""
    fresh = injected("dora", tmp_path / "fresh", trained=False, r=2, target_modules=["q_proj"])
    blind = adapterkit.validate(fresh)
    assert blind.valid and not blind.warnings
    assert any("depends on the base weights (pass --base)" in n for n in blind.not_checked)
    seen = adapterkit.validate(fresh, base=tiny_base_dirs["llama"])
    assert codes(seen)[1] == ["no_effect"] and "identity" in seen.warnings[0].hint
    trained = injected("dora", tmp_path / "trained", trained=True, r=2, target_modules=["q_proj"])
    report = adapterkit.validate(trained, base=tiny_base_dirs["llama"])
    assert report.valid and not report.warnings and report.effect["changes"] == 2


def test_ia3_vectors_of_ones_change_nothing_on_any_weight(tmp_path):
    if "ia3" not in adapterkit.default_registry().methods:
        pytest.fail("the example IA3 plugin is not installed (make test installs it)")
    config = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    ones = injected("ia3", tmp_path / "ones", trained=False, **config)
    report = adapterkit.validate(ones)
    assert codes(report)[1] == ["no_effect"] and report.effect["unknown"] == []
    trained = injected("ia3", tmp_path / "trained", trained=True, **config)
    report = adapterkit.validate(trained)
    assert not report.warnings and report.effect["unknown"]  # not the identity on a random weight; the base decides


@pytest.mark.parametrize(("method", "config"), [("bottleneck", {}), ("prompt", {"num_virtual_tokens": 2}),
                                                ("prefix", {"num_virtual_tokens": 2})])
def test_methods_without_a_capability_that_tells_are_not_checked(method, config, tmp_path):
    folder = injected(method, tmp_path / "a", trained=True, **config)
    report = adapterkit.validate(folder)
    assert report.valid and not report.warnings
    assert any("--probe measures the outputs" in n for n in report.not_checked)
    assert "whether each module's update is zero" not in report.checks


# ---- --probe -----------------------------------------------------------------------------------

def test_probe_measures_the_logits(tmp_path, tiny_base_dirs):
    base = tiny_base_dirs["llama"]
    trained = injected("lora", tmp_path / "t", trained=True, r=2, target_modules=["q_proj", "v_proj"])
    report = adapterkit.validate(trained, base=base, probe=True)
    assert report.valid and not report.warnings
    assert report.probe["output"] == "logits" and report.probe["inputs"] == [2, 16]
    assert report.probe["relative_change"] > 1e-3 and report.probe["max_abs_change"] > 0
    zero = injected("lora", tmp_path / "z", trained=False, r=2, target_modules=["q_proj", "v_proj"])
    report = adapterkit.validate(zero, base=base, probe=True)
    assert codes(report)[1] == ["no_effect", "probe_no_effect"] and report.probe["max_abs_change"] == 0.0
    strict = adapterkit.validate(zero, base=base, probe=True, strict=True)
    assert codes(strict)[0] == ["no_effect", "probe_no_effect"]


def test_probe_threshold(tmp_path, tiny_base_dirs):
    """A tiny update: non-zero tensors, but below the default threshold on the logits."""
    adapter = make_lora_adapter(llama_targets(), base_model=LLAMA)
    for key in list(adapter.tensors):
        if key.endswith(".lora.B"):
            adapter.tensors[key] = (adapter.tensors[key] * 1e-9).astype(np.float32)
    folder = adapterkit.save(adapter, tmp_path / "tiny")
    base = str(tiny_base_dirs["llama"])
    report = adapterkit.validate(folder, base=base, probe=True)
    assert codes(report)[1] == ["probe_no_effect"] and 0 < report.probe["relative_change"] < 1e-5
    assert not adapterkit.validate(folder, base=base, probe=True, probe_threshold=0).warnings
    result = CliRunner().invoke(cli, ["validate", str(folder), "--base", base, "--probe", "--strict"])
    assert result.exit_code == 1 and "changes (almost) nothing" in result.output
    result = CliRunner().invoke(cli, ["validate", str(folder), "--base", base, "--probe", "--probe-threshold", "0"])
    assert result.exit_code == 0 and "probe: max |change| of logits" in result.output


def test_probe_covers_methods_the_tensors_cannot_tell(tmp_path, tiny_base_dirs):
    base = tiny_base_dirs["llama"]
    for method, config in (("bottleneck", {}), ("prompt", {"num_virtual_tokens": 2})):
        trained = injected(method, tmp_path / method, trained=True, **config)
        report = adapterkit.validate(trained, base=base, probe=True)
        assert report.valid and not report.warnings and report.probe["relative_change"] > 1e-4, method
    adapter = adapterkit.load(tmp_path / "bottleneck")
    for key in adapter.tensors:
        if ".bottleneck.up." in key:  # the up-projection zero: every bottleneck adds nothing
            adapter.tensors[key] = np.zeros_like(adapter.tensors[key])
    silent = adapterkit.save(adapter, tmp_path / "silent")
    report = adapterkit.validate(silent, base=base, probe=True)
    assert codes(report)[1] == ["probe_no_effect"] and report.probe["max_abs_change"] == 0.0


def test_probe_usage_errors(tmp_path):
    folder = adapterkit.save(make_lora_adapter(base_model=LLAMA), tmp_path / "a")
    with pytest.raises(UsageError, match="--base"):
        adapterkit.validate(folder, probe=True)
    assert CliRunner().invoke(cli, ["validate", str(folder), "--probe"]).exit_code == 2
    assert CliRunner().invoke(cli, ["validate", str(folder), "--probe-threshold", "0.1"]).exit_code == 2
    assert CliRunner().invoke(cli, ["validate", str(folder), "--probe-threshold", "-1"]).exit_code == 2


def test_probe_is_not_run_on_an_invalid_adapter(tmp_path, tiny_base_dirs):
    targets = {f"model.{m}": t for m, t in llama_targets().items()}
    folder = adapterkit.save(make_lora_adapter(targets, base_model=LLAMA), tmp_path / "a")
    report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], probe=True)
    assert "missing_module" in codes(report)[0] and report.probe is None
    assert any(n.startswith("probe") for n in report.not_checked)
