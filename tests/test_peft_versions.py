"""``convert --to peft --peft-version X``: a config PEFT X accepts, or a clean refusal.

Torch-free first: the release table (plugins/peft/releases.json) against the PEFT installed here,
every release's config keys, and the refusals. Then the acceptance against real old releases: PEFT
0.14.0 and 0.9.0 (``pip install --no-deps --target .venv-peft/X``, run from the main venv, which
has their torch / transformers / accelerate) load our output through tests/peft_peer/peer.py and
give adapterkit's logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.errors import LossyConversionError, UsageError
from adapterkit.plugins.peft import releases
from helpers import REPO, llama_targets, make_lora_adapter, require_methods

ATOL = 1e-5
PEER = REPO / "tests" / "peft_peer" / "peer.py"
PEER_RELEASES = ("0.14.0", "0.9.0")


def peer_dir(version: str) -> Path:
    return REPO / ".venv-peft" / version


def run_peer(version: str, jobs: list[dict], root: Path, python: Path | str = sys.executable) -> list[dict]:
    """tests/peft_peer/peer.py's report of each job, run by ``python`` with PEFT ``version`` first on the path."""
    file = root / f"jobs-{version}-{len(list(root.glob('jobs-*.json')))}.json"
    file.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(peer_dir(version)), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(python), str(PEER), str(file)], capture_output=True, text=True, timeout=600,
                            cwd=REPO, env=env)
    if result.returncode != 0:
        pytest.fail(f"the PEFT {version} peer failed:\n{result.stderr[-4000:]}", pytrace=False)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(jobs), result.stdout[-2000:]
    return reports


