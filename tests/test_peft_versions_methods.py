"""``convert --to peft --peft-version X`` for the method packages (LoHa, LoKr, VeRA, AdaLoRA, OFT, BOFT), and
folders those releases made (LoRA and DoRA too), judged by the real PEFT 0.14.0 and 0.9.0
(tests/peft_peer/peer.py).

What changed between releases beyond config fields (found by loading in 26 releases from 0.6.0 to 0.21.1,
every minor one; 0.16 / 0.17 need transformers 4 and run from the AdapterHub venv; docs/methods.md):
- LoKr applied no alpha / r before 0.14.0: written for those, each module's scale is folded into w1 and
  alpha written as r; a config without ``rank_dropout_scale`` (0.14.0's field) reads with scale 1.
- VeRA before 0.12.0 takes one shape for every target; VeRA and BOFT came with 0.11.0.
- OFT before 0.16.0 had another layout (``oft_r``); the Cayley-Neumann series changed in 0.18.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from helpers import REPO, require_methods
from test_peft_versions import PEER_RELEASES, config_of, convert, peer_dir, refused, run_peer

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
#: method -> its adapterkit config (ranks small, scales other than 1 so that a dropped scale shows)
METHODS = {
    "loha": {"target_modules": TARGETS, "r": 4, "alpha": 16},
    "lokr": {"target_modules": TARGETS, "r": 4, "alpha": 16, "rank_pattern": {"down_proj": 2}},
    "vera": {"target_modules": ["q_proj", "v_proj"], "r": 8},
    "adalora": {"target_modules": TARGETS, "init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10},
    "oft": {"target_modules": TARGETS, "r": 0, "oft_block_size": 4},
    "boft": {"target_modules": TARGETS, "boft_block_size": 4},
}
#: (method, release) -> a needle of convert's one-line refusal; every other pair loads with our logits
REFUSED = {
    ("vera", "0.9.0"): "VERA adapters came with PEFT 0.11.0",
    ("boft", "0.9.0"): "BOFT adapters came with PEFT 0.11.0",
    ("oft", "0.9.0"): "stores OFT in another layout (oft_r)",
    ("oft", "0.14.0"): "stores OFT in another layout (oft_r)",
}
#: adapters each release makes (peft_type, PEFT config); the reader must give that release's logits
MADE = {
    "loha": ("LOHA", {"r": 4, "alpha": 16, "target_modules": TARGETS}),
    "lokr": ("LOKR", {"r": 4, "alpha": 16, "target_modules": TARGETS}),
    "adalora": ("ADALORA", {"init_r": 4, "target_r": 2, "lora_alpha": 8, "target_modules": TARGETS}),
    "vera": ("VERA", {"r": 8, "target_modules": ["q_proj", "o_proj"]}),  # one shape: what 0.11 takes
    "boft": ("BOFT", {"boft_block_size": 4, "target_modules": TARGETS}),
    "oft": ("OFT", {"r": 4, "target_modules": TARGETS}),
    # the built-in methods, for the same check of the reader
    "lora": ("LORA", {"r": 4, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"down_proj": 8},
                      "target_modules": TARGETS}),
    "dora": ("LORA", {"r": 4, "lora_alpha": 16, "use_dora": True, "target_modules": TARGETS}),
}
MADE_IN = {"0.9.0": ("loha", "lokr", "adalora", "oft", "lora", "dora"), "0.14.0": tuple(MADE)}
#: a release that imports transformers 4's HybridCache: judged from the AdapterHub venv (transformers 4.57.6)
T4_RELEASE = "0.17.1"
T4_PYTHON = REPO / ".venv-adapterhub" / "bin" / "python"


@pytest.fixture(autouse=True, scope="module")
def _every_method_package():
    require_methods(*METHODS)


def _logits(adapter: adapterkit.Adapter, ids) -> np.ndarray:
    import torch

    from adapterkit.testing import TINY_MODELS

    model = TINY_MODELS["llama"](0).eval()
    adapterkit.apply(adapter, model)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_base_dirs):
    """Our output for each release and the release's own adapters, through the real releases."""
    missing = [v for v in PEER_RELEASES if not (peer_dir(v) / "peft" / "__init__.py").is_file()]
    if missing:
        pytest.fail("old PEFT releases are missing; run `make install` (it puts them in .venv-peft)", pytrace=False)
    from adapterkit.testing import TINY_MODELS, perturb, sample_inputs

    root = tmp_path_factory.mktemp("peft_versions_methods")
    base = tiny_base_dirs["llama"]
    ids = sample_inputs()["input_ids"]
    np.save(root / "ids.npy", ids.numpy())
    sources, ours = {}, {}
    for seed, (method, config) in enumerate(METHODS.items()):
        handle = adapterkit.inject(TINY_MODELS["llama"](0), method, config)
        perturb(handle.parameters(), seed=seed, scale=0.2)
        sources[method] = adapterkit.save(handle.to_adapter(), root / "src" / method)
        ours[method] = _logits(adapterkit.load(sources[method]), ids)
    written, made = {}, {}
    for version in PEER_RELEASES:
        jobs = []
        for method, source in sources.items():
            out = root / version / "written" / method
            result = convert(source, out, "--to", "peft", "--peft-version", version, "--base", base)
            written[method, version] = (result, out)
            if result.exit_code == 0:
                jobs.append({"model": str(base), "adapter": str(out), "inputs": str(root / "ids.npy"),
                             "logits": str(out) + ".npy", "method": method})
        (root / version / "made").mkdir(parents=True)
        made_jobs = [{"make": {"peft_type": MADE[m][0], "config": MADE[m][1], "seed": 7}, "model": str(base),
                      "adapter": str(root / version / "made" / m), "inputs": str(root / "ids.npy"),
                      "logits": str(root / version / "made" / m) + ".npy", "method": m}
                     for m in MADE_IN[version]]
        for job, report in zip(jobs + made_jobs, run_peer(version, jobs + made_jobs, root)):
            if "make" in job:
                made[job["method"], version] = (report, Path(job["adapter"]), Path(job["logits"]))
            else:
                written[job["method"], version] = (written[job["method"], version][0], report, Path(job["logits"]))
    return {"ids": ids, "ours": ours, "written": written, "made": made, "base": base, "root": root}


