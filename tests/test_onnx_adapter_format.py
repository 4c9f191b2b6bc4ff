"""The onnx-adapter format plugin: ONNX Runtime ``.onnx_adapter`` files in Olive's layout.

Files are read back with ONNX Runtime itself (``AdapterFormat.read_adapter``,
``LoraAdapter``), and a file written by the plugin drives a swappable ONNX
export in ONNX Runtime to the torch model's logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxruntime as ort

import adapterkit
from adapterkit.core.errors import BaseModelError, FormatError, LossyConversionError, UsageError
from adapterkit.core.plugin.registry import Registry, default_registry
from adapterkit.plugins import onnx_adapter as plugin

from helpers import gpt2_targets, llama_targets

FILE = plugin.FILE_NAME


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The installed plugins: onnx-adapter is a built-in entry point, loaded like a third party's."""
    reg = default_registry()
    assert type(reg.format("onnx-adapter")).__module__ == plugin.__name__
    return reg


def lora_adapter(targets: dict[str, dict[str, Any]], seed: int = 0, dtype: str = "float32",
                 **config: Any) -> adapterkit.Adapter:
    """A LoRA adapter built from numpy alone (no torch): random A and B for each target."""
    from adapterkit.core.format.base_model import targets_fingerprint

    rng = np.random.default_rng(seed)
    tensors = {}
    for module, target in targets.items():
        fan_in, fan_out = (target["shape"] if target["kind"] == "conv1d" else target["shape"][::-1])
        tensors[f"{module}.lora.A"] = rng.standard_normal((target["r"], fan_in)).astype(dtype)
        tensors[f"{module}.lora.B"] = rng.standard_normal((fan_out, target["r"])).astype(dtype)
    r = next(iter(targets.values()))["r"]
    manifest = adapterkit.Manifest(
        method="lora", config={"r": r, "alpha": next(iter(targets.values()))["alpha"], **config}, targets=targets,
        dtype=dtype, base_model={"fingerprint": targets_fingerprint(targets)},
    )
    return adapterkit.Adapter(manifest, tensors)


def deltas(adapter: adapterkit.Adapter, registry: Registry) -> dict[str, np.ndarray]:
    method = registry.method("lora")
    config = method.resolve_config(adapter.config)
    return {m: method.delta_weight(m, t, config, {f"{m}.lora.{k}": v for k, v in adapter.module_tensors(m).items()})
            for m, t in adapter.targets.items()}


# ---- layout, checked with ONNX Runtime's own reader -----------------------------------------------

def test_file_layout_is_olive_s(registry, tmp_path):
    adapter = lora_adapter(llama_targets(r=4, alpha=6))
    adapterkit.save(adapter, tmp_path / "out", "onnx-adapter", registry=registry)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [FILE]
    fmt = ort.AdapterFormat.read_adapter(str(tmp_path / "out" / FILE))
    assert (fmt.get_format_version(), fmt.get_adapter_version(), fmt.get_model_version()) == (1, 1, 1)
    params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    module = "model.layers.0.self_attn.q_proj"
    assert sorted(params) == sorted(f"{m}.lora_{p}.weight" for m in adapter.targets for p in "AB")
    a, b = adapter.tensors[f"{module}.lora.A"], adapter.tensors[f"{module}.lora.B"]
    np.testing.assert_array_equal(params[f"{module}.lora_A.weight"], a.T)  # [in, r]
    np.testing.assert_array_equal(params[f"{module}.lora_B.weight"], (b * np.float32(6 / 4)).T)  # [r, out], scaled
    assert params[f"{module}.lora_A.weight"].dtype == np.float32


def test_versions_are_written_and_kept_in_provenance(registry, tmp_path):
    adapterkit.save(lora_adapter(llama_targets()), tmp_path / "out", "onnx-adapter", registry=registry,
                    adapter_version=7, model_version=3)
    fmt = ort.AdapterFormat.read_adapter(str(tmp_path / "out" / FILE))
    assert (fmt.get_adapter_version(), fmt.get_model_version()) == (7, 3)
    back = adapterkit.load(tmp_path / "out", registry=registry)
    assert back.manifest.provenance["converted_from"]["config"]["adapter_version"] == 7
    assert back.source_format == "onnx-adapter"


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("r,alpha,rslora,exact", [
    (4, 8, False, True),    # scale 2: a power of two, B * 2 is exact
    (4, 1, False, True),    # scale 1/4
    (4, 6, False, False),   # scale 1.5: within one rounding of B
    (2, 3, True, False),    # rsLoRA 3 / sqrt(2)
])
def test_round_trip_gives_the_same_update(r, alpha, rslora, exact, registry, tmp_path):
    adapter = lora_adapter(llama_targets(r=r, alpha=alpha), use_rslora=rslora)
    adapterkit.save(adapter, tmp_path / "out", "onnx-adapter", registry=registry)
    back = adapterkit.load(tmp_path / "out", registry=registry)
    assert back.method == "lora" and back.manifest.dtype == "float32"
    assert all(t["alpha"] == t["r"] == r for t in back.targets.values())  # scale 1: folded into B
    assert back.targets.keys() == adapter.targets.keys()
    np.testing.assert_array_equal(back.tensors["model.layers.1.self_attn.v_proj.lora.A"],
                                  adapter.tensors["model.layers.1.self_attn.v_proj.lora.A"])
    before, after = deltas(adapter, registry), deltas(back, registry)
    for module in before:
        if exact:
            np.testing.assert_array_equal(after[module], before[module])
        else:
            np.testing.assert_allclose(after[module], before[module], rtol=1e-6, atol=1e-6)