def convert(*args: object) -> object:
    result = CliRunner().invoke(cli, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("convert crashed") from result.exception
    return result


def refused(result, *needles: str) -> str:
    """Exit 1, one line on stderr naming every needle."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def native(tmp_path: Path, name: str, **kwargs) -> Path:
    return adapterkit.save(make_lora_adapter(**kwargs), tmp_path / name)


# ---- the table -------------------------------------------------------------------------------

def test_the_table_holds_the_installed_peft_configs():
    """The table's entry for the PEFT installed here: the same fields, in order, with the same defaults."""
    import peft

    table = releases.table()
    assert peft.__version__ in table, f"PEFT {peft.__version__} is not in the table: run tools/peft_releases.py"
    classes = json.loads(releases.TABLE.read_text())["config_classes"]
    for peft_type, name in classes.items():
        real = dataclasses.fields(getattr(peft, name))
        ours = table[peft.__version__]["configs"][peft_type]
        assert [f.name for f in real] == list(ours), peft_type
        for f in real:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(ours[f.name], dict) and "expr" in ours[f.name]:
                continue  # not a literal in the source (an enum member, a config object)
            assert json.loads(json.dumps(default, default=str)) == ours[f.name], (peft_type, f.name)


def test_the_table_goes_back_to_0_3_and_says_when_each_feature_came():
    release = releases.release("0.21.2")
    assert release.added("LORA", "use_dora")[0] == "0.9.0"
    assert release.added("LORA", "use_rslora")[0] == "0.8.0"
    assert release.added("LORA", "rank_pattern")[0] == "0.6.0"
    assert release.added("LORA", "exclude_modules")[0] == "0.14.0"
    assert release.added("LORA", "target_parameters")[0] == "0.17.0"
    assert release.added("IA3")[0] == "0.4.0"
    assert release.added("LOHA")[0] == release.added("LOKR")[0] == "0.6.0"
    assert release.added("VERA")[0] == release.added("BOFT")[0] == "0.11.0"
    assert release.added("LOKR", "rank_dropout_scale")[0] == "0.14.0"  # with the alpha / r scale (the codec's rule)
    assert release.added("OFT", "use_cayley_neumann")[0] == "0.16.0"
    assert release.before("0.21.3") and not release.before("0.21.2") and releases.release("0.9").before("0.10.0")
    assert releases.release("0.13.2")._data["pattern_lookup"] == "joint"
    assert releases.release("0.14.0")._data["pattern_lookup"] == "separate"


@pytest.mark.parametrize(("text", "entry"), [("0.14.0", "0.14.0"), ("0.14", "0.14.0"), ("v0.13.3", "0.13.2"),
                                             ("0.8.1", "0.8.1"), ("1.0.0", "0.21.2")])
def test_a_release_uses_the_newest_table_entry_at_or_below_it(text, entry):
    assert releases.release(text).entry == entry


@pytest.mark.parametrize("text", ["0.2.0", "latest", "0.14.0rc1", 0.1, None])
def test_a_bad_or_too_old_release_is_a_usage_error(text):
    with pytest.raises(UsageError) as caught:
        releases.release(text)
    assert caught.value.location == "peft_version"


# ---- what is written for each release ----------------------------------------------------------

def test_every_release_gets_only_the_fields_it_knows(tmp_path):
    source = native(tmp_path, "lora")
    adapter = adapterkit.load(source)
    for version in releases.table():
        out = tmp_path / f"peft-{version}"
        assert convert(source, out, "--to", "peft", "--peft-version", version).exit_code == 0, version
        config = config_of(out)
        known = releases.table()[version]["configs"]["LORA"]
        assert set(config) <= set(known), (version, set(config) - set(known))
        assert {"r", "lora_alpha", "target_modules", "peft_type"} <= set(config)
        back = adapterkit.load(out)
        assert {m: (t["r"], t["alpha"]) for m, t in back.targets.items()} == \
            {m: (t["r"], t["alpha"]) for m, t in adapter.targets.items()}, version
        for key, value in adapter.tensors.items():
            np.testing.assert_array_equal(back.tensors[key], value)


def test_peft_version_is_written_for_releases_that_have_the_field(tmp_path):
    source = native(tmp_path, "lora")
    convert(source, tmp_path / "a", "--to", "peft", "--peft-version", "0.18")
    convert(source, tmp_path / "b", "--to", "peft", "--peft-version", "0.17.1")
    assert config_of(tmp_path / "a")["peft_version"] == "0.18.0"
    assert "peft_version" not in config_of(tmp_path / "b")


def test_the_library_option_is_the_same(tmp_path):
    out = adapterkit.convert(native(tmp_path, "lora"), tmp_path / "out", "peft", peft_version="0.9.0")
    assert set(config_of(out)) <= set(releases.table()["0.9.0"]["configs"]["LORA"])
    with pytest.raises(UsageError, match="peft_version"):
        adapterkit.convert(native(tmp_path, "lora2"), tmp_path / "mlx", "mlx", peft_version="0.9.0")


# ---- refusals: exit 1, one line, nothing written ----------------------------------------------

def test_a_dora_adapter_for_peft_0_8_is_refused(tmp_path):
    from adapterkit.testing import TINY_MODELS, perturb

    handle = adapterkit.inject(TINY_MODELS["llama"](0), "dora", {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    perturb(handle.parameters(), seed=1, scale=0.1)
    source = adapterkit.save(handle.to_adapter(), tmp_path / "dora")
    out = tmp_path / "out"
    line = refused(convert(source, out, "--to", "peft", "--peft-version", "0.8.0"), "PEFT 0.8.0", "DoRA",
                   "use_dora", "0.9.0")
    assert not out.exists() and not list(tmp_path.glob(".*out*")), line
    assert convert(source, out, "--to", "peft", "--peft-version", "0.9.0").exit_code == 0
    assert config_of(out)["use_dora"] is True


def test_rslora_before_0_8_and_per_module_ranks_before_0_6_are_refused(tmp_path):
    rslora = native(tmp_path, "rslora", config={"r": 4, "alpha": 8, "use_rslora": True,
                                                 "target_modules": ["q_proj", "v_proj"]})
    refused(convert(rslora, tmp_path / "a", "--to", "peft", "--peft-version", "0.7.1"), "rsLoRA", "use_rslora", "0.8.0")
    assert not (tmp_path / "a").exists()
    targets = llama_targets()
    targets["model.layers.1.self_attn.v_proj"]["r"] = 8
    ranks = native(tmp_path, "ranks", targets=targets)
    refused(convert(ranks, tmp_path / "b", "--to", "peft", "--peft-version", "0.5.0"), "rank_pattern", "0.6.0")
    assert not (tmp_path / "b").exists()
    assert convert(ranks, tmp_path / "c", "--to", "peft", "--peft-version", "0.6.0").exit_code == 0
    assert config_of(tmp_path / "c")["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 8}


def test_a_task_type_the_release_lacks_is_refused(tmp_path):
    source = native(tmp_path, "fe", task="feature-extraction")
    refused(convert(source, tmp_path / "a", "--to", "peft", "--peft-version", "0.3.0"), "task_type",
            "FEATURE_EXTRACTION", "0.4.0")
    assert convert(source, tmp_path / "b", "--to", "peft", "--peft-version", "0.4.0").exit_code == 0


@pytest.mark.parametrize(("method", "config", "oldest"), [
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "0.4.0"),
    ("prompt", {"num_virtual_tokens": 2}, "0.3.0"),
    ("prefix", {"num_virtual_tokens": 2}, "0.3.0"),
])
def test_the_other_peft_types_get_their_releases_fields(method, config, oldest, tmp_path, tiny_base_dirs):
    require_methods(method)
    from adapterkit.testing import TINY_MODELS, perturb

    handle = adapterkit.inject(TINY_MODELS["llama"](0), method, config)
    perturb(handle.parameters(), seed=1, scale=0.1)
    source = adapterkit.save(handle.to_adapter(), tmp_path / "src")
    base = tiny_base_dirs["llama"]
    for version in ("0.13.2", oldest):
        out = tmp_path / version
        assert convert(source, out, "--to", "peft", "--peft-version", version, "--base", base).exit_code == 0
        config_written = config_of(out)
        assert set(config_written) <= set(releases.table()[version]["configs"][config_written["peft_type"]])
        back = adapterkit.load(out, base=base)
        for key, value in adapterkit.load(source).tensors.items():
            np.testing.assert_array_equal(back.tensors[key], value)
    before = releases.release(oldest).added(config_of(tmp_path / oldest)["peft_type"])[0]
    if before != "0.3.0":
        refused(convert(source, tmp_path / "old", "--to", "peft", "--peft-version", "0.3.0"), "came with PEFT", before)


def _from_peft_config(tmp_path: Path, name: str, **fields) -> Path:
    """A PEFT LoRA folder written by adapterkit, then given ``fields`` in its config (as another tool wrote it)."""
    folder = adapterkit.save(make_lora_adapter(), tmp_path / name, "peft")
    config = config_of(folder)
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_init_that_only_set_the_starting_factors_becomes_true_one_that_changed_the_base_is_refused(tmp_path):
    eva = _from_peft_config(tmp_path, "eva", init_lora_weights="eva")
    assert convert(eva, tmp_path / "a", "--to", "peft", "--peft-version", "0.13.2").exit_code == 0
    assert config_of(tmp_path / "a")["init_lora_weights"] is True
    assert convert(eva, tmp_path / "b", "--to", "peft", "--peft-version", "0.14.0").exit_code == 0
    assert config_of(tmp_path / "b")["init_lora_weights"] == "eva"
    olora = _from_peft_config(tmp_path, "olora", init_lora_weights="olora")
    refused(convert(olora, tmp_path / "c", "--to", "peft", "--peft-version", "0.11.1"), "init_lora_weights",
            "olora", "0.12.0")
    assert not (tmp_path / "c").exists()


def test_a_field_no_release_knows_is_dropped_when_empty_and_refused_otherwise(tmp_path):
    release = releases.release("0.14.0")
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert release.config("LORA", {**base, "from_the_future": None}) == base
    with pytest.raises(LossyConversionError, match="from_the_future"):
        release.config("LORA", {**base, "from_the_future": {"on": True}})
    with pytest.raises(LossyConversionError, match="has no table"):
        release.config("HRA", base)  # a PEFT type adapterkit writes no codec for


def test_selection_fields_a_release_lacks_are_rewritten_exactly(tmp_path, tiny_base_dirs):
    """exclude_modules (0.14) and layers_to_transform are written as target_modules every release reads alike."""
    targets = {m: t for m, t in llama_targets().items() if ".1." in m}
    source = _from_peft_config(tmp_path, "sel", target_modules=["q_proj", "v_proj", "k_proj"],
                               exclude_modules=["k_proj"], layers_to_transform=[1])
    (source / "adapter_model.safetensors").unlink()
    adapterkit.save(make_lora_adapter(targets), tmp_path / "tmp", "peft")
    (tmp_path / "tmp" / "adapter_model.safetensors").rename(source / "adapter_model.safetensors")
    for version in ("0.13.2", "0.21.2"):
        out = tmp_path / f"out-{version}"
        assert convert(source, out, "--to", "peft", "--peft-version", version, "--base",
                       tiny_base_dirs["llama"]).exit_code == 0
        config = config_of(out)
        assert config.get("exclude_modules") is None and config.get("layers_to_transform") is None, config
        assert set(adapterkit.load(out).targets) == set(targets)


def test_pattern_keys_are_rewritten_for_the_joint_lookup_before_0_14(tmp_path):
    """Before 0.14 one key, found over rank_pattern then alpha_pattern, serves both maps: keys of two styles
    for one module would give it the default rank."""
    targets = llama_targets()
    targets["model.layers.0.self_attn.v_proj"].update(r=8, alpha=16)
    targets["model.layers.1.self_attn.v_proj"].update(alpha=16)
    source = _from_peft_config(tmp_path, "mixed", rank_pattern={"model.layers.0.self_attn.v_proj": 8},
                               alpha_pattern={"v_proj": 16})
    (source / "adapter_model.safetensors").unlink()
    adapterkit.save(make_lora_adapter(targets), tmp_path / "tmp", "peft")
    (tmp_path / "tmp" / "adapter_model.safetensors").rename(source / "adapter_model.safetensors")
    kept = tmp_path / "kept"
    assert convert(source, kept, "--to", "peft", "--peft-version", "0.15.0").exit_code == 0
    assert config_of(kept)["alpha_pattern"] == {"v_proj": 16}  # 0.15 reads the original's keys right
    old = tmp_path / "old"
    assert convert(source, old, "--to", "peft", "--peft-version", "0.13.2").exit_code == 0
    config = config_of(old)
    release = releases.release("0.13.2")
    for module, target in targets.items():
        maps = {"r": (config["r"], config["rank_pattern"]), "lora_alpha": (config["lora_alpha"], config["alpha_pattern"])}
        assert release.pattern_values(module, maps) == {"r": target["r"], "lora_alpha": target["alpha"]}, module
    original = config_of(source)
    wrong = release.pattern_values("model.layers.0.self_attn.v_proj",
                                   {"r": (4, original["rank_pattern"]), "lora_alpha": (8, original["alpha_pattern"])})
    assert wrong == {"r": 4, "lora_alpha": 16}  # what 0.13 would have built from the original's keys


# ---- real old PEFT releases ------------------------------------------------------------------

def _peft_made(tmp_path: Path, name: str, seed: int, **lora) -> Path:
    """A LoRA saved by the PEFT installed here (0.21), B perturbed."""
    import peft
    import torch
    from adapterkit.testing import TINY_MODELS, perturb

    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.LoraConfig(**lora))
    perturb([p for n, p in model.named_parameters() if "lora_" in n], seed=seed, scale=0.1)
    model.save_pretrained(tmp_path / name)
    del torch
    return tmp_path / name


@pytest.fixture(scope="module")
def old_peft(tmp_path_factory, tiny_base_dirs):
    """Our --peft-version output for 0.14.0 and 0.9.0 loaded by those releases; returns reports and logits."""
    missing = [v for v in PEER_RELEASES if not (peer_dir(v) / "peft" / "__init__.py").is_file()]
    if missing:
        pytest.fail("old PEFT releases are missing; from the repository root run:\n" + "\n".join(
            f"  .venv/bin/python -m pip install --no-deps --target .venv-peft/{v} peft=={v}" for v in missing),
            pytrace=False)
    import torch
    from adapterkit.testing import TINY_MODELS, perturb, sample_inputs

    root = tmp_path_factory.mktemp("old_peft")
    base = tiny_base_dirs["llama"]
    ids = sample_inputs()["input_ids"]
    np.save(root / "ids.npy", ids.numpy())
    sources = {
        "patterns_rslora": _peft_made(root, "patterns_rslora", 1, r=4, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "down_proj"],
                                      rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 3}),
        "exclude_layers": _peft_made(root, "exclude_layers", 2, r=2, lora_alpha=4,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                     exclude_modules=["k_proj"], layers_to_transform=[1]),
        "mixed_keys": _peft_made(root, "mixed_keys", 3, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                 rank_pattern={"model.layers.0.mlp.down_proj": 8}, alpha_pattern={"down_proj": 16}),
    }
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "dora", {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    perturb(handle.parameters(), seed=4, scale=0.1)
    sources["dora"] = adapterkit.save(handle.to_adapter(), root / "dora")
    ours, expected = {}, {}
    for case, folder in sources.items():
        adapter = adapterkit.load(folder)
        model = TINY_MODELS["llama"](0).eval()
        adapterkit.apply(adapter, model)
        with torch.no_grad():
            ours[case] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        expected[case] = {m: (t["r"], t["alpha"]) for m, t in adapter.targets.items()}
    runs = {}
    for version in PEER_RELEASES:
        jobs = []
        for case, folder in sources.items():
            out = root / version / case
            result = convert(folder, out, "--to", "peft", "--peft-version", version, "--base", base)
            assert result.exit_code == 0, (case, version, result.stderr)
            jobs.append({"case": case, "model": str(base), "adapter": str(out), "inputs": str(root / "ids.npy"),
                         "logits": str(root / version / f"{case}.npy")})
        if version == "0.9.0":  # the control: the same adapter written for the newest PEFT
            out = root / version / "unfiltered"
            assert convert(sources["patterns_rslora"], out, "--to", "peft").exit_code == 0
            jobs.append({"case": "unfiltered", "model": str(base), "adapter": str(out), "inputs": str(root / "ids.npy"),
                         "logits": str(root / version / "unfiltered.npy")})
        reports = run_peer(version, jobs, root)
        runs[version] = {job["case"]: (report, Path(job["logits"])) for job, report in zip(jobs, reports)}
    return {"runs": runs, "ours": ours, "expected": expected}


@pytest.mark.parametrize("version", PEER_RELEASES)
def test_old_peft_loads_our_output_with_our_logits(old_peft, version):
    for case, ours in old_peft["ours"].items():
        report, logits = old_peft["runs"][version][case]
        assert report["peft"] == version and f".venv-peft/{version}/" in report["peft_file"], report
        assert "error" not in report, (case, report.get("error"), report.get("traceback"))
        assert report["unknown_keys"] == [], (case, report["unknown_keys"])  # the real release's LoraConfig fields
        assert report["warnings"] == [], (case, report["warnings"])
        expected = old_peft["expected"][case]
        assert {m: (v["r"], v["lora_alpha"]) for m, v in report["layers"].items()} == expected, case
        assert all(v["dora"] == (case == "dora") for v in report["layers"].values()), case
        r_default = json.loads((Path(report["adapter"]) / "adapter_config.json").read_text())["r"]
        assert report["peft_config_r"] == report["lora_config_r"] == r_default, case  # 0.14.0's PeftConfig trap
        diff = float(np.abs(np.load(logits) - ours).max())
        print(f"PEFT {version} {case}: max |logit diff| {diff:.3g}")
        assert diff <= ATOL, (case, diff)


def test_old_peft_refuses_the_config_written_for_the_newest(old_peft):
    """The control: without --peft-version, PEFT 0.9.0 cannot even read the config."""
    report, _ = old_peft["runs"]["0.9.0"]["unfiltered"]
    assert "unexpected keyword argument" in report.get("error", ""), report