@pytest.mark.parametrize("version", PEER_RELEASES)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_release_loads_what_adapterkit_wrote_for_it_with_our_logits(judged, method, version):
    entry = judged["written"][method, version]
    if (method, version) in REFUSED:
        refused(entry[0], REFUSED[method, version], f"PEFT {version}")
        return
    result, report, logits = entry
    assert result.exit_code == 0, result.stderr
    assert report["peft"] == version and "error" not in report, report
    assert report["unknown_keys"] == [] and report["warnings"] == [], report
    diff = float(np.abs(np.load(logits) - judged["ours"][method]).max())
    print(f"PEFT {version} loads our {method}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL, (method, version, diff)


def test_lokr_for_a_release_before_0_14_folds_the_scale_into_w1(judged):
    folder = judged["written"]["lokr", "0.9.0"][2].with_suffix("")
    config = config_of(folder)
    assert config["alpha"] == config["r"] and config.get("alpha_pattern") == config.get("rank_pattern")
    assert "rank_dropout_scale" not in config  # 0.9.0's LoKrConfig has no such field
    back = adapterkit.load(folder, base=judged["base"])  # no rank_dropout_scale: read unscaled, the same update
    np.testing.assert_allclose(_logits(back, judged["ids"]), judged["ours"]["lokr"], atol=ATOL)


@pytest.mark.parametrize(("method", "version"), [(m, v) for v in PEER_RELEASES for m in MADE_IN[v]])
def test_adapterkit_reads_what_a_release_made_with_its_logits(judged, method, version):
    report, folder, logits = judged["made"][method, version]
    assert "error" not in report, report
    if method == "oft":  # OFT's layout before 0.16: refused, naming it (PEFT 0.21 refuses it too)
        with pytest.raises(adapterkit.AdapterkitError, match="OFT"):
            adapterkit.load(folder, base=judged["base"])
        return
    adapter = adapterkit.load(folder, base=judged["base"])
    diff = float(np.abs(_logits(adapter, judged["ids"]) - np.load(logits)).max())
    print(f"adapterkit reads PEFT {version}'s {method}: max |logit diff| {diff:.3g}")
    assert diff <= ATOL, (method, version, diff)
    old_lokr = method == "lokr" and version == "0.9.0"
    assert any("rank_dropout_scale" in w for w in adapter.warnings) == old_lokr, adapter.warnings


def test_an_old_lokr_read_with_the_scale_would_be_wrong(judged, tmp_path):
    """The control: PEFT 0.9.0's LoKr (alpha 16, r 4) read as a 0.14 folder is 4 times the update."""
    import shutil

    _, folder, logits = judged["made"]["lokr", "0.9.0"]
    copy = Path(shutil.copytree(folder, tmp_path / "lokr"))
    config = config_of(copy)
    (copy / "adapter_config.json").write_text(json.dumps({**config, "rank_dropout_scale": False}))
    adapter = adapterkit.load(copy, base=judged["base"])
    assert not adapter.warnings
    assert float(np.abs(_logits(adapter, judged["ids"]) - np.load(logits)).max()) > 1e-2


def test_oft_for_0_16_and_0_17_needs_the_exact_cayley(tmp_path, tiny_base_dirs):
    """Their OFT is the same up to the Cayley-Neumann series, which 0.18.0 changed, so only an exact-Cayley
    adapter is written (PEFT 0.17.1 judges it below)."""
    from adapterkit.testing import TINY_MODELS, perturb

    for neumann in (True, False):
        handle = adapterkit.inject(TINY_MODELS["llama"](0), "oft", {**METHODS["oft"], "use_cayley_neumann": neumann})
        perturb(handle.parameters(), seed=3, scale=0.2)
        source = adapterkit.save(handle.to_adapter(), tmp_path / f"src-{neumann}")
        for version in ("0.16.0", "0.17.1"):
            result = convert(source, tmp_path / f"{neumann}-{version}", "--to", "peft", "--peft-version", version)
            if neumann:
                refused(result, "$.use_cayley_neumann", "0.18.0")
            else:
                assert result.exit_code == 0, result.stderr
                assert config_of(tmp_path / f"{neumann}-{version}")["use_cayley_neumann"] is False


def _pruned_adalora(folder: Path, seed: int) -> Path:
    """A PEFT 0.21 AdaLoRA folder after budget pruning, as ``resize_state_dict_by_rank_pattern`` saves it: a
    ``rank_pattern`` mask per module (one module pruned to rank 0, with zero-sized tensors) and its tensors cut."""
    import peft
    from safetensors.numpy import load_file, save_file

    from adapterkit.testing import TINY_MODELS, perturb

    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=10, task_type="CAUSAL_LM"))
    perturb([p for p in model.parameters() if p.requires_grad], seed=seed, scale=0.2)
    model.save_pretrained(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_E") for k in tensors if k.endswith("lora_E"))
    rng = np.random.default_rng(seed)
    pattern = {}
    for i, module in enumerate(modules):
        mask = [False] * 4 if i == 0 else [bool(v) for v in rng.random(4) > 0.4]
        pattern[f"{module}.lora_E"] = mask
        keep = np.flatnonzero(mask)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A"] = np.ascontiguousarray(tensors[f"{key}.lora_A"][keep])
        tensors[f"{key}.lora_E"] = np.ascontiguousarray(tensors[f"{key}.lora_E"][keep])
        tensors[f"{key}.lora_B"] = np.ascontiguousarray(tensors[f"{key}.lora_B"][:, keep])
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = config_of(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": pattern}))
    return folder


def test_a_pruned_adalora_loads_in_every_release_without_a_warning(tmp_path, tiny_base_dirs):
    """A module pruned to rank 0: PEFT 0.9.0 cannot resize to rank 0 (so it is left out, adding the same nothing);
    with the base its zero-sized tensors are written as PEFT writes them (no missing-key warning)."""
    import peft
    import torch

    from adapterkit.testing import TINY_MODELS, sample_inputs

    base = tiny_base_dirs["llama"]
    source = _pruned_adalora(tmp_path / "pruned", seed=11)
    ids = sample_inputs()["input_ids"]
    np.save(tmp_path / "ids.npy", ids.numpy())
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(TINY_MODELS["llama"](0), str(source)).eval()
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    for version in PEER_RELEASES:
        out = tmp_path / version
        assert convert(source, out, "--to", "peft", "--peft-version", version, "--base", base).exit_code == 0
        kept = config_of(out)["rank_pattern"]
        assert (len(kept) == len(config_of(source)["rank_pattern"])) == (version != "0.9.0"), kept
        job = {"model": str(base), "adapter": str(out), "inputs": str(tmp_path / "ids.npy"),
               "logits": str(out) + ".npy"}
        report = run_peer(version, [job], tmp_path)[0]
        assert "error" not in report and report["warnings"] == [], report
        assert float(np.abs(np.load(job["logits"]) - theirs).max()) <= ATOL


def test_peft_0_17_under_transformers_4_loads_what_we_write_for_it(tmp_path, tiny_base_dirs):
    """PEFT 0.17.1 (which transformers 5 cannot import) loads every type written for it with our logits, OFT with
    the exact Cayley included; the control: a Cayley-Neumann OFT (0.18's series) is another model in 0.17.1."""
    if not (peer_dir(T4_RELEASE) / "peft" / "__init__.py").is_file() or not T4_PYTHON.is_file():
        pytest.fail(f"PEFT {T4_RELEASE} or the AdapterHub venv is missing: run `make install`", pytrace=False)
    from adapterkit.testing import TINY_MODELS, perturb, sample_inputs

    base = tiny_base_dirs["llama"]
    ids = sample_inputs()["input_ids"]
    np.save(tmp_path / "ids.npy", ids.numpy())
    cases = dict(METHODS)
    cases["lora"] = {"target_modules": TARGETS, "r": 4, "alpha": 16, "use_rslora": True}
    cases["oft"] = {**METHODS["oft"], "use_cayley_neumann": False}
    cases["oft_neumann"] = METHODS["oft"]
    jobs, ours = [], {}
    for seed, (case, config) in enumerate(cases.items()):
        handle = adapterkit.inject(TINY_MODELS["llama"](0), case.removesuffix("_neumann"), config)
        perturb(handle.parameters(), seed=seed, scale=0.2)
        source = adapterkit.save(handle.to_adapter(), tmp_path / "src" / case)
        ours[case] = _logits(adapterkit.load(source), ids)
        out = tmp_path / case
        version = "0.18.0" if case == "oft_neumann" else T4_RELEASE
        result = convert(source, out, "--to", "peft", "--peft-version", version, "--base", base)
        assert result.exit_code == 0, (case, result.stderr)
        if case == "oft_neumann":  # as a 0.17 config: without 0.18's peft_version field
            config_written = config_of(out)
            del config_written["peft_version"]
            (out / "adapter_config.json").write_text(json.dumps(config_written))
        jobs.append({"model": str(base), "adapter": str(out), "inputs": str(tmp_path / "ids.npy"),
                     "logits": str(out) + ".npy", "case": case})
    for job, report in zip(jobs, run_peer(T4_RELEASE, jobs, tmp_path, python=T4_PYTHON)):
        assert report["peft"] == T4_RELEASE and "error" not in report, report
        assert report["unknown_keys"] == [] and report["warnings"] == [], report
        diff = float(np.abs(np.load(job["logits"]) - ours[job["case"]]).max())
        print(f"PEFT {T4_RELEASE} (transformers 4) loads our {job['case']}: max |logit diff| {diff:.3g}")
        if job["case"] == "oft_neumann":
            assert diff > 1e-3, diff
        else:
            assert diff <= ATOL, (job["case"], diff)


def test_vera_of_several_shapes_for_a_release_before_0_12_is_refused(judged, tmp_path):
    """PEFT 0.11 raises on VeRA targets of different shapes (q_proj 32->32, v_proj 32->16 here)."""
    source = judged["root"] / "src" / "vera"
    refused(convert(source, tmp_path / "v", "--to", "peft", "--peft-version", "0.11.1"), "$.targets", "0.12.0")
    assert not (tmp_path / "v").exists()
