"""``adapterkit.to_lora`` / ``adapterkit to-lora``: lowering adapters with a computable delta to plain LoRA.

Every adapter is perturbed first (a fresh LoRA / DoRA has B = 0 and changes nothing).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterkit
from adapterkit.cli import main
from adapterkit.core.check.targets.vllm import MAX_RANKS as VLLM_MAX_RANKS
from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.core.plugin.registry import default_registry
from adapterkit.testing import perturb
from helpers import require_methods
from models import BUILDERS, sample_inputs

TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs()).logits


def adapted(method: str, kind: str = "llama", seed: int = 0, r: int = 4, **config):
    model = BUILDERS[kind]()
    handle = adapterkit.inject(model, method, r=r, alpha=2 * r, target_modules=config.pop("targets", TARGETS),
                               **config)
    perturb(handle.parameters(), seed=seed)
    return model, handle.to_adapter()


def deltas(adapter, base_dir) -> dict[str, np.ndarray]:
    """Each module's delta in [out, in], independently: merged weight - base weight, through merge_into_base."""
    from adapterkit.core.format import safetensors_io
    from adapterkit.core.format.base_model import read_base_model

    return {module: _delta(adapter, module, base_dir, read_base_model, safetensors_io) for module in adapter.targets}


def _delta(adapter, module, base_dir, read_base_model, safetensors_io):
    method = default_registry().method(adapter.method)
    info = read_base_model(base_dir)
    key = info.resolve(f"{module}.weight")
    header = safetensors_io.read_header(base_dir / info.weights[key].file)
    w = safetensors_io.read_tensor(header, key).astype(np.float64)
    target = adapter.targets[module]
    merged = np.asarray(method.merged_weight(module, target, method.resolve_config(adapter.config),
                                             adapter.module_tensors(module), w), dtype=np.float64)
    d = merged - w
    return d.T if target["kind"] == "conv1d" else d


def lora_delta(adapter, module) -> np.ndarray:
    t = adapter.targets[module]
    a = adapter.tensors[f"{module}.lora.A"].astype(np.float64)
    b = adapter.tensors[f"{module}.lora.B"].astype(np.float64)
    return (t["alpha"] / t["r"]) * b @ a


def svd_error(d: np.ndarray, k: int) -> float:
    s = np.linalg.svd(d, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)))


# ---- exactness ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_lora_is_exact(kind):
    targets = TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    model, source = adapted("lora", kind, targets=targets)
    low = adapterkit.to_lora(source)
    assert low.adapter.method == "lora"
    assert {m.rank for m in low.modules} == {4}  # the delta's own rank
    assert low.total_error < 1e-6
    assert float((logits(adapterkit.apply(low.adapter, BUILDERS[kind]())) - logits(model)).abs().max()) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_dora_with_base_is_exact(kind, tiny_base_dirs):
    targets = TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    model, source = adapted("dora", kind, targets=targets)
    low = adapterkit.to_lora(source, base=tiny_base_dirs[kind])
    assert low.adapter.method == "lora"
    assert all(m.rank == min(m.shape) for m in low.modules)  # DoRA's delta has full rank
    assert low.total_error < 1e-6
    assert float((logits(adapterkit.apply(low.adapter, BUILDERS[kind]())) - logits(model)).abs().max()) <= 1e-4


# ---- errors at a lower rank ------------------------------------------------------------

def test_low_rank_lora_errors_match_numpy_svd():
    _, source = adapted("lora", r=8)
    low = adapterkit.to_lora(source, rank=3)
    for m in low.modules:
        d = lora_delta(source, m.module)
        assert m.rank == 3
        assert m.error == pytest.approx(svd_error(d, 3), rel=1e-6, abs=1e-9)
        got = lora_delta(low.adapter, m.module)
        assert np.linalg.norm(d - got) / np.linalg.norm(d) == pytest.approx(m.error, rel=1e-5)
    errors = {m.module: m.error for m in low.modules}
    assert low.worst.error == max(errors.values()) > 0
    total = np.sqrt(sum(np.sum((lora_delta(source, m) - lora_delta(low.adapter, m)) ** 2) for m in errors)
                    / sum(np.sum(lora_delta(source, m) ** 2) for m in errors))
    assert low.total_error == pytest.approx(total, rel=1e-5)


def test_low_rank_dora_errors_match_numpy_svd(tiny_base_dirs):
    _, source = adapted("dora")
    low = adapterkit.to_lora(source, rank=5, base=tiny_base_dirs["llama"])
    true = deltas(source, tiny_base_dirs["llama"])
    for m in low.modules:
        assert m.error == pytest.approx(svd_error(true[m.module], 5), rel=1e-5)
        got = lora_delta(low.adapter, m.module)
        assert np.linalg.norm(true[m.module] - got) / np.linalg.norm(true[m.module]) == pytest.approx(m.error,
                                                                                                        rel=1e-4)


