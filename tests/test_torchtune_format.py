"""The torchtune format against the real torchtune: its own PEFT export of our file equals the source PEFT
adapter, its LoRA model loads our file and gives PEFT's logits, and its own checkpoints round-trip.

torchtune needs torchao, and torchao installed next to transformers makes every ``import
transformers.modeling_utils`` import it (slow, and it prints warnings in every command), so torchtune
runs in its own venv (.venv-torchtune), through tests/torchtune_peer/peer.py, once for the whole module.
This side uses torch, PEFT and transformers, never torchtune or torchao.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from helpers import REPO
from models import sample_inputs, tiny_llama
from safetensors.torch import save_file

import adapterkit
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import targets_fingerprint
from adapterkit.core.errors import FormatError, LossyConversionError, UnsafeFileError
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.plugin.registry import Registry, get_plugin_manager
import adapterkit.plugins.torchtune as torchtune_format
from adapterkit.plugins.torchtune.names import hf_to_meta, meta_to_hf

PEER_PYTHON = REPO / ".venv-torchtune" / "bin" / "python"
PEER_SCRIPT = REPO / "tests" / "torchtune_peer" / "peer.py"
PEER_SETUP = (
    "python3 -m venv .venv-torchtune && .venv-torchtune/bin/pip install torch==2.13.0 && "
    ".venv-torchtune/bin/pip install --no-deps -c constraints-torchtune.txt torchtune torchao && "
    ".venv-torchtune/bin/pip install -c constraints-torchtune.txt datasets omegaconf tiktoken tokenizers sentencepiece"
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS = {"num_heads": 4, "num_kv_heads": 2, "dim": 32, "head_dim": 8}  # models.tiny_llama
ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
NAMES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")


@pytest.fixture(scope="module")
def reg() -> Registry:
    plugins = [("torchtune", torchtune_format)]
    return Registry(*get_plugin_manager(plugins=plugins, only={"adapterkit", "lora", "torchtune"}))


def peft_case(seed: int = 0, **lora: object) -> tuple[Adapter, np.ndarray, dict[str, torch.Tensor]]:
    """A random PEFT LoRA on the tiny llama: (canonical adapter, PEFT logits, PEFT state dict)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**lora)).eval()
    generator = torch.Generator().manual_seed(seed)
    targets, tensors = {}, {}
    with torch.no_grad():
        for path, layer in model.named_modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
                b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
                module = path.removeprefix("base_model.model.")
                targets[module] = {"kind": "linear", "shape": list(layer.base_layer.weight.shape),
                                   "r": layer.r["default"], "alpha": layer.lora_alpha["default"]}
                tensors[f"{module}.lora.A"], tensors[f"{module}.lora.B"] = a.numpy().copy(), b.numpy().copy()
        logits = model(input_ids=sample_inputs()["input_ids"]).logits.numpy()
    config = {"r": lora["r"], "alpha": lora["lora_alpha"], "target_modules": lora["target_modules"]}
    manifest = Manifest(method="lora", config=config, targets=targets, dtype="float32", task="causal-lm",
                        base_model={"name": "tiny-llama", "fingerprint": targets_fingerprint(targets)})
    return Adapter(manifest, tensors), logits, peft.get_peft_model_state_dict(model)


def load_pt(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "adapter_model.pt" if path.is_dir() else path, weights_only=True)


def tune_model_kwargs() -> dict:
    """torchtune's ``lora_llama2`` arguments for models.tiny_llama (LoRA options apart)."""
    config = tiny_llama().config
    return {"vocab_size": config.vocab_size, "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
            "embed_dim": config.hidden_size, "max_seq_len": config.max_position_embeddings,
            "intermediate_dim": config.intermediate_size, "norm_eps": config.rms_norm_eps}


def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    for field in ("config", "targets", "dtype", "base_model", "task"):
        assert getattr(got.manifest, field) == getattr(want.manifest, field), field
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, array in want.tensors.items():
        assert got.tensors[key].dtype == array.dtype and got.tensors[key].tobytes() == array.tobytes(), key


