"""The kohya LOKR codec against LyCORIS itself (lycoris-lora 4.1.3): its kohya network on the tiny llama as a
text encoder, saved by its own ``save_weights``, read by adapterkit, and adapterkit's files loaded by its own
``create_network_from_weights``, for each LoKr layout (full w1 + low-rank w2, both low-rank, both full).

LyCORIS 4.1.3's ``LokrModule.get_diff_weight`` (and so ``get_merged_weight`` / ``merge_to``) multiplies
``get_weight`` (already scaled) by the scale again, while its forward adds ``get_weight`` once: the two agree
only when the scale is 1. adapterkit follows the forward (as PEFT and ComfyUI do); the tests pin both facts.
A module whose two halves are full matrices has scale 1 in LyCORIS whatever its alpha.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, LycorisJudge, delta_weights, outputs, perturb, sample_inputs

import torch

ATOL = 1e-5
#: LyCORIS network settings: (r, alpha, kwargs) -> the layout of q_proj [32, 32] = (4 x 8) x (4 x 8)
LAYOUTS: dict[str, tuple[int, float, dict[str, Any]]] = {
    "w1-full-w2-low-rank": (2, 3.0, {}),
    "both-low-rank": (1, 2.0, {"decompose_both": True}),
    "both-full": (2, 3.0, {"full_matrix": True}),
    "factor-4": (2, 5.0, {"factor": 4}),
}


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    with LycorisJudge(tmp_path_factory.mktemp("lokrkohya")) as judge:  # make install installs lycoris-lora
        yield judge


def lycoris_network(judge, layout: str, seed: int = 0):
    r, alpha, kwargs = LAYOUTS[layout]
    model, net = judge.network("lokr", r, alpha, seed=seed, **kwargs)
    assert len(net.text_encoder_loras) == 14
    return model, net


def compare(adapter, loras) -> float:
    ours = delta_weights(adapter)
    worst = 0.0
    for lora in loras:
        with torch.no_grad():
            weight = lora.get_weight(lora.shape).numpy()
        worst = max(worst, float(np.abs(ours[LycorisJudge.module_of(lora.lora_name)] - weight).max()))
    return worst


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lycoris_file_gives_lycoris_deltas_and_logits(judge, layout):
    root, base = judge.root, judge.base
    model, net = lycoris_network(judge, layout)
    file = root / f"lyco_{layout}.safetensors"
    net.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
    adapter = adapterkit.load(file, base=base)
    assert adapter.method == "lokr" and len(adapter.targets) == 14 and not adapter.warnings
    q = adapter.targets["model.layers.0.self_attn.q_proj"]
    expected = {"w1-full-w2-low-rank": (True, False), "both-low-rank": (False, False), "both-full": (True, True),
                "factor-4": (True, False)}[layout]
    assert (q["w1_full"], q["w2_full"]) == expected
    if layout == "both-full":  # LyCORIS: scale 1, alpha saved as its lora_dim
        assert all(t["alpha"] == t["r"] == 2 for t in adapter.targets.values())
    ours = delta_weights(adapter)
    worst = 0.0
    for lora in net.text_encoder_loras:
        module = LycorisJudge.module_of(lora.lora_name)
        with torch.no_grad():
            weight = lora.get_weight(lora.shape).numpy()
            diff = lora.get_diff_weight()[0].numpy()
            merged = (lora.get_merged_weight()[0] - lora.org_weight).numpy()
        worst = max(worst, float(np.abs(ours[module] - weight).max()), float(np.abs(ours[module] - LycorisJudge.forward_delta(lora)).max()))
        # LyCORIS 4.1.3 scales get_diff_weight / get_merged_weight twice (equal when the scale is 1)
        np.testing.assert_allclose(diff, ours[module] * lora.scale, atol=ATOL * 10, rtol=1e-5)
        np.testing.assert_allclose(merged, diff, atol=ATOL * 10, rtol=1e-5)
    assert worst <= ATOL, worst
    inputs = sample_inputs()
    got = outputs(adapterkit.apply(adapter, TINY_MODELS["llama"](0)), inputs)
    assert (got - outputs(model, inputs)).abs().max().item() <= ATOL


@pytest.mark.parametrize("config", [
    {"r": 2, "alpha": 3},  # w1 full, w2 low-rank
    {"r": 1, "alpha": 2, "decompose_both": True},  # both low-rank
    {"r": 4, "alpha": 8},  # both full (r >= max(b, d) / 2): PEFT's alpha / r = 2 is carried in lokr_w1
], ids=["w1-full", "both-low-rank", "both-full-scale-2"])
def test_adapterkit_file_loads_in_lycoris(judge, config):
    root, base = judge.root, judge.base
    model = TINY_MODELS["llama"](0)
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    handle = adapterkit.inject(model, "lokr", {**config, "target_modules": targets})
    perturb(handle.parameters(), seed=3, scale=0.3)
    adapter = handle.to_adapter()
    folder = adapterkit.save(adapter, root / f"ours{config['r']}", format="kohya")
    file = folder / "lora.safetensors"
    tensors, metadata = adapterkit.read_safetensors(file)
    assert metadata["ss_network_module"] == "lycoris.kohya" and '"lokr"' in metadata["ss_network_args"]
    inputs = sample_inputs()
    ours_logits = outputs(model, inputs)

    lyco_model, net = judge.loaded(file)
    assert len(net.text_encoder_loras) == len(adapter.targets) == 10
    assert compare(adapter, net.text_encoder_loras) <= ATOL
    assert (outputs(lyco_model, inputs) - ours_logits).abs().max().item() <= ATOL

    back = adapterkit.load(file, base=base)
    if config["r"] == 4:  # the scale moved into w1: the same update, alpha = r
        assert all(t["alpha"] == t["r"] == 4 for t in back.targets.values())
        ours, again = delta_weights(adapter), delta_weights(back)
        assert max(float(np.abs(ours[m] - again[m]).max()) for m in ours) <= ATOL
    else:  # adapterkit -> kohya -> adapterkit: exact
        assert back.targets == adapter.targets
        assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())


@pytest.mark.parametrize("layout", ["both-low-rank", "both-full"])
def test_lycoris_round_trips_are_exact(judge, layout):
    root, base = judge.root, judge.base
    _, net = lycoris_network(judge, layout, seed=5)
    file = root / f"half_{layout}.safetensors"
    net.save_weights(str(file), torch.float16, {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
    original, meta = adapterkit.read_safetensors(file)
    adapter = adapterkit.load(file, base=base)
    assert adapter.manifest.dtype == "float16"
    again = adapterkit.save(adapter, root / f"again_{layout}", format="kohya") / file.name
    back, back_meta = adapterkit.read_safetensors(again)
    assert sorted(back) == sorted(original) and back_meta == meta
    assert all(back[k].dtype == original[k].dtype and back[k].tobytes() == original[k].tobytes() for k in original)
    native = adapterkit.save(adapter, root / f"native_{layout}")
    out = adapterkit.save(adapterkit.load(native), root / f"out_{layout}", format="kohya")
    final = adapterkit.load(out, base=base)
    assert final.targets == adapter.targets
    assert all(final.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())


def test_tucker_dora_and_bad_files_are_refused_in_one_line(judge):
    root = judge.root
    from lycoris.modules.lokr import LokrModule

    conv = LokrModule("lora_unet_conv_in", torch.nn.Conv2d(16, 16, 3), 1.0, lora_dim=1, alpha=1, use_tucker=True)
    tucker = {f"lora_unet_conv_in.{k}": v.detach().numpy() for k, v in conv.state_dict().items()}
    assert "lora_unet_conv_in.lokr_t2" in tucker
    file = root / "tucker.safetensors"
    adapterkit.write_safetensors(file, tucker)
    with pytest.raises(adapterkit.LossyConversionError, match="Tucker") as info:
        adapterkit.load(file)
    assert "\n" not in str(info.value)
    result = subprocess.run([sys.executable, "-m", "adapterkit", "inspect", str(file)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines() + result.stdout.strip().splitlines()) == 1
    assert "Tucker" in result.stderr + result.stdout

    _, net = lycoris_network(judge, "w1-full-w2-low-rank")
    plain = root / "plain.safetensors"
    net.save_weights(str(plain), torch.float32, None)
    tensors, _ = adapterkit.read_safetensors(plain)
    name = "lora_te_layers_0_self_attn_q_proj"
    cases = (
        ({f"{name}.dora_scale": np.ones((32, 1), np.float32)}, "DoRA"),
        ({f"{name}.lokr_w2": np.ones((8, 8), np.float32)}, "both lokr_w2 and lokr_w2_a"),
        ({f"{name}.lokr_w2_b": np.ones((3, 8), np.float32)}, "disagree on the rank"),
        ({"lora_te_layers_0_self_attn_k_proj.hada_w1_a": np.ones((32, 2), np.float32)}, "mixes"),
    )
    for extra, match in cases:
        bad = root / "bad.safetensors"
        adapterkit.write_safetensors(bad, {**tensors, **extra})
        with pytest.raises(adapterkit.AdapterkitError, match=match) as info:
            adapterkit.load(bad)
        assert "\n" not in str(info.value)
    del tensors[f"{name}.lokr_w1"]
    adapterkit.write_safetensors(root / "half.safetensors", tensors)
    with pytest.raises(adapterkit.TensorFileError, match="lacks a half"):
        adapterkit.load(root / "half.safetensors")


def test_without_the_plugin_the_error_names_it(judge):
    root = judge.root
    _, net = lycoris_network(judge, "both-full")
    file = root / "noplugin.safetensors"
    net.save_weights(str(file), torch.float32, None)
    bare = adapterkit.Registry(*adapterkit.get_plugin_manager(only={"kohya", "lora"}))
    with pytest.raises(adapterkit.FormatError, match="no installed plugin reads kohya LoKr") as info:
        adapterkit.load(file, registry=bare)
    assert "adapterkit-lokr" in info.value.hint and "\n" not in str(info.value)


def test_conv1d_targets_are_refused_for_kohya(judge):
    root = judge.root
    handle = adapterkit.inject(TINY_MODELS["gpt2"](0), "lokr", {"r": 2, "target_modules": ["c_attn"]})
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D"):
        adapterkit.save(handle.to_adapter(), root / "gpt2", format="kohya")
    assert not (root / "gpt2").exists()
