"""adapterkit.core.ops.compose: combining LoRA adapters, checked against PEFT's add_weighted_adapter."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.ops.compose import compose
from adapterkit.core.errors import UsageError
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.plugin.registry import default_registry
from adapterkit.testing import delta_weights

import torch
import peft  # noqa: F401

from models import tiny_gpt2, tiny_llama  # noqa: E402

WEIGHTS = [0.7, -0.4]
PEFT_STRATEGIES = {
    "linear": {},
    "cat": {},
    "svd": {},
    "ties": {"density": 0.5},
    "magnitude_prune": {"density": 0.3},
}


def lora():
    return default_registry().method("lora")


def adapter_from_peft(model, name: str) -> Adapter:
    """PEFT adapter ``name`` in adapterkit's canonical layout (per-module r and alpha recorded)."""
    from peft.tuners.lora import LoraLayer

    cfg = model.peft_config[name]
    targets, tensors = {}, {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            base = module.get_base_layer()
            kind = "conv1d" if type(base).__name__ == "Conv1D" else "linear"
            targets[path] = {"kind": kind, "shape": list(base.weight.shape), "r": module.r[name],
                             "alpha": module.lora_alpha[name]}
            tensors[f"{path}.lora.A"] = module.lora_A[name].weight.detach().numpy().copy()
            tensors[f"{path}.lora.B"] = module.lora_B[name].weight.detach().numpy().copy()
    config = {"r": cfg.r, "alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora}
    return Adapter(Manifest(method="lora", config=config, targets=targets, dtype="float32",
                            base_model={"model_type": model.base_model.model.config.model_type}), tensors)


def two_adapter_peft(kind: str, use_rslora: bool = False, rank_b: int = 4):
    """A PEFT model with adapters ``a`` and ``b`` (random non-zero B; different alphas; b adapts fewer modules)."""
    from peft import LoraConfig, get_peft_model

    if kind == "llama":
        model, modules, extra = tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], {}
    else:
        model, modules, extra = tiny_gpt2(), ["c_attn", "c_fc", "c_proj"], {"fan_in_fan_out": True}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=modules, use_rslora=use_rslora,
                                                      init_lora_weights=False, **extra), adapter_name="a")
        peft_model.add_adapter("b", LoraConfig(r=rank_b, lora_alpha=5, target_modules=modules[:2],
                                               use_rslora=use_rslora, init_lora_weights=False, **extra))
    return peft_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def peft_pair(request):
    model = two_adapter_peft(request.param)
    return model, adapter_from_peft(model, "a"), adapter_from_peft(model, "b")


def peft_deltas(model, name: str) -> dict[str, np.ndarray]:
    from peft.tuners.lora import LoraLayer

    return {path: module.get_delta_weight(name).detach().numpy()
            for path, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and name in module.lora_A}


def add_weighted(model, strategy: str, name: str | None = None, **kwargs) -> str:
    name = name or f"{strategy}-{len(model.peft_config)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=strategy, **kwargs)
    return name


@pytest.mark.parametrize("strategy", sorted(PEFT_STRATEGIES))
def test_delta_weights_match_peft_add_weighted_adapter(strategy, peft_pair):
    model, a, b = peft_pair
    options = PEFT_STRATEGIES[strategy]
    name = add_weighted(model, strategy, **options)
    expected = peft_deltas(model, name)

    result = compose([a, b], strategy, weights=WEIGHTS, **options)

    got = delta_weights(result)
    assert sorted(got) == sorted(expected) == sorted(a.targets)  # modules only in `a` count as zero in `b`
    for module, delta in expected.items():
        assert got[module].shape == delta.shape
        assert np.abs(got[module] - delta).max() <= 1e-5, module
    ranks = {t["r"] for t in result.targets.values()}
    assert ranks == ({4, 8} if strategy == "cat" else {4})
    assert all(t["alpha"] == t["r"] for t in result.targets.values())  # scale 1


def test_svd_truncation_matches_peft(peft_pair):
    model, a, b = peft_pair
    name = add_weighted(model, "svd", svd_rank=2)
    expected = peft_deltas(model, name)
    result = compose([a, b], "svd", weights=WEIGHTS, rank=2)
    for module, delta in expected.items():
        assert result.tensors[f"{module}.lora.A"].shape[0] == 2
        assert np.abs(delta_weights(result)[module] - delta).max() <= 1e-5, module