def test_energy_chooses_each_modules_smallest_rank(tiny_base_dirs):
    _, source = adapted("dora")
    low = adapterkit.to_lora(source, energy=0.9, base=tiny_base_dirs["llama"])
    true = deltas(source, tiny_base_dirs["llama"])
    for m in low.modules:
        s2 = np.linalg.svd(true[m.module], compute_uv=False) ** 2
        want = int(np.argmax(np.cumsum(s2) >= 0.9 * s2.sum())) + 1
        assert m.rank == want
        assert m.error <= np.sqrt(0.1) + 1e-9
        assert low.adapter.targets[m.module]["r"] == want
    assert len({m.rank for m in low.modules}) > 1  # per-module ranks, recorded per module


def test_rank_above_a_modules_size_is_clamped_and_exact(tiny_base_dirs):
    _, source = adapted("dora")
    low = adapterkit.to_lora(source, rank=1000, base=tiny_base_dirs["llama"])
    assert all(m.rank == min(m.shape) for m in low.modules) and low.total_error < 1e-6


def test_vllm_target_rounds_ranks_up_and_passes_its_rules(tiny_base_dirs):
    _, source = adapted("dora")
    low = adapterkit.to_lora(source, energy=0.95, target="vllm", base=tiny_base_dirs["llama"])
    for m in low.modules:
        assert m.rank in VLLM_MAX_RANKS
        assert low.adapter.tensors[f"{m.module}.lora.A"].shape[0] == m.rank
    assert low.validation is not None and low.validation.valid and any(c.startswith("vllm load plan") for c in low.validation.checks)
    exact = adapterkit.to_lora(source, rank=3, target="vllm", base=tiny_base_dirs["llama"])
    assert {m.rank for m in exact.modules} == {8}  # 3 rounded up: the 8 leading directions kept
    plain = adapterkit.to_lora(source, rank=8, base=tiny_base_dirs["llama"])
    assert [m.error for m in exact.modules] == pytest.approx([m.error for m in plain.modules])
    lora = adapterkit.to_lora(adapted("lora")[1], target="vllm")  # rank 4 padded to 8 with zeros: still exact
    assert {m.rank for m in lora.modules} == {8} and lora.total_error < 1e-6


def test_ia3_lowers_with_its_base(tiny_base_dirs):
    require_methods("ia3")
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, "ia3", target_modules=["k_proj", "v_proj", "down_proj"],
                               feedforward_modules=["down_proj"])
    perturb(handle.parameters(), seed=1)
    low = adapterkit.to_lora(handle.to_adapter(), base=tiny_base_dirs["llama"])
    assert low.total_error < 1e-6
    assert float((logits(adapterkit.apply(low.adapter, BUILDERS["llama"]())) - logits(model)).abs().max()) <= 1e-4


def test_ia3_changing_a_bias_is_refused(tmp_path):
    require_methods("ia3")
    base = BUILDERS["gpt2"]()
    with torch.no_grad():
        for module in base.modules():
            if type(module).__name__ == "Conv1D":
                module.bias.normal_(generator=torch.Generator().manual_seed(0))
    base.save_pretrained(tmp_path / "base")
    model = BUILDERS["gpt2"]()
    handle = adapterkit.inject(model, "ia3", target_modules=["c_attn"], feedforward_modules=[])
    perturb(handle.parameters(), seed=1)
    with pytest.raises(UsageError, match=r"also changes the bias of transformer\.h\.0\.attn\.c_attn"):
        adapterkit.to_lora(handle.to_adapter(), base=tmp_path / "base")


# ---- PEFT's convert_to_lora ----------------------------------------------------------------

def test_error_no_worse_than_peft_convert_to_lora(tiny_base_dirs):
    import peft

    model, source = adapted("dora")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS["llama"](), config)
    names = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    state = {f"base_model.model.{key.rsplit('.dora.', 1)[0]}.{names[key.rsplit('.', 1)[1]]}": torch.from_numpy(v.copy())
             for key, v in source.tensors.items()}
    assert not peft.set_peft_model_state_dict(pm, state).unexpected_keys
    assert float((logits(pm) - logits(model)).abs().max()) <= 1e-5  # the same adapter
    rank = 3
    _, peft_state = peft.convert_to_lora(pm, rank, progressbar=False)
    ours = adapterkit.to_lora(source, rank=rank, base=tiny_base_dirs["llama"])
    true = deltas(source, tiny_base_dirs["llama"])
    for m in ours.modules:
        prefix = f"base_model.model.{m.module}"
        a = peft_state[f"{prefix}.lora_A.weight"].double().numpy()
        b = peft_state[f"{prefix}.lora_B.weight"].double().numpy()
        d = true[m.module]
        peft_error = np.linalg.norm(d - b @ a) / np.linalg.norm(d)
        assert m.error <= peft_error + 1e-5, m.module