def test_per_module_ranks_round_trip(registry, tmp_path):
    targets = llama_targets(r=4, alpha=8)
    targets["model.layers.1.self_attn.q_proj"].update(r=2, alpha=4)
    adapter = lora_adapter(targets)
    adapterkit.save(adapter, tmp_path / "out", "onnx-adapter", registry=registry)
    back = adapterkit.load(tmp_path / "out", registry=registry)
    assert back.targets["model.layers.1.self_attn.q_proj"]["r"] == 2
    assert back.config["r"] == 4
    for module, delta in deltas(adapter, registry).items():
        np.testing.assert_array_equal(deltas(back, registry)[module], delta)
    report = adapterkit.validate(tmp_path / "out", registry=registry)
    assert report.valid, report.errors


def test_gpt2_conv1d_modules_need_the_base(registry, tiny_base_dirs, tmp_path):
    adapter = lora_adapter(gpt2_targets(r=2, alpha=4))
    adapterkit.save(adapter, tmp_path / "out", "onnx-adapter", registry=registry)
    with_base = adapterkit.load(tmp_path / "out", registry=registry, base=tiny_base_dirs["gpt2"])
    assert {t["kind"] for t in with_base.targets.values()} == {"conv1d"}
    assert with_base.targets == {m: {**t, "alpha": 2} for m, t in adapter.targets.items()}
    for module, delta in deltas(adapter, registry).items():
        np.testing.assert_array_equal(deltas(with_base, registry)[module], delta)
    without = adapterkit.load(tmp_path / "out", registry=registry)
    assert {t["kind"] for t in without.targets.values()} == {"linear"}  # documented: the file holds no kind
    with pytest.raises(BaseModelError):
        adapterkit.load(tmp_path / "out", registry=registry, base=tiny_base_dirs["llama"])


def test_float16_adapters_are_written_float32_by_default_or_float16(registry, tmp_path):
    adapter = lora_adapter(llama_targets(), dtype="float16")
    adapterkit.save(adapter, tmp_path / "f32", "onnx-adapter", registry=registry)
    adapterkit.save(adapter, tmp_path / "f16", "onnx-adapter", registry=registry, dtype="float16")
    assert adapterkit.load(tmp_path / "f32", registry=registry).manifest.dtype == "float32"
    back = adapterkit.load(tmp_path / "f16", registry=registry)
    assert back.manifest.dtype == "float16"
    np.testing.assert_allclose(next(iter(deltas(back, registry).values())),
                               next(iter(deltas(adapter, registry).values())), rtol=2e-3, atol=2e-3)


# ---- files made elsewhere -------------------------------------------------------------------------

def test_reads_a_file_written_as_olive_does(registry, tmp_path):
    """PEFT tensors, transposed, B times alpha / r, written straight through onnxruntime.AdapterFormat."""
    rng = np.random.default_rng(3)
    r, alpha = 8, 16
    peft = {}
    for i in range(2):
        for name, (out, inp) in (("q_proj", (32, 32)), ("v_proj", (16, 32))):
            key = f"model.layers.{i}.self_attn.{name}"
            peft[key] = (rng.standard_normal((r, inp)).astype(np.float32),
                         rng.standard_normal((out, r)).astype(np.float32))
    params = {}
    for key, (a, b) in peft.items():
        params[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
        params[f"{key}.lora_B.weight"] = np.ascontiguousarray((b * (alpha / r)).T)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(tmp_path / "olive.onnx_adapter"))
    assert adapterkit.detect_format(tmp_path / "olive.onnx_adapter", registry=registry) == "onnx-adapter"
    back = adapterkit.load(tmp_path / "olive.onnx_adapter", registry=registry)
    got = deltas(back, registry)
    for key, (a, b) in peft.items():
        np.testing.assert_allclose(got[key], (alpha / r) * b @ a, rtol=1e-6, atol=1e-5)