def test_rslora_inputs_give_peft_factors_with_scale_one():
    """PEFT keeps use_rslora on the combined adapter (alpha = r), so its delta gains sqrt(r); ours keeps scale 1."""
    model = two_adapter_peft("llama", use_rslora=True)
    a, b = adapter_from_peft(model, "a"), adapter_from_peft(model, "b")
    name = add_weighted(model, "linear")
    result = compose([a, b], "linear", weights=WEIGHTS)
    from peft.tuners.lora import LoraLayer

    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            assert module.scaling[name] == pytest.approx(math.sqrt(4))
            for factor in ("A", "B"):
                peft_factor = getattr(module, f"lora_{factor}")[name].weight.detach().numpy()
                assert np.abs(result.tensors[f"{path}.lora.{factor}"] - peft_factor).max() <= 1e-6
    a_delta = delta_weights(a)
    for module, delta in delta_weights(result).items():
        if module not in b.targets:  # held by one adapter: linear is exact, weight * its own delta
            assert np.abs(delta - WEIGHTS[0] * a_delta[module]).max() <= 1e-5


def test_cat_handles_different_ranks_exactly():
    model = two_adapter_peft("llama", rank_b=6)
    a, b = adapter_from_peft(model, "a"), adapter_from_peft(model, "b")
    name = add_weighted(model, "cat")
    expected = peft_deltas(model, name)
    result = compose([a, b], "cat", weights=WEIGHTS)
    a_delta, b_delta = delta_weights(a), delta_weights(b)
    for module, delta in delta_weights(result).items():
        assert np.abs(delta - expected[module]).max() <= 1e-5
        assert np.abs(delta - (WEIGHTS[0] * a_delta[module] + WEIGHTS[1] * b_delta.get(module, 0))).max() <= 1e-5
        assert result.targets[module]["r"] == (10 if module in b.targets else 4)
    with pytest.raises(UsageError, match="ranks must be equal") as info:
        compose([a, b], "linear")
    assert "cat" in str(info.value) and "svd" in str(info.value)


def synthetic(shape: tuple[int, int], r: int, seed: int, alpha: float = 8.0, kind: str = "linear",
              module: str = "model.layers.0.mlp.up_proj", model_type: str = "llama") -> Adapter:
    rng = np.random.default_rng(seed)
    out, inp = shape
    tensors = {f"{module}.lora.A": rng.standard_normal((r, inp), dtype=np.float32) / math.sqrt(inp),
               f"{module}.lora.B": rng.standard_normal((out, r), dtype=np.float32)}
    targets = {module: {"kind": kind, "shape": [out, inp], "r": r, "alpha": alpha}}
    return Adapter(Manifest(method="lora", config={"r": r, "alpha": alpha}, targets=targets, dtype="float32",
                            base_model={"model_type": model_type}), tensors)


def test_svd_uses_the_low_rank_structure():
    """A 60000 x 50000 delta (12 GB in float32) is never formed: this runs in well under a second."""
    a, b = synthetic((60000, 50000), 4, 0), synthetic((60000, 50000), 4, 1)
    result = compose([a, b], "svd", weights=[1.0, 0.5], rank=8)  # rank 8 holds the whole sum
    module = "model.layers.0.mlp.up_proj"
    probe = np.random.default_rng(2).standard_normal((50000, 3)).astype(np.float32)

    def apply(adapter: Adapter, weight: float) -> np.ndarray:
        t = adapter.targets[module]
        scale = t["alpha"] / t["r"]
        return weight * scale * (adapter.tensors[f"{module}.lora.B"] @ (adapter.tensors[f"{module}.lora.A"] @ probe))

    want = apply(a, 1.0) + apply(b, 0.5)
    got = apply(result, 1.0)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_svd_of_one_adapter_reduces_its_rank_optimally():
    a = synthetic((40, 30), 6, 3)
    module = "model.layers.0.mlp.up_proj"
    full = delta_weights(a)[module].astype(np.float64)
    u, s, vt = np.linalg.svd(full)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    result = compose([a], "svd", rank=3)
    assert np.abs(delta_weights(result)[module] - best).max() <= 1e-5
    padded = compose([a], "svd", rank=9)  # more than the sum's rank: exact, zero-padded
    assert padded.targets[module]["r"] == 9
    assert np.abs(delta_weights(padded)[module] - full).max() <= 1e-5


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_and_keeps_density(strategy):
    a, b = synthetic((256, 128), 8, 0), synthetic((256, 128), 8, 1)
    first = compose([a, b], strategy, weights=[1.0, 0.5], density=0.3, seed=7)
    again = compose([a, b], strategy, weights=[1.0, 0.5], density=0.3, seed=7)
    other = compose([a, b], strategy, weights=[1.0, 0.5], density=0.3, seed=8)
    for key in first.tensors:
        assert np.array_equal(first.tensors[key], again.tensors[key])
        assert not np.array_equal(first.tensors[key], other.tensors[key])
    composition = first.manifest.provenance.get("composition") or first.manifest.annotations["adapterkit.composition"]
    assert composition["seed"] == 7 and composition["density"] == 0.3
    drawn = compose([a, b], strategy, weights=[1.0, 0.5], density=0.3)
    recorded = (drawn.manifest.provenance.get("composition") or drawn.manifest.annotations["adapterkit.composition"])
    assert isinstance(recorded["seed"], int)
    replay = compose([a, b], strategy, weights=[1.0, 0.5], density=0.3, seed=recorded["seed"])
    assert all(np.array_equal(drawn.tensors[k], replay.tensors[k]) for k in drawn.tensors)


