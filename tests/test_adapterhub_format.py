"""The ``adapterhub`` format: layout and refusals without torch, then acceptance against the real AdapterHub.

The acceptance tests run AdapterHub's ``adapters`` library in its own venv (it pins
transformers 4.x), through tests/adapterhub_peer/peer.py, once for the whole module:

(a) adapters made by adapterkit (non-trivial weights) on tiny BERT, Llama and GPT-2
    models, written with ``--to adapterhub``, load with ``model.load_adapter(path)`` +
    ``set_active_adapters`` and give adapterkit's logits;
(b) adapters made and saved by AdapterHub itself (seq_bn, double_seq_bn, par_bn, lora)
    read with this plugin, and ``adapterkit.apply`` gives AdapterHub's logits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import adapterkit
import adapterkit.plugins.adapterhub as adapterhub_plugin
import adapterkit.plugins.bottleneck as bottleneck_plugin
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError, UnsafeFileError
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.plugin.registry import Registry, default_registry, get_plugin_manager
from adapterkit.plugins.adapterhub.writer import _factor
from helpers import REPO, make_lora_adapter

PEER_PYTHON = REPO / ".venv-adapterhub" / "bin" / "python"
PEER_SCRIPT = REPO / "tests" / "adapterhub_peer" / "peer.py"
PEER_SETUP = (
    "python3 -m venv .venv-adapterhub && .venv-adapterhub/bin/pip install torch==2.13.0 && "
    ".venv-adapterhub/bin/pip install 'transformers==4.57.6' 'adapters==1.3.*'"
)
ATOL = 1e-5


def registry() -> Registry:
    """The installed plugins, plus these two while they are not entry points yet."""
    installed = default_registry()
    if {"bottleneck"} <= set(installed.methods) and "adapterhub" in installed.formats:
        return installed
    return Registry(*get_plugin_manager(plugins=[("bottleneck", bottleneck_plugin), ("adapterhub", adapterhub_plugin)]))


REG = registry()


# ---- hand-made AdapterHub folders (torch-free) -------------------------------------------------

def bn_config(**fields) -> dict:
    config = {
        "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "init_weights": "bert",
        "inv_adapter": None, "is_parallel": False, "leave_out": [], "ln_after": False, "ln_before": False,
        "mh_adapter": False, "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True,
        "output_adapter": True, "phm_layer": False, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0,
        "stochastic_depth": 0.0, "use_gating": False,
    }
    return {**config, **fields}


def write_folder(folder: Path, config: dict, tensors: dict, name: str = "a", model_type: str = "llama") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    full = {"config": config, "hidden_size": 32, "model_class": "LlamaForCausalLM", "model_name": "", "model_type": model_type,
            "name": name, "version": "adapters.1.3.0"}
    (folder / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    safetensors_io.save(folder / "adapter.safetensors", tensors)
    return folder


def bn_tensors(name: str = "a", layers=(0, 1), container: str = "output_adapters", size: int = 2) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i in layers:
        prefix = f"model.layers.{i}.{container}.adapters.{name}."
        out[prefix + "adapter_down.0.weight"] = rng.standard_normal((size, 32)).astype(np.float32)
        out[prefix + "adapter_down.0.bias"] = rng.standard_normal(size).astype(np.float32)
        out[prefix + "adapter_up.weight"] = rng.standard_normal((32, size)).astype(np.float32)
        out[prefix + "adapter_up.bias"] = rng.standard_normal(32).astype(np.float32)
    return out


def test_reads_a_bottleneck_folder_into_canonical_keys(tmp_path):
    folder = write_folder(tmp_path / "ah", bn_config(), bn_tensors())
    assert adapterkit.detect_format(folder, registry=REG) == "adapterhub"
    adapter = adapterkit.load(folder, registry=REG)
    assert adapter.method == "bottleneck" and adapter.config == {}  # exactly the seq_bn preset
    target = adapter.targets["model.layers.1.post_attention_layernorm"]
    assert target == {"kind": "block", "site": "ffn", "shape": [32], "size": 2}
    raw = bn_tensors()
    key = "model.layers.0.post_attention_layernorm.bottleneck.down.weight"
    assert np.array_equal(adapter.tensors[key], raw["model.layers.0.output_adapters.adapters.a.adapter_down.0.weight"])
    assert adapter.manifest.provenance["converted_from"]["adapter_name"] == "a"
    assert adapterkit.validate(folder, registry=REG).valid


def test_round_trip_keeps_name_config_and_bytes(tmp_path):
    config = bn_config(mh_adapter=True, original_ln_before=False, non_linearity="swish", ln_before=True, scaling="learned")
    tensors = {}
    for container in ("attention_adapters", "output_adapters"):
        part = bn_tensors(name="mine", container=container)
        for key in [k for k in part if ".adapter_down.0." in k]:
            leaf = key.rsplit(".", 1)[1]
            part[key.replace(".adapter_down.0.", ".adapter_down.1.")] = part.pop(key)
            norm = np.full(32, 1.5 if leaf == "weight" else 0.25, dtype=np.float32)
            part[key.replace("adapter_down.0", "adapter_norm_before")] = norm  # one module, saved under two names
            part[key] = norm
        for i in (0, 1):
            part[f"model.layers.{i}.{container}.adapters.mine.scaling"] = np.array([0.5], dtype=np.float32)
        tensors.update(part)
    folder = write_folder(tmp_path / "ah", config, tensors, name="mine")
    adapter = adapterkit.load(folder, registry=REG)
    assert adapter.config["preset"] == "double_seq_bn" and adapter.config["ln_before"] is True
    out = adapterkit.save(adapter, tmp_path / "back", format="adapterhub", registry=REG, weights="safetensors")
    written = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((folder / "adapter_config.json").read_text())
    assert written["name"] == "mine" and written["config"] == {**written["config"], **original["config"]}
    back = safetensors_io.load(out / "adapter.safetensors")[0]
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("field, value, words", [
    ("use_gating", True, "gate"), ("phm_layer", True, "PHM"), ("inv_adapter", "nice", "invertible"),
    ("stochastic_depth", 0.1, "stochastic depth"),
])
def test_bottleneck_features_that_would_be_lost_are_refused(tmp_path, field, value, words):
    folder = write_folder(tmp_path / "ah", bn_config(**{field: value}), bn_tensors())
    with pytest.raises(LossyConversionError, match=words):
        adapterkit.load(folder, registry=REG)


@pytest.mark.parametrize("architecture", ["union", "prefix_tuning", "prompt_tuning"])
def test_other_architectures_are_refused(tmp_path, architecture):
    folder = write_folder(tmp_path / "ah", {"architecture": architecture}, bn_tensors())
    with pytest.raises(LossyConversionError, match="not supported"):
        adapterkit.load(folder, registry=REG)


def test_bad_files_are_refused(tmp_path):
    two = {**bn_tensors("a"), **bn_tensors("b")}
    with pytest.raises(FormatError, match="several adapters"):
        adapterkit.load(write_folder(tmp_path / "two", bn_config(), two, name="a"), registry=REG)
    odd = {**bn_tensors(), "model.layers.0.output_adapters.adapters.a.gate.weight": np.zeros((1, 32), np.float32)}
    with pytest.raises(LossyConversionError, match="gate"):
        adapterkit.load(write_folder(tmp_path / "gate", bn_config(), odd), registry=REG)
    with pytest.raises(FormatError, match="names another adapter"):
        adapterkit.load(write_folder(tmp_path / "name", bn_config(), bn_tensors("a"), name="b"), registry=REG)
    where = {k.replace("model.layers.0.output_adapters", "model.norm_adapters"): v for k, v in bn_tensors(layers=(0,)).items()}
    with pytest.raises(FormatError, match="cannot place"):
        adapterkit.load(write_folder(tmp_path / "where", bn_config(), where), registry=REG)


def test_pickles_load_weights_only(tmp_path):
    import torch
    folder = write_folder(tmp_path / "ah", bn_config(), bn_tensors())
    (folder / "adapter.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in bn_tensors().items()}, folder / "pytorch_adapter.bin")
    assert adapterkit.load(folder, registry=REG).method == "bottleneck"
    torch.save({"w": torch.zeros(2), "evil": Evil()}, folder / "pytorch_adapter.bin")
    with pytest.raises(UnsafeFileError, match="refused"):
        adapterkit.load(folder, registry=REG)
    (folder / "pytorch_adapter.bin").write_bytes(b"not a pickle")
    with pytest.raises(TensorFileError):
        adapterkit.load(folder, registry=REG)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


# ---- writing: what AdapterHub cannot express is refused --------------------------------------------

def test_lora_on_modules_adapterhub_does_not_wrap_is_refused(tmp_path):
    targets = {f"model.layers.{i}.self_attn.o_proj": {"kind": "linear", "shape": [32, 32], "r": 4, "alpha": 8} for i in (0, 1)}
    with pytest.raises(LossyConversionError, match="cannot put LoRA") as info:
        adapterkit.save(make_lora_adapter(targets), tmp_path / "o", format="adapterhub", registry=REG)
    assert "q_proj" in str(info.value.expected)
    gpt2 = {f"transformer.h.{i}.attn.c_attn": {"kind": "conv1d", "shape": [32, 96], "r": 4, "alpha": 8} for i in (0, 1)}
    with pytest.raises(LossyConversionError, match="merged q/k/v"):
        adapterkit.save(make_lora_adapter(gpt2), tmp_path / "g", format="adapterhub", registry=REG)


def test_lora_shapes_adapterhub_cannot_hold_are_refused(tmp_path):
    from helpers import llama_targets

    ranks = llama_targets()
    ranks["model.layers.1.self_attn.v_proj"]["r"] = 2
    with pytest.raises(LossyConversionError, match="one rank"):
        adapterkit.save(make_lora_adapter(ranks), tmp_path / "r", format="adapterhub", registry=REG)
    uneven = llama_targets()
    del uneven["model.layers.1.self_attn.v_proj"]
    with pytest.raises(LossyConversionError, match="same modules in every adapted layer"):
        adapterkit.save(make_lora_adapter(uneven), tmp_path / "u", format="adapterhub", registry=REG)


def test_lora_scales_fold_into_b_and_layers_into_leave_out(tmp_path, tiny_base_dirs):
    from helpers import llama_targets

    targets = llama_targets(layers=(1,))
    targets["model.layers.1.self_attn.k_proj"] = {"kind": "linear", "shape": [16, 32], "r": 4, "alpha": 8}
    targets["model.layers.1.self_attn.v_proj"]["alpha"] = 2  # scale 0.5 instead of the others' 2
    adapter = make_lora_adapter(targets, base_model={"model_type": "llama"})
    out = adapterkit.save(adapter, tmp_path / "f", format="adapterhub", registry=REG, weights="safetensors",
                          base=tiny_base_dirs["llama"])
    config = json.loads((out / "adapter_config.json").read_text())["config"]
    assert (config["r"], config["alpha"], config["attn_matrices"], config["leave_out"]) == (4, 8, ["q", "k", "v"], [0])
    tensors = safetensors_io.load(out / "adapter.safetensors")[0]
    b = adapter.tensors["model.layers.1.self_attn.v_proj.lora.B"]
    assert np.allclose(tensors["model.layers.1.self_attn.v_proj.loras.default.lora_B"], b * 0.25)
    back = adapterkit.load(out, registry=REG)
    assert back.config["layers_to_transform"] == [1] and back.manifest.base_model["model_type"] == "llama"


def test_bottleneck_that_differs_per_layer_is_refused(tmp_path):
    adapter = adapterkit.load(write_folder(tmp_path / "ah", bn_config(mh_adapter=True),
                                           {**bn_tensors(), **bn_tensors(container="attention_adapters")}), registry=REG)
    del adapter.manifest.targets["model.layers.1.input_layernorm"]
    adapter.tensors = {k: v for k, v in adapter.tensors.items() if not k.startswith("model.layers.1.input_layernorm")}
    with pytest.raises(LossyConversionError, match="same adapters"):
        adapterkit.save(adapter, tmp_path / "out", format="adapterhub", registry=REG)


def test_unknown_model_types_are_refused(tmp_path):
    from helpers import llama_targets

    adapter = make_lora_adapter(llama_targets(), base_model={"model_type": "mistral"})
    with pytest.raises(LossyConversionError, match="BERT, Llama and GPT-2"):
        adapterkit.save(adapter, tmp_path / "m", format="adapterhub", registry=REG)


def test_other_methods_are_refused(tmp_path):
    manifest = Manifest(method="prompt", config={}, targets={}, dtype="float32")
    with pytest.raises(LossyConversionError, match="lora and bottleneck"):
        adapterkit.save(Adapter(manifest, {}), tmp_path / "p", format="adapterhub", registry=REG)


@pytest.mark.parametrize("hidden, size", [(32, 2), (32, 3), (768, 48), (768, 100), (32, 64), (4096, 7)])
def test_reduction_factor_gives_the_width_back(hidden, size):
    assert int(hidden // _factor(hidden, size)) == size


# ---- acceptance against the real AdapterHub ---------------------------------------------------------------

OURS = {  # name -> (model kind, method, config, weights file)
    "bert-seq_bn": ("bert", "bottleneck", {"preset": "seq_bn"}, "bin"),
    "bert-double_seq_bn": ("bert", "bottleneck", {"preset": "double_seq_bn", "ln_before": True, "ln_after": True,
                                                  "scaling": "learned"}, "safetensors"),
    "bert-par_bn": ("bert", "bottleneck", {"preset": "par_bn", "leave_out": [0]}, "bin"),
    "bert-lora": ("bert", "lora", {"r": 4, "alpha": 8, "target_modules": ["query", "value", "intermediate.dense"]}, "bin"),
    "llama-seq_bn": ("llama", "bottleneck", {"preset": "seq_bn", "reduction_factor": {"1": 4, "default": 16}}, "bin"),
    "llama-double_seq_bn": ("llama", "bottleneck", {"preset": "double_seq_bn", "adapter_residual_before_ln": True,
                                                    "ln_after": True, "non_linearity": "gelu"}, "bin"),
    "llama-par_bn": ("llama", "bottleneck", {"preset": "par_bn", "ln_after": True, "scaling": "channel"}, "safetensors"),
    "llama-lora": ("llama", "lora", {"r": 4, "alpha": 16, "use_rslora": True, "alpha_pattern": {"v_proj": 4},
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj", "up_proj"]}, "bin"),
    "gpt2-double_seq_bn": ("gpt2", "bottleneck", {"preset": "double_seq_bn", "original_ln_before": True}, "bin"),
    "gpt2-lora": ("gpt2", "lora", {"r": 4, "alpha": 8, "target_modules": ["c_fc", "mlp.c_proj"]}, "bin"),
}
THEIRS = {  # name -> (model kind, AdapterHub config, options)
    "bert-seq_bn": ("bert", "seq_bn", {}),
    "bert-double_seq_bn": ("bert", "double_seq_bn", {"ln_before": True, "ln_after": True, "scaling": "learned"}),
    "bert-par_bn": ("bert", "par_bn", {}),
    "bert-lora": ("bert", "lora", {"r": 4, "alpha": 16, "output_lora": True}),
    "llama-seq_bn": ("llama", "seq_bn", {"reduction_factor": 8, "residual_before_ln": False}),
    "llama-double_seq_bn": ("llama", "double_seq_bn", {"ln_after": True}),
    "llama-par_bn": ("llama", "par_bn", {"leave_out": [0], "scaling": "channel"}),
    "llama-lora": ("llama", "lora", {"intermediate_lora": True, "output_lora": True, "attn_matrices": ["q", "k", "v"]}),
    "gpt2-par_bn": ("gpt2", "par_bn", {}),
    "gpt2-lora": ("gpt2", "lora", {"selfattn_lora": False, "intermediate_lora": True, "output_lora": True}),
}


def _logits(model, ids):
    import torch

    ids = torch.from_numpy(ids)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Runs every peer job in one AdapterHub process; returns the folder, the reports and our logits."""
    if not PEER_PYTHON.is_file():
        pytest.fail(f"the AdapterHub peer venv is missing ({PEER_PYTHON}); create it from the repository root with:\n"
                    f"  {PEER_SETUP}", pytrace=False)
    import torch
    from models import BUILDERS, sample_inputs

    from adapterkit.testing import perturb

    root = tmp_path_factory.mktemp("adapterhub_peer")
    ids = sample_inputs()["input_ids"].numpy()
    np.save(root / "ids.npy", ids)
    ours_logits, base_logits, jobs, checked = {}, {}, [], set()
    for kind in ("bert", "llama", "gpt2"):
        model = BUILDERS[kind](seed=0)
        model.save_pretrained(root / kind)
        base_logits[kind] = _logits(model, ids)
    for index, (case, (kind, method, config, weights)) in enumerate(sorted(OURS.items())):
        model = BUILDERS[kind](seed=0)
        handle = adapterkit.inject(model, method, config, registry=REG)
        perturb(handle.parameters(), seed=index, scale=0.1)
        ours_logits[case] = _logits(model, ids)
        adapterkit.save(handle.to_adapter(), root / "ours" / case, format="adapterhub", registry=REG, weights=weights)
        jobs.append({"op": "run", "model": str(root / kind), "adapter": str(root / "ours" / case),
                     "inputs": str(root / "ids.npy"),
                     "logits": str(root / "ours" / f"{case}.npy"), "safetensors": weights == "safetensors",
                     "base_logits": None if kind in checked else str(root / f"base-{kind}.npy")})
        checked.add(kind)
    for index, (case, (kind, config, options)) in enumerate(sorted(THEIRS.items())):
        jobs.append({"op": "make", "model": str(root / kind), "config": config, "options": options, "name": f"ah_{config}",
                     "out": str(root / "theirs" / case), "inputs": str(root / "ids.npy"), "seed": index,
                     "logits": str(root / "theirs" / f"{case}.npy"), "safetensors": index % 2 == 1})
    (root / "ours").mkdir(exist_ok=True)
    (root / "theirs").mkdir(exist_ok=True)
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([str(PEER_PYTHON), str(PEER_SCRIPT), str(root / "jobs.json")], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"the AdapterHub peer failed:\n{result.stderr[-4000:]}", pytrace=False)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    del torch
    return {"root": root, "ids": ids, "ours": ours_logits, "base": base_logits, "reports": reports}