def test_unsupported_parameters_are_refused(registry, tmp_path):
    def write(params: dict[str, np.ndarray], name: str) -> Path:
        fmt = ort.AdapterFormat()
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        fmt.export_adapter(str(tmp_path / name))
        return tmp_path / name

    m = "model.layers.0.self_attn.q_proj"
    quant = write({f"{m}.lora_A.quant.weight": np.zeros((4, 4), np.uint8)}, "q.onnx_adapter")
    with pytest.raises(FormatError, match="not a LoRA factor") as info:
        adapterkit.load(quant, registry=registry)
    assert "quantised" in str(info.value)
    half = write({f"{m}.lora_A.weight": np.zeros((32, 4), np.float32)}, "half.onnx_adapter")
    with pytest.raises(FormatError, match="lora_B of the module is missing"):
        adapterkit.load(half, registry=registry)
    ranks = write({f"{m}.lora_A.weight": np.zeros((32, 4), np.float32),
                   f"{m}.lora_B.weight": np.zeros((2, 32), np.float32)}, "ranks.onnx_adapter")
    with pytest.raises(FormatError, match="disagree on the rank"):
        adapterkit.load(ranks, registry=registry)
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not a flatbuffer")
    with pytest.raises(FormatError, match="ONNX Runtime adapter file"):
        adapterkit.load(tmp_path / "junk.onnx_adapter", registry=registry)


# ---- detection, options, refusals -------------------------------------------------------------------

def test_detection(registry, tmp_path):
    fmt = registry.format("onnx-adapter")
    adapterkit.save(lora_adapter(llama_targets()), tmp_path / "one", "onnx-adapter", registry=registry)
    assert fmt.detect(tmp_path / "one") and fmt.detect(tmp_path / "one" / FILE)
    adapterkit.save(lora_adapter(llama_targets()), tmp_path / "native", registry=registry)
    assert not fmt.detect(tmp_path / "native")
    assert adapterkit.detect_format(tmp_path / "native", registry=registry) == "adapterkit"
    (tmp_path / "native.txt").write_text("x")
    assert not fmt.detect(tmp_path / "native.txt") and not fmt.detect(tmp_path / "missing")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a", "b"):
        (two / f"{name}.onnx_adapter").write_bytes((tmp_path / "one" / FILE).read_bytes())
    with pytest.raises(FormatError, match="several") as info:
        adapterkit.load(two, "onnx-adapter", registry=registry)
    assert info.value.code == "ambiguous_format"
    assert adapterkit.load(two / "a.onnx_adapter", registry=registry).method == "lora"


def test_methods_without_low_rank_factors_are_refused(registry, tmp_path):
    import torch  # noqa: F401 - DoRA's torch side is not needed, but its tensors come from an injected model

    from adapterkit.testing import perturb, tiny_llama

    model = tiny_llama()
    handle = adapterkit.inject(model, "dora", {"r": 2, "target_modules": ["q_proj"]})
    perturb(handle.parameters())
    with pytest.raises(LossyConversionError) as info:
        adapterkit.save(handle.to_adapter(), tmp_path / "out", "onnx-adapter", registry=registry)
    assert info.value.code == "unsupported_method" and "dora" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_options(registry, tmp_path):
    adapter = lora_adapter(llama_targets())
    with pytest.raises(UsageError, match="unknown option"):
        adapterkit.save(adapter, tmp_path / "a", "onnx-adapter", registry=registry, alpha=3)
    with pytest.raises(UsageError, match="dtype"):
        adapterkit.save(adapter, tmp_path / "b", "onnx-adapter", registry=registry, dtype="bfloat16")
    with pytest.raises(UsageError, match="adapter_version"):
        adapterkit.save(adapter, tmp_path / "c", "onnx-adapter", registry=registry, adapter_version=-1)


# ---- the file in ONNX Runtime ----------------------------------------------------------------------

def test_a_converted_file_drives_a_swappable_export(registry, tiny_base_dirs, tmp_path):
    """PEFT-free round trip through ONNX Runtime: adapterkit -> onnx-adapter file -> LoraAdapter in a
    session of a swappable export made from another adapter -> the torch logits."""
    import torch

    from adapterkit.core.export.onnx import export_onnx
    from adapterkit.testing import perturb, sample_inputs, tiny_llama

    def trained(seed: int, **config: Any) -> adapterkit.Adapter:
        model = tiny_llama()
        handle = adapterkit.inject(model, "lora", config)
        perturb(handle.parameters(), seed=seed)
        return handle.to_adapter()

    family = trained(1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    other = trained(2, r=3, alpha=5, target_modules=["v_proj"])
    out = export_onnx(family, tiny_base_dirs["llama"], tmp_path / "export", mode="swappable", verify=False)
    adapterkit.save(other, tmp_path / "other", "onnx-adapter", registry=registry)
    lora = ort.LoraAdapter()
    lora.Load(str(tmp_path / "other" / FILE))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    sess = ort.InferenceSession(str(out / "model.onnx"), session_options, providers=["CPUExecutionProvider"])
    inputs = sample_inputs(seed=4, batch=2, length=10)
    found = sess.run(None, {k: v.numpy() for k, v in inputs.items()}, options)[0]
    model = tiny_llama()
    adapterkit.apply(adapterkit.load(tmp_path / "other", registry=registry), model)
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    assert float(np.abs(found - expected).max()) <= 1e-4
    assert math.isfinite(float(found.sum()))