# ---- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("method, config", [("bottleneck", {"reduction_factor": 4}),
                                            ("prompt", {"num_virtual_tokens": 4}),
                                            ("prefix", {"num_virtual_tokens": 4})])
def test_methods_without_a_delta_are_refused(method, config):
    model = BUILDERS["llama"]()
    handle = adapterkit.inject(model, method, **config)
    with pytest.raises(UsageError, match=rf"method '{method}' has no per-module weight delta") as info:
        adapterkit.to_lora(handle.to_adapter())
    assert "MergedWeight" in str(info.value) and "\n" not in str(info.value)


def test_option_refusals(tiny_base_dirs):
    _, source = adapted("lora")
    for kwargs, match in (({"rank": 0}, "rank must be"), ({"rank": 2, "energy": 0.9}, "not both"),
                          ({"energy": 0.0}, r"energy must be in \(0, 1\]"), ({"energy": 1.5}, "energy must be"),
                          ({"target": "tgi"}, "unknown runtime target")):
        with pytest.raises(UsageError, match=match):
            adapterkit.to_lora(source, **kwargs)
    _, dora = adapted("dora")
    with pytest.raises(UsageError, match="needs the base model"):
        adapterkit.to_lora(dora)
    with pytest.raises(AdapterkitError, match="model_type"):
        adapterkit.to_lora(dora, base=tiny_base_dirs["gpt2"])


# ---- CLI -----------------------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(main.cli, list(map(str, args)))


def test_cli_json_and_text(tmp_path, tiny_base_dirs):
    _, source = adapted("dora")
    adapterkit.save(source, tmp_path / "dora")
    result = cli("to-lora", tmp_path / "dora", tmp_path / "out", "--rank", "4", "--base", tiny_base_dirs["llama"],
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["method"] == "lora" and data["source_method"] == "dora" and data["rank"] == 4
    assert {m["module"] for m in data["modules"]} == set(source.targets)
    assert all(set(m) == {"module", "rank", "error", "shape"} for m in data["modules"])
    assert data["worst"]["error"] == max(m["error"] for m in data["modules"])
    assert 0 < data["total_error"] <= data["worst"]["error"]
    assert adapterkit.load(tmp_path / "out").method == "lora"
    text = cli("to-lora", tmp_path / "dora", tmp_path / "peft", "--energy", "0.99", "--base",
               tiny_base_dirs["llama"], "--to", "peft")
    assert text.exit_code == 0, text.output
    assert "worst:" in text.output and "total error" in text.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert adapterkit.load(tmp_path / "peft").method == "lora"


def test_cli_refusals_write_nothing(tmp_path, tiny_base_dirs):
    _, source = adapted("dora")
    adapterkit.save(source, tmp_path / "dora")
    model = BUILDERS["llama"]()
    adapterkit.save(adapterkit.inject(model, "bottleneck", reduction_factor=4).to_adapter(), tmp_path / "bn")
    cases = [(tmp_path / "bn", []), (tmp_path / "dora", []), (tmp_path / "dora", ["--rank", "0"]),
             (tmp_path / "dora", ["--rank", "2", "--energy", "0.5"]), (tmp_path / "dora", ["--energy", "2"])]
    for i, (src, args) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = cli("to-lora", src, out, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_qlora_lowers_to_a_qlora_of_lower_rank():
    """QLoRA holds plain factors (FromFactors): the result stays QLoRA, its quantisation carried."""
    from adapterkit.core.format.adapter import Adapter
    from adapterkit.core.format.manifest import Manifest
    from helpers import make_lora_adapter

    lora = make_lora_adapter(seed=3)
    manifest = Manifest(method="qlora", config={**lora.config, "quant_type": "fp4"}, targets=lora.targets,
                        dtype="float32", base_model=lora.manifest.base_model)
    qlora = Adapter(manifest, {k.replace(".lora.", ".qlora."): v for k, v in lora.tensors.items()})
    low = adapterkit.to_lora(qlora, rank=2)
    assert low.adapter.method == "qlora" and low.adapter.config["quant_type"] == "fp4"
    for m in low.modules:
        assert m.rank == 2
        assert m.error == pytest.approx(svd_error(lora_delta(lora, m.module), 2), rel=1e-6)
