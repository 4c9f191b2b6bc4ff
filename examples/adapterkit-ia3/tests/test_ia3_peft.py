"""The plugin's PEFT IA3 codec (adapterkit's ``peft`` format, ``peft_type`` IA3) against the real PEFT: PEFT loads
what we write, we read what PEFT writes (1e-5), and our keys, shapes and config fields are PEFT's own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, sample_inputs

from ia3_helpers import CONFIGS

import torch
import peft
ATOL = 1e-5
PARITY: dict[str, dict[str, float]] = {}  # kind -> max abs logit difference (printed with -s)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="peft")
    yield
    torch.set_num_threads(threads)


def peft_written(kind: str, folder: Path, seed: int = 5) -> tuple[Path, object]:
    """An IA3 adapter made and saved by PEFT itself, with random non-trivial vectors; and the PEFT model."""
    config = peft.IA3Config(**CONFIGS[kind], task_type="CAUSAL_LM" if kind != "bert" else None)
    model = peft.get_peft_model(TINY_MODELS[kind](0), config).eval()
    perturb([p for n, p in model.named_parameters() if "ia3_l" in n], seed=seed, scale=0.5)
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_peft_loads_what_we_write(kind, tmp_path):
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, "ia3", CONFIGS[kind])
    perturb(handle.parameters(), seed=2, scale=0.5)
    inputs = sample_inputs()
    ours = outputs(model, inputs)
    folder = adapterkit.save(handle.to_adapter(), tmp_path / "ours", format="peft")
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS[kind](0), str(folder)).eval(), inputs)
    diff = (theirs - ours).abs().max().item()
    PARITY.setdefault(kind, {})["ours->peft"] = diff
    print(f"\n{kind}: ours -> PEFT max abs logit diff {diff:.3g}")
    assert diff <= ATOL
    base = outputs(TINY_MODELS[kind](0), inputs)
    change = ((ours - base).abs().max() / base.abs().max()).item()  # tiny BERT's head gives logits ~0.02
    assert change > 0.005, f"the vectors barely change the logits ({change:.3g} relative): the parity would prove little"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_we_read_what_peft_writes(kind, tmp_path):
    folder, peft_model = peft_written(kind, tmp_path / "peft")
    base = tmp_path / "base"
    TINY_MODELS[kind](0).save_pretrained(base)
    assert adapterkit.detect_format(folder) == "peft"
    report = adapterkit.validate(folder, base=base)
    assert report.valid and report.format == "peft", [str(e) for e in report.errors]
    adapter = adapterkit.load(folder, base=base)
    assert adapter.method == "ia3"
    inputs = sample_inputs()
    ours = outputs(adapterkit.apply(adapter, TINY_MODELS[kind](0)), inputs)
    diff = (ours - outputs(peft_model, inputs)).abs().max().item()
    PARITY.setdefault(kind, {})["peft->ours"] = diff
    print(f"\n{kind}: PEFT -> ours max abs logit diff {diff:.3g}")
    assert diff <= ATOL
    # the same reading from a live torch model as the base
    again = adapterkit.load(folder, base=TINY_MODELS[kind](0))
    assert again.targets == adapter.targets
    # and back: byte-identical tensors, the same keys and shapes PEFT wrote
    out = adapterkit.save(adapter, tmp_path / "back", format="peft")
    from safetensors.numpy import load_file  # the reference library reads both files

    theirs, ours_back = load_file(folder / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours_back)
    for key in theirs:
        assert theirs[key].shape == ours_back[key].shape and theirs[key].tobytes() == ours_back[key].tobytes(), key
    # the config too: PEFT's own fields come back (the original is kept where it still says the same)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layout_and_config_match_peft(kind, tmp_path):
    """Keys and shapes ([out, 1] output-scaled, [1, in] feed-forward) and the config PEFT's IA3Config reads."""
    folder, _ = peft_written(kind, tmp_path / "peft")
    model = TINY_MODELS[kind](0)
    handle = adapterkit.inject(model, "ia3", CONFIGS[kind])
    ours = adapterkit.save(handle.to_adapter(), tmp_path / "ours", format="peft")
    from safetensors.numpy import load_file

    theirs_t, ours_t = load_file(folder / "adapter_model.safetensors"), load_file(ours / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}
    assert all(np.all(v == 1) for v in ours_t.values()), "(IA)^3 starts at ones, like PEFT's init_ia3_weights"
    feedforward = [k for k, v in theirs_t.items() if v.shape[0] == 1]
    assert feedforward and all(ours_t[k].shape[0] == 1 for k in feedforward)
    config = json.loads((ours / "adapter_config.json").read_text())
    reference = json.loads((folder / "adapter_config.json").read_text())
    assert set(config) <= set(reference) | {"peft_version"}, set(config) - set(reference)
    for field in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules"):
        assert config[field] == reference[field], field
    loaded = peft.PeftConfig.from_pretrained(str(ours))
    assert isinstance(loaded, peft.IA3Config) and loaded.peft_type == peft.PeftType.IA3


