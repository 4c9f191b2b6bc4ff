"""The open ``peft`` format: dispatch on ``peft_type`` to the method plugins' codecs, the refusals that name what
would work, a throwaway third-party codec round-tripping, and the helpers of the codec context (public API).

Torch-free except the ``adapter_model.bin`` cases (``adapterkit.read_torch_tensors``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterkit
from adapterkit.plugins.peft import PeftFormat, PeftReadContext, PeftWriteContext
from gated_lora import NAME, Plugin as GatedPlugin
from helpers import make_lora_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FMT = PeftFormat()


# ---- a throwaway codec, written against the public API only -------------------------------

class GatedCodec(adapterkit.Codec):
    """A made-up peft_type for the test method gated_lora (tests/gated_lora.py): lora_A / lora_B and a gate."""

    format = "peft"
    key = "GATED_LORA"
    methods = (NAME,)
    description = "test: gated LoRA in a PEFT folder"
    LEAVES = {"A": "lora_A.weight", "B": "lora_B.weight", "g": "lora_gate"}

    def read(self, context: Any) -> adapterkit.Adapter:
        raw = context.tensors
        adapterkit.check_tensor_dims(raw, context.tensors_file)
        found: dict[str, dict[str, np.ndarray]] = {}
        for key, array in raw.items():
            param, module = next(((p, context.module_of(key, leaf)) for p, leaf in self.LEAVES.items()
                                  if context.module_of(key, leaf)), (None, None))
            if module is None:
                raise adapterkit.FormatError("unknown tensor key", file=context.tensors_file, location=key,
                                             code="unknown_key")
            found.setdefault(module, {})[param] = array
        conv1d = bool(context.config.get("fan_in_fan_out"))
        targets, tensors = {}, {}
        for module, params in sorted(found.items()):
            fan_in, fan_out = params["A"].shape[1], params["B"].shape[0]
            targets[module] = {"kind": "conv1d" if conv1d else "linear",
                               "shape": [fan_in, fan_out] if conv1d else [fan_out, fan_in]}
            tensors.update({f"{module}.{NAME}.{p}": a for p, a in params.items()})
        config = {"r": context.config["r"], "alpha": context.config["lora_alpha"],
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
        return context.adapter(NAME, config, targets, tensors, "float32")

    def refusal(self, adapter: adapterkit.Adapter) -> str | None:
        kinds = {t["kind"] for t in adapter.targets.values()}
        return None if len(kinds) == 1 else "one fan_in_fan_out flag cannot hold linear and conv1d targets"

    def write(self, adapter: adapterkit.Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = adapter.config
        tensors = {context.key(m, leaf): adapter.tensors[f"{m}.{NAME}.{p}"]
                   for m in adapter.targets for p, leaf in self.LEAVES.items()}
        fields = {**context.selection(adapter.targets, wanted=config.get("target_modules")),
                  "r": config.get("r", 4), "lora_alpha": config.get("alpha", 4.0),
                  "fan_in_fan_out": next(iter(adapter.targets.values()))["kind"] == "conv1d"}
        context.metadata["test.codec"] = self.key
        return fields, tensors


class GatedCodecPlugin(GatedPlugin):
    @adapterkit.hookimpl
    def adapterkit_register_codecs(self, register: Any) -> None:
        register(GatedCodec())


@pytest.fixture(scope="module")
def registry() -> adapterkit.Registry:
    return adapterkit.Registry(*adapterkit.get_plugin_manager(plugins=[("gated-lora", GatedCodecPlugin())]))


def gated_adapter(seed: int = 0) -> adapterkit.Adapter:
    rng = np.random.default_rng(seed)
    targets = {f"model.layers.{i}.self_attn.{p}": {"kind": "linear", "shape": [32, 32]} for i in (0, 1)
               for p in ("q_proj", "v_proj")}
    tensors = {}
    for module in targets:
        tensors[f"{module}.{NAME}.A"] = rng.normal(size=(4, 32)).astype(np.float32)
        tensors[f"{module}.{NAME}.B"] = rng.normal(size=(32, 4)).astype(np.float32)
        tensors[f"{module}.{NAME}.g"] = rng.normal(size=(4,)).astype(np.float32)
    manifest = adapterkit.Manifest(method=NAME, config={"r": 4, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
                                   targets=targets, dtype="float32", task="causal-lm",
                                   base_model={"name": "org/base", "fingerprint": adapterkit.targets_fingerprint(targets)})
    return adapterkit.Adapter(manifest, tensors)


def test_a_third_party_codec_round_trips_through_the_peft_format(registry, tmp_path):
    adapter = gated_adapter()
    folder = adapterkit.save(adapter, tmp_path / "peft", format="peft", registry=registry)
    config = json.loads((folder / CONFIG).read_text())
    assert config["peft_type"] == "GATED_LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/base" and config["inference_mode"] is True
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
    assert adapterkit.read_safetensors(folder / WEIGHTS)[1] == {"format": "pt", "test.codec": "GATED_LORA"}
    assert adapterkit.detect_format(folder, registry) == "peft"

    back = adapterkit.load(folder, registry=registry)
    assert back.method == NAME and back.targets == adapter.targets and back.manifest.task == "causal-lm"
    assert back.manifest.base_model == adapter.manifest.base_model
    assert back.manifest.provenance["converted_from"] == {"format": "peft", "config": config}
    assert sorted(back.tensors) == sorted(adapter.tensors)
    assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())
    assert adapterkit.validate(folder, registry=registry).valid

    # written again from what was read: the same bytes (the original config is the starting point)
    again = adapterkit.save(back, tmp_path / "again", format="peft", registry=registry)
    for name in (CONFIG, WEIGHTS):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_the_original_config_is_kept_only_for_the_same_peft_type(registry, tmp_path):
    adapter = gated_adapter()
    folder = adapterkit.save(adapter, tmp_path / "peft", format="peft", registry=registry)
    back = adapterkit.load(folder, registry=registry)
    back.manifest.provenance["converted_from"]["config"]["custom_field"] = "kept"
    kept = json.loads((adapterkit.save(back, tmp_path / "kept", format="peft", registry=registry) / CONFIG).read_text())
    assert kept["custom_field"] == "kept"
    back.manifest.provenance["converted_from"]["config"]["peft_type"] = "LORA"  # another layout's config
    fresh = json.loads((adapterkit.save(back, tmp_path / "fresh", format="peft", registry=registry) / CONFIG).read_text())
    assert "custom_field" not in fresh and fresh["peft_type"] == "GATED_LORA"


def test_a_codec_refusal_stops_the_write_before_any_file(registry, tmp_path):
    adapter = gated_adapter()
    module = next(iter(adapter.targets))
    adapter.targets[module] = {"kind": "conv1d", "shape": [32, 32]}
    with pytest.raises(adapterkit.LossyConversionError, match="GATED_LORA layout cannot hold this 'gated_lora' adapter: "
                                                                "one fan_in_fan_out flag") as info:
        adapterkit.save(adapter, tmp_path / "out", format="peft", registry=registry)
    assert info.value.code == "unsupported"
    assert not (tmp_path / "out").exists()


def test_an_unknown_peft_type_is_detected_and_refused_naming_the_installed_ones(tmp_path):
    folder = adapterkit.save(make_lora_adapter(), tmp_path / "peft", format="peft")
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "peft_type": "FOURIERFT"}))
    assert FMT.detect(folder) and adapterkit.detect_format(folder) == "peft"
    with pytest.raises(adapterkit.FormatError) as info:
        adapterkit.load(folder)
    error = info.value
    assert error.message == "no installed plugin reads PEFT FOURIERFT adapters" and error.location == "$.peft_type"
    assert error.file == str(folder / CONFIG) and error.found == "FOURIERFT" and error.code == "unsupported"
    assert {"LORA", "PROMPT_TUNING", "PREFIX_TUNING"} <= set(error.expected)
    assert "adapterkit_register_codecs" in error.hint and "adapterkit plugins" in error.hint
    report = adapterkit.validate(folder)
    assert not report.valid and "no installed plugin reads PEFT FOURIERFT" in str(report.errors[0])


@pytest.mark.parametrize("peft_type,valid", [(None, False), (7, False), ("", False), ("LORA", True)])
def test_detection_needs_a_peft_type_or_the_old_lora_fields(tmp_path, peft_type, valid):
    folder = adapterkit.save(make_lora_adapter(), tmp_path / "peft", format="peft")
    config = json.loads((folder / CONFIG).read_text())
    config["peft_type"] = peft_type
    if peft_type is None:
        del config["peft_type"], config["r"]  # neither a peft_type nor LoRA's fields
    (folder / CONFIG).write_text(json.dumps(config))
    assert FMT.detect(folder) is valid
    if not valid:
        with pytest.raises(adapterkit.FormatError, match=r"\$\.peft_type"):
            FMT.read(folder)


def test_a_method_without_a_codec_is_refused_naming_what_the_codecs_write(tmp_path):
    adapter = make_lora_adapter()
    adapter.manifest.method = "bottleneck"
    with pytest.raises(adapterkit.LossyConversionError) as info:
        adapterkit.save(adapter, tmp_path / "out", format="peft")
    error = info.value
    assert error.message == "no installed plugin writes 'bottleneck' adapters in PEFT's format"
    assert {"lora", "dora", "qlora", "prompt", "prefix"} <= set(error.expected) and error.found == "bottleneck"
    assert "adapterkit format" in error.hint and "adapterkit_register_codecs" in error.hint
    assert not (tmp_path / "out").exists()


def test_the_format_leaves_empty_tensors_to_the_codec(registry, tmp_path):
    """PEFT saves AdaLoRA modules pruned to rank 0 as zero-sized tensors: the format hands them over; the codec
    decides (here, like the LoRA codec, it refuses them with check_tensor_dims)."""
    folder = adapterkit.save(gated_adapter(), tmp_path / "peft", format="peft", registry=registry)
    tensors, metadata = adapterkit.read_safetensors(folder / WEIGHTS)
    key = sorted(tensors)[0]
    tensors[key] = np.zeros((0, 32), np.float32)
    adapterkit.write_safetensors(folder / WEIGHTS, tensors, metadata)
    context = PeftReadContext(folder=folder, peft_type="GATED_LORA", registry=registry,
                              config=json.loads((folder / CONFIG).read_text()), config_file=str(folder / CONFIG),
                              tensors_file=str(folder / WEIGHTS))
    assert context.tensors[key].shape == (0, 32)
    with pytest.raises(adapterkit.TensorFileError, match="empty dimension") as info:
        adapterkit.load(folder, registry=registry)
    assert info.value.location == key


# ---- the context ----------------------------------------------------------------------------

def write_context(registry: adapterkit.Registry, original: dict | None = None, base: Any = None) -> PeftWriteContext:
    return PeftWriteContext(folder=Path("out"), peft_type="LORA", registry=registry, base=base,
                            original=original or {})


def test_context_keys_patterns_and_rules(registry):
    ctx = write_context(registry)
    assert ctx.KEY_PREFIX == "base_model.model."
    assert ctx.key("model.layers.0.q_proj", "lora_A.weight") == "base_model.model.model.layers.0.q_proj.lora_A.weight"
    assert ctx.module_of("base_model.model.model.layers.0.q_proj.lora_A.weight", "lora_A.weight") == "model.layers.0.q_proj"
    assert ctx.module_of("base_model.model.model.layers.0.q_proj.lora_A.weight", "lora_B.weight") is None
    assert ctx.module_of("model.layers.0.q_proj.lora_A.weight", "lora_A.weight") is None  # no PEFT prefix
    assert ctx.module_of("base_model.model.lora_A.weight", "lora_A.weight") is None  # no module
    assert ctx.pattern_value("model.layers.0.self_attn.v_proj", {"v_proj": 2, "proj": 3}, 8) == 2
    assert ctx.pattern_value("model.layers.11.self_attn.q_proj", {"layers.1.self_attn.q_proj": 2}, 8) == 8
    assert ctx.pattern_value("x.q_proj", None, 8) == 8
    config = {"target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert ctx.selects(config, "model.layers.1.self_attn.q_proj")
    assert not ctx.selects(config, "model.layers.0.self_attn.q_proj")
    assert not ctx.selects({**config, "exclude_modules": ["self_attn.q_proj"]}, "model.layers.1.self_attn.q_proj")
    assert ctx.layer_index("model.layers.3.mlp.up_proj") == 3
    assert ctx.layer_index("encoder.block.2.layer.0.x", "block") == 2
    assert ctx.task("CAUSAL_LM") == "causal-lm" and ctx.task("NOPE") is None and ctx.task(None) is None


def test_context_selection(registry, tiny_base_dirs):
    modules = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    ctx = write_context(registry)
    assert ctx.selection(modules, wanted=["q_proj", "v_proj"]) == {
        "target_modules": ["q_proj", "v_proj"], "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None}
    assert ctx.selection(modules) == {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": None,
                                      "layers_pattern": None, "exclude_modules": None}  # complete blocks: last names
    assert ctx.selection(modules, layered=False) == {"target_modules": ["q_proj", "v_proj"], "exclude_modules": None}
    with pytest.raises(ValueError):
        ctx.selection(modules, layers=[0], layered=False)
    partial = modules[:3]  # layer 1's v_proj is not adapted: names would select it, an exact regex does not
    chosen = ctx.selection(partial)
    assert isinstance(chosen["target_modules"], str)
    assert {m for m in modules if ctx.selects(chosen, m)} == set(partial)
    # the original's selection when it is still exact; with a base, checked against every module of the base
    original = {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": None, "peft_type": "LORA"}
    assert write_context(registry, original).selection(modules)["target_modules"] == ["q_proj", "v_proj"]
    first = [m for m in modules if ".0." in m]  # layer 0 only: without the base, names look complete
    assert ctx.selection(first)["target_modules"] == ["q_proj", "v_proj"]
    with_base = write_context(registry, base=tiny_base_dirs["llama"]).selection(first)
    assert isinstance(with_base["target_modules"], str)  # the base has a layer 1: names would select it too
    assert {m for m in modules if ctx.selects(with_base, m)} == set(first)


def test_context_patterns(registry):
    ctx = write_context(registry)
    values = {"a.q": 4, "a.k": 4, "a.v": 8, "b.q": 2}
    default, pattern = ctx.patterns(values)
    assert default == 4 and pattern == {"a.v": 8, "b.q": 2}
    assert all(ctx.pattern_value(m, pattern, default) == v for m, v in values.items())
    assert ctx.patterns({"x": 2, "y": 6}) == (2, {"y": 6})  # a tie: the smaller value is the default
    assert ctx.patterns(values, keep=(4, {"v": 8, "b.q": 2})) == (4, {"v": 8, "b.q": 2})  # still resolves: kept
    assert ctx.patterns(values, keep=(8, {})) == (4, {"a.v": 8, "b.q": 2})  # does not: recomputed
    # a full path that, unescaped, would also match another module is escaped
    tricky = {"h.0.mlp": 2, "h.0Xmlp": 4, "h.1.mlp": 4}
    default, pattern = ctx.patterns(tricky)
    assert all(ctx.pattern_value(m, dict(sorted(pattern.items())), default) == v for m, v in tricky.items())


def test_read_context_loads_lazily_and_fills_the_common_fields(registry, tmp_path):
    folder = adapterkit.save(gated_adapter(), tmp_path / "peft", format="peft", registry=registry)
    config = json.loads((folder / CONFIG).read_text())
    ctx = PeftReadContext(folder=folder, peft_type="GATED_LORA", registry=registry, config=config,
                          config_file=str(folder / CONFIG), tensors_file=str(folder / WEIGHTS))
    assert "_loaded" not in vars(ctx)  # nothing read yet
    assert ctx.metadata == {"format": "pt", "test.codec": "GATED_LORA"} and len(ctx.tensors) == 12
    targets = {"m.q": {"kind": "linear", "shape": [2, 3]}}
    adapter = ctx.adapter(NAME, {"r": 1}, targets, {"m.q.gated_lora.A": np.ones((1, 3), np.float32)}, "float32",
                          base_model={"model_type": "llama"}, warnings=["careful"])
    manifest = adapter.manifest
    assert manifest.base_model == {"model_type": "llama", "fingerprint": adapterkit.targets_fingerprint(targets),
                                   "name": "org/base"}
    assert manifest.task == "causal-lm" and adapter.warnings == ["careful"]
    assert manifest.provenance == {"converted_from": {"format": "peft", "config": config}}
    assert adapter.source == folder and adapter.source_format == "peft"


def test_a_bin_is_read_through_the_weights_only_loader(registry, tmp_path):
    import torch

    folder = adapterkit.save(gated_adapter(), tmp_path / "peft", format="peft", registry=registry)
    tensors = adapterkit.read_safetensors(folder / WEIGHTS)[0]
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    back = adapterkit.load(folder, registry=registry)
    assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in gated_adapter().tensors.items())
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "adapter_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(adapterkit.TensorFileError, match="not a torch.save file") as info:
        adapterkit.load(bad, registry=registry)
    assert "PeftModel.save_pretrained" in info.value.hint


def test_read_torch_tensors(tmp_path):
    import ml_dtypes
    import torch

    torch.save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
                "empty": torch.zeros(0, 4)}, tmp_path / "ok.bin")
    tensors = adapterkit.read_torch_tensors(tmp_path / "ok.bin")
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].dtype == ml_dtypes.bfloat16
    assert tensors["empty"].shape == (0, 4)  # returned as it is: check_tensor_dims is the caller's
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(adapterkit.TensorFileError, match="must hold a dict") as info:
        adapterkit.read_torch_tensors(tmp_path / "list.bin", hint="save it again with the tool")
    assert info.value.hint == "save it again with the tool" and info.value.code == "bad_pickle"
    (tmp_path / "text.bin").write_text("hello")
    with pytest.raises(adapterkit.TensorFileError, match="not a torch.save file"):
        adapterkit.read_torch_tensors(tmp_path / "text.bin")