def test_peer_versions_and_base_models(peer):
    versions = peer["reports"][0]["versions"]
    assert versions["adapters"].startswith("1.3.") and versions["transformers"] == "4.57.6"
    for kind, ours in peer["base"].items():  # transformers 4.57 reads the folders transformers 5 saved
        theirs = np.load(peer["root"] / f"base-{kind}.npy")
        print(f"base {kind}: max |logit diff| {float(np.abs(theirs - ours).max()):.3g}")
        assert np.abs(theirs - ours).max() <= ATOL, kind


@pytest.mark.parametrize("case", sorted(OURS))
def test_adapterhub_loads_our_output(peer, case):
    report = next(r for r in peer["reports"] if r.get("adapter", "").endswith(f"/ours/{case}"))
    assert report["unexpected"] == [] and not [k for k in report["missing"] if f".{report['name']}." in k], report
    theirs = np.load(peer["root"] / "ours" / f"{case}.npy")
    diff = float(np.abs(theirs - peer["ours"][case]).max())
    print(f"ours -> AdapterHub {case}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL, f"{case}: AdapterHub's logits differ from adapterkit's by {diff:.3g}"
    assert float(np.abs(peer["ours"][case] - peer["base"][OURS[case][0]]).max()) > 1e-4  # the adapter does something


@pytest.mark.parametrize("case", sorted(THEIRS))
def test_we_read_what_adapterhub_saved(peer, case):
    from models import BUILDERS

    kind, config, _ = THEIRS[case]
    folder = peer["root"] / "theirs" / case
    adapter = adapterkit.load(folder, registry=REG)
    assert adapter.method == ("lora" if config == "lora" else "bottleneck")
    assert adapter.manifest.provenance["converted_from"]["adapter_name"] == f"ah_{config}"
    model = adapterkit.apply(adapter, BUILDERS[kind](seed=0), registry=REG)
    diff = float(np.abs(_logits(model, peer["ids"]) - np.load(peer["root"] / "theirs" / f"{case}.npy")).max())
    print(f"AdapterHub -> ours {case}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL, f"{case}: adapterkit's logits differ from AdapterHub's by {diff:.3g}"
    # and back: the same name, config and tensors AdapterHub wrote
    back = adapterkit.save(adapter, peer["root"] / "back" / case, format="adapterhub", registry=REG, weights="safetensors")
    original = json.loads((folder / "adapter_config.json").read_text())
    written = json.loads((back / "adapter_config.json").read_text())
    assert written["name"] == original["name"] and written["config"] == original["config"]
    theirs = _raw(folder)
    ours = safetensors_io.load(back / "adapter.safetensors")[0]
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def _raw(folder: Path) -> dict:
    if (folder / "adapter.safetensors").is_file():
        return safetensors_io.load(folder / "adapter.safetensors")[0]
    from adapterkit import read_torch_tensors

    return read_torch_tensors(folder / "pytorch_adapter.bin")
