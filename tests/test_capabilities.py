"""Capabilities instead of method names (issue 14): a third party's low-rank method gets every command its
capabilities allow, and the core keeps the shape that makes that true (one-way imports, no method ids).

The method is tests/gated_lora.py, written against the public ``adapterkit`` API only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.core.plugin.registry import Registry, get_plugin_manager
from adapterkit.testing import TINY_MODELS, perturb, sample_inputs
from gated_lora import NAME, GatedLora, Plugin

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(*get_plugin_manager(plugins=[("gated-lora", Plugin())]))


def gated_adapter(registry: Registry, seed: int, **config) -> adapterkit.Adapter:
    model = TINY_MODELS["llama"](0)
    handle = adapterkit.inject(model, NAME, config, registry=registry)
    torch.manual_seed(seed)
    perturb(handle.parameters(), scale=0.3)
    return handle.to_adapter()


def applied_logits(adapter: adapterkit.Adapter | None, registry: Registry, inputs: dict) -> torch.Tensor:
    model = TINY_MODELS["llama"](0).eval()
    if adapter is not None:
        adapterkit.apply(adapter, model, registry=registry)
    with torch.no_grad():
        return model(**inputs).logits


def test_the_capabilities_are_what_the_class_declares(registry):
    from adapterkit.core.plugin.capabilities import summary

    caps = summary(registry.method(NAME))
    assert caps["capabilities"] == ["LowRank"] and caps["adapter_pool"] and caps["merge"]
    assert "svd" in caps["compose"] and caps["runtime_composition"] == []


def test_the_adapter_pool_serves_a_third_party_low_rank_method(registry):
    """A mixed batch (two gated adapters, one row without) equals each adapter applied alone, row by row."""
    a, b = gated_adapter(registry, 1), gated_adapter(registry, 2, r=2, target_modules=["q_proj", "k_proj", "o_proj"])
    inputs = sample_inputs(batch=3)
    pool = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=2, max_rank=4,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], registry=registry)
    pool.load("a", a)
    pool.load("b", b)
    with torch.no_grad():
        mixed = pool(**inputs, adapter_names=["a", None, "b"]).logits
    expected = [applied_logits(a, registry, inputs)[0], applied_logits(None, registry, inputs)[1],
                applied_logits(b, registry, inputs)[2]]
    for row, want in enumerate(expected):
        assert torch.allclose(mixed[row], want, atol=1e-5), row
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the adapters do change the output
    paged = adapterkit.AdapterPool(TINY_MODELS["llama"](0).eval(), max_adapters=1, max_rank=4,  # one slot, paging
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], registry=registry)
    assert paged.load("a", a) == 1 and paged.load("b", b) is None
    with torch.no_grad():
        wide = paged(**inputs, adapter_names=["a", None, "b"]).logits  # two adapters through one slot: sub-batches
    for row, want in enumerate(expected):
        assert torch.allclose(wide[row], want, atol=1e-5), row
    assert paged.stats.wide_calls == 1 and paged.resident == ["b"]


def test_merge_compose_and_runtime_targets_take_it(registry, tiny_base_dirs, tmp_path):
    a, b = gated_adapter(registry, 3), gated_adapter(registry, 4)
    inputs = sample_inputs(batch=2)
    # merge: the merged folder gives the applied adapter's logits
    merged = adapterkit.merge(a, tiny_base_dirs["llama"], tmp_path / "merged", registry=registry)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**inputs).logits
    assert torch.allclose(got, applied_logits(a, registry, inputs), atol=1e-5)
    # compose cat: exact, and the result holds plain factors (a lora adapter: the first FromFactors method)
    composed = adapterkit.compose([a, b], "cat", registry=registry)
    assert composed.method == "lora"
    method = registry.method(NAME)
    for module, target in a.targets.items():
        want = sum(method.lora_factors(module, t.targets[module], t.config, t.module_tensors(module)).delta()
                   for t in (a, b))
        got_delta = registry.method("lora").delta_weight(module, composed.targets[module], composed.config,
                                                        composed.module_tensors(module))
        np.testing.assert_allclose(got_delta, want, atol=1e-6)
    # validate --target: the runtimes apply low-rank factors, so the rules run (and pass) on it
    folder = adapterkit.save(a, tmp_path / "a", registry=registry)
    report = adapterkit.validate(folder, base=tiny_base_dirs["llama"], target="onnxruntime", registry=registry)
    assert report.valid, [str(e) for e in report.errors]
    assert report.plan["runtime"] == "onnxruntime" and report.plan["coverage"] == 1.0
    vllm = adapterkit.validate(folder, target="vllm", registry=registry)
    assert vllm.valid and vllm.plan["loads"] and vllm.plan["coverage"] == 1.0
    assert {m["status"] for m in vllm.plan["modules"]} == {"applied"}


# ---- the shape of the core ---------------------------------------------------------------

METHOD_IDS = {"lora", "dora", "qlora", "bottleneck", "prompt", "prefix", "ia3", "loha", "lokr", "vera", "adalora",
              "oft", "boft"}


def _compared_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Method ids compared with ==, !=, in, not in with something about a method (``adapter.method``,
    ``method.name``, a ``METHODS`` tuple), as literals or in literal containers. A data field that happens
    to be called "prompt" is not a method id."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or "method" not in ast.unparse(node).lower():
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            found += [(node.lineno, v.value) for v in values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value in METHOD_IDS]
    return found


def test_the_core_never_compares_a_method_id():
    offenders = {}
    for path in sorted(CORE.rglob("*.py")):
        hits = _compared_strings(ast.parse(path.read_text("utf-8")))
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert not offenders, f"the core asks for capabilities, never for a method's name: {offenders}"


def test_the_core_is_sub_packages_of_small_modules():
    packages = [p for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    loose = [p for p in CORE.glob("*.py")]
    assert len(packages) >= 5 and len(loose) <= 8, (sorted(p.name for p in packages), sorted(p.name for p in loose))
    long = {str(p.relative_to(ROOT)): n for p in ROOT.joinpath("core").rglob("*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"


def test_the_import_contracts_hold():
    """lint-imports (import-linter) with the contracts of pyproject.toml: the core's layers, the core below the
    plugins and the CLI, no import cycle, plugins meeting only through public surfaces."""
    tool = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(tool), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout, result.stdout[-2000:]
