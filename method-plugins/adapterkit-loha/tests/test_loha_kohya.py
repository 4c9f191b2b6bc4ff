"""The kohya LOHA codec against LyCORIS itself (lycoris-lora 4.1.3): its kohya network on the tiny llama as a
text encoder, saved by its own ``save_weights``, read by adapterkit, and adapterkit's files loaded by its own
``create_network_from_weights``.

LyCORIS 4.1.3's ``LohaModule.get_diff_weight`` (and so ``get_merged_weight`` / ``merge_to``) multiplies
``get_weight`` (already scaled by ``alpha / r``) by the scale again, while its forward adds ``get_weight``
once: the two agree only when ``alpha == r``. adapterkit follows the forward (as PEFT and ComfyUI do);
the tests pin both facts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import adapterkit
from adapterkit.testing import TINY_MODELS, LycorisJudge, delta_weights, outputs, perturb, sample_inputs

import torch

ATOL = 1e-5


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    with LycorisJudge(tmp_path_factory.mktemp("lohakohya")) as judge:  # make install installs lycoris-lora
        yield judge


def lycoris_network(judge, r: int, alpha: float, seed: int = 0, **kwargs):
    model, net = judge.network("loha", r, alpha, seed=seed, **kwargs)
    assert len(net.text_encoder_loras) == 14
    return model, net


@pytest.mark.parametrize("r,alpha,rs_lora", [(2, 3.0, False), (4, 4.0, False), (4, 3.0, True)])
def test_lycoris_file_gives_lycoris_deltas_and_logits(judge, r, alpha, rs_lora):
    root, base = judge.root, judge.base
    model, net = lycoris_network(judge, r, alpha, rs_lora=rs_lora)  # rs_lora: LyCORIS saves alpha * sqrt(r)
    file = root / f"lyco_{r}_{rs_lora}.safetensors"
    net.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
    adapter = adapterkit.load(file, base=base)
    assert adapter.method == "loha" and len(adapter.targets) == 14 and not adapter.warnings
    ours = delta_weights(adapter)
    worst = 0.0
    for lora in net.text_encoder_loras:
        module = judge.module_of(lora.lora_name)
        with torch.no_grad():
            weight = lora.get_weight(lora.shape).numpy()
            diff = lora.get_diff_weight()[0].numpy()
            merged = (lora.get_merged_weight()[0] - lora.org_weight).numpy()
        worst = max(worst, float(np.abs(ours[module] - weight).max()), float(np.abs(ours[module] - judge.forward_delta(lora)).max()))
        # LyCORIS 4.1.3 scales get_diff_weight / get_merged_weight twice (scale == 1 when alpha == r)
        np.testing.assert_allclose(diff, ours[module] * lora.scale, atol=ATOL * 10, rtol=1e-5)
        np.testing.assert_allclose(merged, diff, atol=ATOL * 10, rtol=1e-5)
    assert worst <= ATOL, worst
    inputs = sample_inputs()
    theirs = outputs(model, inputs)
    got = outputs(adapterkit.apply(adapter, TINY_MODELS["llama"](0)), inputs)
    assert (got - theirs).abs().max().item() <= ATOL
    # without base: the naming heuristic resolves the same modules
    plain = adapterkit.load(file)
    assert plain.targets == adapter.targets and plain.warnings


def test_adapterkit_file_loads_in_lycoris(judge):
    root = judge.root
    model = TINY_MODELS["llama"](0)
    config = {"r": 3, "alpha": 5, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
              "rank_pattern": {"down_proj": 2}}
    handle = adapterkit.inject(model, "loha", config)
    perturb(handle.parameters(), seed=3, scale=0.3)
    adapter = handle.to_adapter()
    folder = adapterkit.save(adapter, root / "ours", format="kohya")
    file = folder / "lora.safetensors"
    tensors, metadata = adapterkit.read_safetensors(file)
    assert "lora_te_layers_0_mlp_down_proj.hada_w1_a" in tensors and metadata["ss_network_module"] == "lycoris.kohya"
    inputs = sample_inputs()
    ours_logits = outputs(model, inputs)

    lyco_model, net = judge.loaded(file)
    assert len(net.text_encoder_loras) == len(adapter.targets) == 10
    ours = delta_weights(adapter)
    worst = 0.0
    for lora in net.text_encoder_loras:
        with torch.no_grad():
            weight = lora.get_weight(lora.shape).numpy()
        worst = max(worst, float(np.abs(ours[judge.module_of(lora.lora_name)] - weight).max()))
    assert worst <= ATOL, worst
    assert (outputs(lyco_model, inputs) - ours_logits).abs().max().item() <= ATOL


def test_round_trips_are_exact(judge):
    root, base = judge.root, judge.base
    _, net = lycoris_network(judge, 2, 3.0, seed=5)
    file = root / "half.safetensors"
    net.save_weights(str(file), torch.float16, {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'})
    original, meta = adapterkit.read_safetensors(file)
    adapter = adapterkit.load(file, base=base)
    assert adapter.manifest.dtype == "float16"
    # kohya -> kohya: the same tensors bit for bit, the metadata (hash included) kept
    again = adapterkit.save(adapter, root / "again", format="kohya") / "half.safetensors"
    back, back_meta = adapterkit.read_safetensors(again)
    assert sorted(back) == sorted(original) and back_meta == meta
    assert all(back[k].dtype == original[k].dtype and back[k].tobytes() == original[k].tobytes() for k in original)
    # kohya -> adapterkit -> kohya -> adapterkit
    native = adapterkit.save(adapter, root / "native")
    out = adapterkit.save(adapterkit.load(native), root / "out", format="kohya")
    final = adapterkit.load(out, base=base)
    assert final.targets == adapter.targets
    assert all(final.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())


def test_tucker_dora_and_mixed_files_are_refused_in_one_line(judge):
    root = judge.root
    from lycoris.modules.loha import LohaModule

    conv = LohaModule("lora_unet_conv_in", torch.nn.Conv2d(4, 8, 3), 1.0, lora_dim=2, alpha=1, use_tucker=True)
    tucker = {f"lora_unet_conv_in.{k}": v.detach().numpy() for k, v in conv.state_dict().items()}
    assert "lora_unet_conv_in.hada_t1" in tucker
    file = root / "tucker.safetensors"
    adapterkit.write_safetensors(file, tucker)
    with pytest.raises(adapterkit.LossyConversionError, match="Tucker") as info:
        adapterkit.load(file)
    assert "\n" not in str(info.value)
    result = subprocess.run([sys.executable, "-m", "adapterkit", "inspect", str(file)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines() + result.stdout.strip().splitlines()) == 1
    assert "Tucker" in result.stderr + result.stdout

    _, net = lycoris_network(judge, 2, 3.0)
    plain = root / "plain.safetensors"
    net.save_weights(str(plain), torch.float32, None)
    tensors, _ = adapterkit.read_safetensors(plain)
    name = "lora_te_layers_0_self_attn_q_proj"
    for extra, match in (({f"{name}.dora_scale": np.ones((32, 1), np.float32)}, "DoRA"),
                         ({f"{name}.hada_w1_c": np.ones((2, 2), np.float32)}, "not a kohya LoHa"),
                         ({"lora_te_layers_0_self_attn_k_proj.lora_down.weight": np.ones((2, 32), np.float32),
                           "lora_te_layers_0_self_attn_k_proj.lora_up.weight": np.ones((32, 2), np.float32)}, "mixes")):
        bad = root / "bad.safetensors"
        adapterkit.write_safetensors(bad, {**tensors, **extra})
        with pytest.raises(adapterkit.AdapterkitError, match=match) as info:
            adapterkit.load(bad)
        assert "\n" not in str(info.value)


def test_without_the_plugin_the_error_names_it(judge):
    root = judge.root
    _, net = lycoris_network(judge, 2, 3.0)
    file = root / "noplugin.safetensors"
    net.save_weights(str(file), torch.float32, None)
    bare = adapterkit.Registry(*adapterkit.get_plugin_manager(only={"kohya", "lora"}))
    assert adapterkit.detect_format(file, registry=bare) == "kohya"
    with pytest.raises(adapterkit.FormatError, match="no installed plugin reads kohya LoHa") as info:
        adapterkit.load(file, registry=bare)
    assert "adapterkit-loha" in info.value.hint and "\n" not in str(info.value)


def test_conv1d_targets_are_refused_for_kohya(judge):
    root = judge.root
    handle = adapterkit.inject(TINY_MODELS["gpt2"](0), "loha", {"r": 2, "target_modules": ["c_attn"]})
    with pytest.raises(adapterkit.LossyConversionError, match="Conv1D"):
        adapterkit.save(handle.to_adapter(), root / "gpt2", format="kohya")
    assert not (root / "gpt2").exists()