def test_the_peft_format_reads_ia3_through_this_plugin_only(tmp_path):
    """The built-in peft format dispatches peft_type IA3 to this plugin's codec; without the plugin the folder is
    still a PEFT folder, refused with the peft types that are installed."""
    folder, _ = peft_written("llama", tmp_path / "peft")
    registry = adapterkit.default_registry()
    assert type(registry.codec("peft", "IA3")).__module__ == "adapterkit_ia3.peft_codec"
    assert registry.codec_for("peft", "ia3") is registry.codec("peft", "IA3")
    without = adapterkit.Registry(*adapterkit.get_plugin_manager(only={n for n in registry.plugins if n != "ia3"}))
    assert "ia3" not in without.methods and adapterkit.detect_format(folder, without) == "peft"
    with pytest.raises(adapterkit.FormatError, match="no installed plugin reads PEFT IA3 adapters") as info:
        adapterkit.load(folder, registry=without, base=tmp_path)
    assert info.value.location == "$.peft_type" and "LORA" in info.value.expected and "codec" in info.value.hint


def test_reading_needs_the_base_and_refuses_extra_weights(tmp_path):
    folder, _ = peft_written("llama", tmp_path / "peft")
    with pytest.raises(adapterkit.FormatError, match="base model is needed"):
        adapterkit.load(folder)
    # a sequence classifier: PEFT saves the head (modules_to_save) beside the vectors; we say it would be lost
    config = peft.IA3Config(**CONFIGS["bert"], task_type="SEQ_CLS")
    peft.get_peft_model(TINY_MODELS["bert"](0), config).save_pretrained(tmp_path / "cls")
    with pytest.raises(adapterkit.LossyConversionError, match="would be lost"):
        adapterkit.load(tmp_path / "cls", base=TINY_MODELS["bert"](0))


def test_a_config_field_of_another_peft_is_refused(tmp_path):
    import dataclasses

    from adapterkit_ia3.peft_codec import KNOWN_FIELDS

    common = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert set(KNOWN_FIELDS) == {f.name for f in dataclasses.fields(peft.IA3Config)} - common
    folder, _ = peft_written("llama", tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["ia3_scaling_of_a_later_peft"] = 2.0
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adapterkit.LossyConversionError, match="ia3_scaling_of_a_later_peft") as info:
        adapterkit.load(folder, base=TINY_MODELS["llama"](0))
    assert info.value.location == "$.ia3_scaling_of_a_later_peft" and info.value.code == "unsupported"


def test_what_peft_ia3_cannot_hold_is_refused_before_writing(tmp_path):
    model = TINY_MODELS["llama"](0)
    adapter = adapterkit.inject(model, "ia3", CONFIGS["llama"]).to_adapter()
    key = next(iter(adapter.tensors))
    adapter.tensors[key.replace(".ia3.l", ".ia3.extra")] = adapter.tensors.pop(key)
    with pytest.raises(adapterkit.LossyConversionError, match="IA3 layout cannot hold this 'ia3' adapter") as info:
        adapterkit.save(adapter, tmp_path / "x", format="peft")
    assert key in str(info.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_compose_linear_equals_peft_add_weighted_adapter(kind, tmp_path):
    """``adapterkit.compose(..., "linear")`` through the plugin's compose hook against PEFT's
    ``IA3Model.add_weighted_adapter`` on the same two PEFT-written adapters: the same vectors to the bit,
    the same logits. The second adapter adapts fewer modules (a module it lacks counts as zero in both)."""
    first, _ = peft_written(kind, tmp_path / "a", seed=5)
    subset = {"target_modules": CONFIGS[kind]["target_modules"][:1], "feedforward_modules": []}
    config = peft.IA3Config(**subset, task_type="CAUSAL_LM" if kind != "bert" else None)
    model = peft.get_peft_model(TINY_MODELS[kind](0), config).eval()
    perturb([p for n, p in model.named_parameters() if "ia3_l" in n], seed=6, scale=0.5)
    model.save_pretrained(tmp_path / "b")
    second = tmp_path / "b"
    base = tmp_path / "base"
    TINY_MODELS[kind](0).save_pretrained(base)
    weights = [0.7, -0.4]

    composed = adapterkit.compose([adapterkit.load(p, base=base) for p in (first, second)], "linear", weights)
    assert composed.method == "ia3" and composed.manifest.provenance["composition"]["weights"] == weights

    peft_model = peft.PeftModel.from_pretrained(TINY_MODELS[kind](0), str(first), adapter_name="a")
    peft_model.load_adapter(str(second), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "mix")
    peft_model.set_adapter("mix")
    peft_model.eval()
    theirs = {n.replace(".ia3_l.mix", ""): p.detach().numpy().reshape(-1)
              for n, p in peft_model.named_parameters() if n.endswith(".ia3_l.mix")}
    ours = {k.removesuffix(".ia3.l"): v for k, v in composed.tensors.items()}
    assert sorted(m.removeprefix("base_model.model.") for m in theirs) == sorted(ours)
    for module, vector in theirs.items():
        assert vector.tobytes() == ours[module.removeprefix("base_model.model.")].tobytes(), module
    inputs = sample_inputs()
    diff = (outputs(adapterkit.apply(composed, TINY_MODELS[kind](0)), inputs) - outputs(peft_model, inputs)).abs().max()
    assert diff.item() <= ATOL


def test_compose_refuses_options_it_does_not_take(tmp_path):
    first, _ = peft_written("llama", tmp_path / "a")
    base = tmp_path / "base"
    TINY_MODELS["llama"](0).save_pretrained(base)
    adapter = adapterkit.load(first, base=base)
    with pytest.raises(adapterkit.UsageError, match="takes only weights"):
        adapterkit.compose([adapter, adapter], "linear", density=0.5)
    with pytest.raises(adapterkit.UsageError, match="no compose strategy 'ties'") as info:
        adapterkit.compose([adapter, adapter], "ties", density=0.5)
    assert info.value.expected == ["linear"]