def test_dare_keeps_a_density_fraction_rescaled_by_one_over_density():
    a = synthetic((512, 512), 16, 0, alpha=32.0)  # scale 2
    module = "model.layers.0.mlp.up_proj"
    weight, density = 0.5, 0.25
    result = compose([a], "dare_linear", weights=[weight], density=density, seed=0)
    factor = math.sqrt(weight * 2.0)  # sqrt(weight * scale) on each factor
    for name in ("A", "B"):
        original = a.tensors[f"{module}.lora.{name}"]
        pruned = result.tensors[f"{module}.lora.{name}"]
        kept = pruned != 0
        assert abs(kept.mean() - density) < 0.01
        np.testing.assert_allclose(pruned[kept], factor * original[kept] / density, rtol=1e-6)
    # unbiased: the mean over many seeds approaches the unpruned factor
    runs = [compose([a], "dare_linear", weights=[weight], density=density, seed=s).tensors[f"{module}.lora.A"]
            for s in range(200)]
    mean = np.mean(runs, axis=0)
    expected = factor * a.tensors[f"{module}.lora.A"]
    assert np.abs(mean - expected).mean() < 0.1 * np.abs(expected).mean() * math.sqrt((1 - density) / density)


def test_options_are_checked():
    a, b = synthetic((8, 8), 2, 0), synthetic((8, 8), 2, 1)
    cases = [
        (dict(strategy="ties"), "needs a density"),
        (dict(strategy="ties", density=1.5), "density must be in"),
        (dict(strategy="linear", density=0.5), "no effect"),
        (dict(strategy="linear", rank=4), "rank has no effect"),
        (dict(strategy="cat", seed=1), "seed has no effect"),
        (dict(strategy="svd", rank=0), "rank must be"),
        (dict(strategy="linear", weights=[1.0]), "1 weight"),
        (dict(strategy="mean"), "unknown strategy"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            compose([a, b], **kwargs)


def test_inputs_from_different_bases_or_methods_are_refused():
    a = synthetic((8, 8), 2, 0)
    with pytest.raises(UsageError, match="different base models"):
        compose([a, synthetic((8, 8), 2, 1, model_type="gpt2")], "cat")
    with pytest.raises(UsageError, match="differs in kind or shape"):
        compose([a, synthetic((16, 8), 2, 1)], "cat")
    other = synthetic((8, 8), 2, 1)
    other.manifest.method = "ia3"
    with pytest.raises(UsageError, match="different methods"):
        compose([a, other], "cat")


def test_result_validates_and_records_its_sources(tmp_path):
    from adapterkit.core.store.adapters import load, save
    from adapterkit.core.check.validate import validate

    model = two_adapter_peft("llama")
    save(adapter_from_peft(model, "a"), tmp_path / "a")
    save(adapter_from_peft(model, "b"), tmp_path / "b")
    result = compose([tmp_path / "a", tmp_path / "b"], "ties", weights=WEIGHTS, density=0.5)
    save(result, tmp_path / "out")
    report = validate(tmp_path / "out")
    assert report.valid, [str(e) for e in report.errors]
    manifest = load(tmp_path / "out").manifest
    composition = manifest.provenance.get("composition") or manifest.annotations["adapterkit.composition"]
    assert composition["strategy"] == "ties" and composition["weights"] == WEIGHTS
    assert composition["density"] == 0.5 and composition["majority_sign"] == "total"
    sources = composition["sources"]
    assert [s["path"] for s in sources] == [str(tmp_path / "a"), str(tmp_path / "b")]
    for source, name in zip(sources, "ab", strict=True):
        written = load(tmp_path / name).manifest
        assert source["sha256"] == {k: v["sha256"] for k, v in written.tensors.items()}
        assert source["fingerprint"] == targets_fingerprint(written.targets)
    assert manifest.base_model["model_type"] == "llama"
    assert manifest.provenance["created_by"].startswith("adapterkit")


# ---- CLI ------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    from click.testing import CliRunner

    from adapterkit.cli import main

    monkeypatch.setitem(main.COMMANDS, "compose", ("adapterkit.cli.compose", "Combine LoRA adapters."))
    runner = CliRunner()
    return lambda *args: runner.invoke(main.cli, list(map(str, args)))


def test_cli_compose(cli, tmp_path):
    from adapterkit.core.store.adapters import load, save

    save(synthetic((16, 8), 2, 0), tmp_path / "a")
    save(synthetic((16, 8), 2, 1), tmp_path / "b")
    result = cli("compose", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out", "--strategy", "svd",
                 "--weights", "0.5,-1", "--rank", "3")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "out").targets["model.layers.0.mlp.up_proj"]["r"] == 3
    bad = cli("compose", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out2", "--strategy", "ties")
    assert bad.exit_code == 1
    assert bad.output.startswith("error: ") and "density" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "out2").exists()
    usage = cli("compose", tmp_path / "a", "-o", tmp_path / "out3", "--strategy", "linear", "--weights", "x")
    assert usage.exit_code == 2


# ---- a plugin method's own strategies (the Composable capability: compose_strategies + compose) ------

from typing import Any  # noqa: E402

from adapterkit import Composable  # noqa: E402
from adapterkit.core.errors import AdapterkitError  # noqa: E402
from models import TorchlessMethod  # noqa: E402
from adapterkit.core.plugin.hookspecs import hookimpl  # noqa: E402
from adapterkit.core.plugin.registry import Registry, get_plugin_manager  # noqa: E402


class VectorScale(TorchlessMethod, Composable):
    """A throwaway method: one vector per linear module; its plugin offers "mean" (and a broken "bad")."""

    name = "test_vector"
    compose_strategies = ("mean", "bad")

    def config_schema(self) -> dict[str, Any]:
        return {"type": "object"}

    def expected_tensors(self, module: str, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        return {f"{module}.{self.name}.v": (target["shape"][0],)}

    def compose(self, adapters, weights, strategy, options):
        if options:
            raise UsageError("mean takes only weights", found=sorted(options), code="bad_option")
        targets = {m: t for a in adapters for m, t in a.targets.items()}
        total = sum(weights)
        tensors = {k: sum(w * a.tensors[k] for a, w in zip(adapters, weights)) / total
                   for k in adapters[0].tensors}
        if strategy == "bad":
            tensors = {k: v[:-1] for k, v in tensors.items()}  # a plugin bug: one entry short
        return {"note": "mean"}, targets, tensors


class _VectorPlugin:
    @hookimpl
    def adapterkit_register_methods(self, register):
        register(VectorScale())


def _vector_adapter(seed: int, method: str = "test_vector") -> Adapter:
    rng = np.random.default_rng(seed)
    targets = {"layers.0.q": {"kind": "linear", "shape": [4, 3]}}
    manifest = Manifest(method=method, config={}, targets=targets, dtype="float32",
                        base_model={"model_type": "toy", "fingerprint": targets_fingerprint(targets)})
    return Adapter(manifest, {f"layers.0.q.{method}.v": rng.standard_normal(4).astype(np.float32)})


@pytest.fixture(scope="module")
def vector_registry() -> Registry:
    return Registry(*get_plugin_manager(plugins=[("test-vector", _VectorPlugin())]))


def test_a_plugin_method_composes_with_its_own_strategy(vector_registry):
    a, b = _vector_adapter(1), _vector_adapter(2)
    out = compose([a, b], "mean", [3.0, 1.0], registry=vector_registry)
    key = "layers.0.q.test_vector.v"
    np.testing.assert_allclose(out.tensors[key], (3 * a.tensors[key] + b.tensors[key]) / 4, rtol=1e-6)
    assert out.method == "test_vector" and out.config == {"note": "mean"}
    composition = out.manifest.provenance["composition"]
    assert composition["strategy"] == "mean" and composition["weights"] == [3.0, 1.0]
    assert len(composition["sources"]) == 2 and out.manifest.base_model["model_type"] == "toy"


def test_a_plugin_strategy_is_checked_and_its_result_too(vector_registry):
    a, b = _vector_adapter(1), _vector_adapter(2)
    with pytest.raises(UsageError, match="no compose strategy 'svd'") as info:
        compose([a, b], "svd", registry=vector_registry)
    assert info.value.expected == ["mean", "bad"]
    with pytest.raises(UsageError, match="mean takes only weights"):
        compose([a, b], "mean", density=0.5, registry=vector_registry)
    with pytest.raises(UsageError, match="majority_sign is a LoRA ties"):
        compose([a, b], "mean", majority_sign="frequency", registry=vector_registry)
    with pytest.raises(AdapterkitError, match="composed an inconsistent adapter") as bad:
        compose([a, b], "bad", registry=vector_registry)
    assert bad.value.code == "bad_plugin_result" and bad.value.location == "layers.0.q.test_vector.v"


def test_a_method_without_strategies_is_refused_naming_those_that_compose():
    adapter = _vector_adapter(1, method="bottleneck")
    with pytest.raises(UsageError, match="method 'bottleneck' has no compose strategies") as info:
        compose([adapter, adapter], "linear")
    assert info.value.code == "not_composable" and "lora" in str(info.value.expected).split("installed: ")[1]
    assert "adapterkit compose --runtime stack|average|weighted_sum" in info.value.hint  # what to do instead
