"""validate --target vllm / sglang on a low-rank method whose PEFT layout is not LoRA (VeRA): the runtimes read
peft_type LORA only, so the plan is made on (and the steps write) the exact plain factors."""

from __future__ import annotations

import json

import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, perturb


@pytest.fixture(scope="module")
def vera(tmp_path_factory):
    if "vera" not in adapterkit.default_registry().methods:
        pytest.fail("the vera plugin package is not installed (make install installs method-plugins/*)")
    root = tmp_path_factory.mktemp("vera-targets")
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, "vera", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    perturb(handle.parameters(), seed=1)
    native = adapterkit.save(handle.to_adapter(), root / "vera")
    base = root / "base"
    TINY_MODELS["llama"](0).save_pretrained(base)
    peft_dir = adapterkit.convert(native, root / "vera-peft", to="peft", base=base)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "VERA"
    return root, base, native, peft_dir


@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("which", ["native", "peft"])
def test_the_plan_is_made_on_the_plain_factors(vera, target, which):
    root, base, native, peft_dir = vera
    source = native if which == "native" else peft_dir
    report = adapterkit.validate(source, base=base, target=target)
    assert report.valid, [str(e) for e in report.errors]
    assert report.plan["loads"] and report.plan["coverage"] == 1.0
    steps = report.plan["steps"]
    assert steps[0].startswith(f"adapterkit compose {source} -o LORA --strategy cat --base {base}"), steps
    assert steps[-1] == "adapterkit convert LORA OUT --to peft"
    # the steps do what they say: the result is a PEFT LoRA folder
    lora = adapterkit.compose([adapterkit.load(source, base=base)], "cat")
    out = adapterkit.save(lora, root / f"out-{target}-{which}", format="peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