@pytest.fixture(scope="module")
def peer(tiny_base_dirs, tmp_path_factory, reg) -> dict:
    """Writes our torchtune files, then runs every torchtune job in one process of the peer venv.

    - ``all``: LoRA on every linear of both blocks; torchtune exports it to PEFT, and exports the
      recipe's config with ``tune_to_peft_adapter_config``.
    - ``mixed``: last block only, gate/down without up, per-module ranks and alphas (scale ratios 2, 3,
      1.5); torchtune's ``lora_llama2`` loads it strictly and gives logits, and exports it to PEFT.
    - ``meta``: one random q ``lora_b`` in torchtune's (Meta's) row order, exported to PEFT.
    - ``native``: a checkpoint folder as torchtune's FullModelHFCheckpointer writes it.
    """
    if not PEER_PYTHON.is_file():
        pytest.fail(f"the torchtune peer venv is missing ({PEER_PYTHON}); create it from the repository root with:\n"
                    f"  {PEER_SETUP}", pytrace=False)
    root = tmp_path_factory.mktemp("torchtune_peer")
    base = tiny_base_dirs["llama"]
    model = tune_model_kwargs()
    ids = sample_inputs()["input_ids"]
    np.save(root / "ids.npy", ids.numpy())
    torch.save(tiny_llama().state_dict(), root / "base.pt")
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=ids).logits.numpy()

    cases = {"all": peft_case(r=4, lora_alpha=8, target_modules=ALL),
             "mixed": peft_case(seed=1, r=4, lora_alpha=8, target_modules=[n for n in ALL if n != "up_proj"],
                                layers_to_transform=[1], rank_pattern={"v_proj": 2},
                                alpha_pattern={"o_proj": 24, "down_proj": 12})}
    ours = {name: adapterkit.save(case[0], root / name, format="torchtune", registry=reg, base=base)
            for name, case in cases.items()}
    mixed_config = json.loads((ours["mixed"] / "adapter_config.json").read_text())
    meta_b = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    torch.save({"layers.0.attn.q_proj.lora_b.weight": meta_b}, root / "meta.pt")
    native = root / "native" / "epoch_0"
    native.mkdir(parents=True)

    mlp_lora = {"attn": ATTN, "mlp": True, "output": False}
    jobs = [
        {"op": "to_peft", "id": "all", "weights": str(ours["all"] / "adapter_model.pt"), "heads": HEADS,
         "out": str(root / "all_peft.pt")},
        {"op": "peft_config", "id": "all_config", "recipe": {"r": 4, "lora_alpha": 8, "peft_type": "LORA"},
         "lora": mlp_lora, "base_model_name_or_path": "tiny-llama", "out": str(root / "all_config.json")},
        {"op": "logits", "id": "mixed_logits", "model": model, "lora": mlp_lora, "rank": mixed_config["r"],
         "alpha": mixed_config["lora_alpha"], "base": str(root / "base.pt"), "heads": HEADS,
         "adapter": str(ours["mixed"] / "adapter_model.pt"), "inputs": str(root / "ids.npy"),
         "logits": str(root / "mixed_logits.npy")},
        {"op": "to_peft", "id": "mixed", "weights": str(ours["mixed"] / "adapter_model.pt"), "heads": HEADS,
         "out": str(root / "mixed_peft.pt")},
        {"op": "to_peft", "id": "meta", "weights": str(root / "meta.pt"), "heads": HEADS,
         "out": str(root / "meta_peft.pt")},
        {"op": "make", "id": "native", "model": model, "lora": {"attn": ["q_proj", "v_proj"], "mlp": False,
                                                                "output": True},
         "rank": 4, "alpha": 16, "seed": 3, "scale": 0.3, "heads": HEADS, "base_model_name_or_path": str(base),
         "out": str(native)},
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([str(PEER_PYTHON), str(PEER_SCRIPT), str(root / "jobs.json")], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"the torchtune peer failed:\n{result.stderr[-4000:]}", pytrace=False)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # the PEFT copy, as the checkpointer writes it (the peer venv has no safetensors)
    save_file(load_pt(native / "peft_weights.pt"), native / "adapter_model.safetensors", metadata={"format": "pt"})
    (native / "peft_weights.pt").unlink()
    return {"root": root, "versions": lines[0]["versions"], "reports": {r["id"]: r for r in lines[1:]},
            "cases": cases, "ours": ours, "base_logits": base_logits, "meta_b": meta_b, "native": native}


@pytest.fixture(scope="module")
def native(peer) -> Path:
    """A checkpoint folder as torchtune's FullModelHFCheckpointer writes it (adapter_model.pt, PEFT copy, config)."""
    return peer["native"]


def test_peer_is_the_pinned_torchtune(peer):
    versions = peer["versions"]
    assert versions["torchtune"].startswith("0.6.1") and versions["torchao"].startswith("0.17.0"), versions
    assert set(peer["reports"]) == {"all", "all_config", "mixed_logits", "mixed", "meta", "native"}
    assert "torchtune" not in sys.modules  # this side never imports it


def test_torchtune_peft_export_of_our_file_is_the_source(peer, tiny_base_dirs, reg):
    adapter, _, want = peer["cases"]["all"]
    out = peer["ours"]["all"]
    ours = load_pt(out)
    assert set(ours) == {f"layers.{i}.{m}.lora_{w}.weight" for i in (0, 1) for w in "ab" for m in NAMES}
    # torchtune keeps q/k in Meta's rotary order: the rows of B differ from PEFT's
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(ours["layers.0.attn.q_proj.lora_b.weight"], want[q_b])
    exported = load_pt(peer["root"] / "all_peft.pt")  # torchtune's tune_to_peft_adapter_weights
    assert sorted(exported) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((out / "adapter_config.json").read_text())
    config.pop("adapterkit")
    assert config == json.loads((peer["root"] / "all_config.json").read_text())  # tune_to_peft_adapter_config
    assert adapterkit.detect_format(out, registry=reg) == "torchtune"
    assert_same_adapter(adapterkit.load(out, format="torchtune", registry=reg, base=tiny_base_dirs["llama"]), adapter)


def test_torchtune_model_loads_our_file_and_gives_peft_logits(peer):
    _, want, _ = peer["cases"]["mixed"]
    out = peer["ours"]["mixed"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    report = peer["reports"]["mixed_logits"]
    assert report["valid"] is True, report  # validate_missing_and_unexpected_for_lora
    assert report["lora_unexpected"] == [] and report["base_unexpected"] == [], report
    got = np.load(peer["root"] / "mixed_logits.npy")
    assert np.abs(want - peer["base_logits"]).max() > 0.1  # the adapter matters
    diff = float(np.abs(got - want).max())
    print(f"torchtune lora_llama2 on our file vs PEFT: max |logit diff| {diff:.3g}")
    assert diff < 1e-4
    # fill-ins (layer 0, and up_proj of layer 1) have B = 0
    assert not load_pt(out)["layers.0.attn.q_proj.lora_b.weight"].any()
    assert not load_pt(out)["layers.1.mlp.w3.lora_b.weight"].any()


def test_folded_modules_keep_their_delta_and_round_trip(peer, tiny_base_dirs, reg):
    adapter, _, want = peer["cases"]["mixed"]
    exported = load_pt(peer["root"] / "mixed_peft.pt")  # torchtune's tune_to_peft_adapter_weights
    for module, target in adapter.targets.items():
        key = f"base_model.model.{module}.lora_"
        a, b = exported[key + "A.weight"].double(), exported[key + "B.weight"].double()
        ours = (8 / 4) * b @ a
        theirs = (target["alpha"] / target["r"]) * want[key + "B.weight"].double() @ want[key + "A.weight"].double()
        assert (ours - theirs).abs().max() < 1e-6, module
    back = adapterkit.load(peer["ours"]["mixed"], format="torchtune", registry=reg, base=tiny_base_dirs["llama"])
    assert not back.warnings
    assert_same_adapter(back, adapter)


def test_reading_torchtune_matches_torchtune_peft_export(native, reg):
    # the folder also holds torchtune's PEFT copy, so detection leaves it to the peft format
    assert not torchtune_format.TorchtuneFormat().detect(native)
    adapter = adapterkit.load(native, format="torchtune", registry=reg)  # base from base_model_name_or_path
    peft_copy = dict(adapterkit.core.format.safetensors_io.load(native / "adapter_model.safetensors")[0])
    assert len(adapter.targets) == 5 and all(t["r"] == 4 and t["alpha"] == 16 for t in adapter.targets.values())
    for module in adapter.targets:
        for which in "AB":
            got = adapter.tensors[f"{module}.lora.{which}"]
            assert got.tobytes() == peft_copy[f"base_model.model.{module}.lora_{which}.weight"].tobytes(), module
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert adapter.config == {"r": 4, "alpha": 16, "target_modules": ["lm_head", *modules]}


def test_torchtune_round_trip_is_exact(native, tmp_path, reg):
    adapter = adapterkit.load(native / "adapter_model.pt", format="torchtune", registry=reg)
    out = adapterkit.save(adapter, tmp_path / "tt", format="torchtune", registry=reg)  # base from the manifest name
    got, want = load_pt(out), load_pt(native)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    config.pop("adapterkit")
    assert config == json.loads((native / "adapter_config.json").read_text())


def test_meta_order_is_torchtunes(peer):
    b = peer["meta_b"]
    hf = torch.from_numpy(meta_to_hf(b.numpy(), 4, 8))
    theirs = load_pt(peer["root"] / "meta_peft.pt")  # torchtune's tune_to_peft_adapter_weights
    assert torch.equal(hf, theirs["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert np.array_equal(hf_to_meta(hf.numpy(), 4, 8), b.numpy())


def test_refusals(native, tiny_base_dirs, tmp_path, reg):
    pt_only = tmp_path / "pt_only"
    pt_only.mkdir()
    (pt_only / "adapter_model.pt").write_bytes((native / "adapter_model.pt").read_bytes())
    assert adapterkit.detect_format(pt_only, registry=reg) == "torchtune"
    with pytest.raises(FormatError, match="does not store alpha") as info:
        adapterkit.load(pt_only, registry=reg, base=tiny_base_dirs["llama"])
    assert info.value.code == "alpha_missing"
    with pytest.raises(FormatError, match="head counts") as info:
        adapterkit.load(pt_only, registry=reg, alpha=16)
    assert info.value.code == "base_missing"
    adapter = adapterkit.load(pt_only, registry=reg, alpha=16, base=tiny_base_dirs["llama"])
    assert adapter.targets["lm_head"]["alpha"] == 16

    dora = tmp_path / "dora"
    dora.mkdir()
    torch.save({**load_pt(native), "layers.0.attn.q_proj.magnitude": torch.ones(32)}, dora / "adapter_model.pt")
    with pytest.raises(FormatError, match="DoRA"):
        adapterkit.load(dora, registry=reg, alpha=16, base=tiny_base_dirs["llama"])

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"layers.0.attn.q_proj.lora_a.weight": Payload()}, evil / "adapter_model.pt")
    with pytest.raises(UnsafeFileError):
        adapterkit.load(evil, format="torchtune", registry=reg, alpha=16)
    assert not marker.exists()

    embed = Manifest(method="lora", config={}, dtype="float32",
                     targets={"model.embed_tokens": {"kind": "linear", "shape": [128, 32], "r": 2, "alpha": 2}})
    tensors = {"model.embed_tokens.lora.A": np.zeros((2, 32), np.float32),
               "model.embed_tokens.lora.B": np.zeros((128, 2), np.float32)}
    with pytest.raises(LossyConversionError, match="cannot adapt"):
        adapterkit.save(Adapter(embed, tensors), tmp_path / "e", format="torchtune", registry=reg,
                        base=tiny_base_dirs["llama"])
    with pytest.raises(FormatError, match="needs the base") as info:
        adapterkit.save(Adapter(embed, tensors), tmp_path / "f", format="torchtune", registry=reg)
    assert info.value.code == "base_missing"
