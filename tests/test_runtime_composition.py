"""Runtime composition: LoRA weighted sums, bottleneck Stack / Average (against AdapterHub), the folder format.

The AdapterHub parity runs the real ``adapters`` 1.3 library in its own venv through
tests/adapterhub_peer/composition_peer.py (one subprocess for the module).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import torch

import adapterkit
from adapterkit.core.runtime.composition import active_composition, activate, apply_composition, deactivate
from adapterkit.core.format.composition import Average, Stack, WeightedSum, parse
from adapterkit.core.store.composition_folder import save_composition
from adapterkit.core.errors import UsageError
from adapterkit.core.plugin.method import Method
from adapterkit.core.plugin.registry import default_registry
from adapterkit.testing import perturb
from models import BUILDERS, sample_inputs

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-adapterhub" / "bin" / "python"
PEER_SCRIPT = REPO / "tests" / "adapterhub_peer" / "composition_peer.py"
REG = default_registry()

LORA_TARGETS = {  # three adapters with different ranks, alphas and targets
    "llama": [dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=2, alpha=3, target_modules=["v_proj", "down_proj"]),
              dict(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"])],
    "gpt2": [dict(r=4, alpha=8, target_modules=["c_attn"]),
             dict(r=2, alpha=5, target_modules=["c_attn", "mlp.c_proj"]),
             dict(r=3, alpha=3, target_modules=["c_fc"])],
}


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or sample_inputs())).logits


def lora_model(kind: str, n: int = 3):
    model = BUILDERS[kind](seed=0).eval()
    names = []
    for index, options in enumerate(LORA_TARGETS[kind][:n]):
        name = "abc"[index]
        handle = adapterkit.inject(model, "lora", options, name=name, registry=REG)
        perturb(handle.parameters(), seed=10 + index, scale=0.3)  # random non-zero B: PEFT's zero B proves nothing
        names.append(name)
    return model, names


def merged_reference(kind: str, model, names, coefficients):
    """A fresh base whose weights hold sum_i c_i * delta_i (numpy deltas from the saved adapters)."""
    ref = BUILDERS[kind](seed=0).eval()
    state = ref.state_dict()
    method = REG.method("lora")
    for name, c in zip(names, coefficients):
        adapter = adapterkit.attached(model)[name].to_adapter()
        for module, target in adapter.targets.items():
            delta = method.delta_weight(module, target, adapter.config, adapter.module_tensors(module))
            state[f"{module}.weight"] += c * torch.from_numpy(delta)
    ref.load_state_dict(state)
    return ref


# ---- LoRA --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_weighted_sum_equals_the_merged_weighted_delta(kind):
    model, names = lora_model(kind)
    weights = [0.7, -0.4, 1.3]
    activate(model, WeightedSum(*names, weights=weights))
    ours = logits(model)
    ref = logits(merged_reference(kind, model, names, weights))
    print(f"{kind} weighted sum vs merged: {float((ours - ref).abs().max()):.2e}", file=sys.stderr)
    assert float((ours - ref).abs().max()) < 1e-5
    assert float((ours - logits(BUILDERS[kind](seed=0).eval())).abs().max()) > 1e-2  # the adapters do something


def test_lora_average_is_adapterhubs_mean_of_weighted_updates():
    model, names = lora_model("llama", 2)
    activate(model, Average(*names, weights=[3.0, 1.0]))  # normalised to [0.75, 0.25], then the mean over 2
    ref = merged_reference("llama", model, names, [0.375, 0.125])
    assert float((logits(model) - logits(ref)).abs().max()) < 1e-5


def test_lora_weights_one_equal_peft_with_both_adapters_active(tmp_path):
    import peft
    model, names = lora_model("llama", 2)
    for name in names:
        adapterkit.save(adapterkit.attached(model)[name].to_adapter(), tmp_path / name, format="peft", registry=REG)
    activate(model, WeightedSum(*names))
    theirs = peft.PeftModel.from_pretrained(BUILDERS["llama"](seed=0).eval(), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    theirs.eval()
    print(f"vs PEFT: {float((logits(model) - logits(theirs)).abs().max()):.2e}", file=sys.stderr)
    assert float((logits(model) - logits(theirs)).abs().max()) < 1e-5


def test_only_members_run_and_deactivate_restores_the_default():
    model, names = lora_model("llama", 3)
    everything = logits(model)  # after injection every adapter runs with weight 1
    activate(model, WeightedSum("a", "c", weights=[1.0, 1.0]))
    only_ac = logits(model)
    assert float((only_ac - logits(merged_reference("llama", model, names, [1, 0, 1]))).abs().max()) < 1e-5
    assert deactivate(model) == WeightedSum("a", "c", weights=[1.0, 1.0])
    assert active_composition(model) is None and deactivate(model) is None
    assert torch.equal(logits(model), everything)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disabled_restores_the_base_exactly_and_save_reload_is_exact(kind, tmp_path):
    base = logits(BUILDERS[kind](seed=0).eval())
    model, names = lora_model(kind)
    active = activate(model, WeightedSum(*names, weights=[0.5, 2.0, -1.0]))
    ours = logits(model)
    with active.disabled():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), ours)
    active.save(tmp_path / "mix", registry=REG)
    assert adapterkit.validate(tmp_path / "mix", registry=REG).valid
    fresh = BUILDERS[kind](seed=0).eval()
    apply_composition(tmp_path / "mix", fresh, registry=REG)
    assert torch.equal(logits(fresh), ours)


def test_lora_refusals_name_the_method_and_the_composition():
    model, names = lora_model("llama", 2)
    with pytest.raises(UsageError, match=r"method 'lora' cannot run a stack composition \(Stack\('a', 'b'\)\)") as exc:
        activate(model, Stack("a", "b"))
    assert exc.value.code == "composition_unsupported"
    with pytest.raises(UsageError, match=r"cannot run a stack composition \(WeightedSum\('a', Stack\('b'\)\)\)"):
        activate(model, WeightedSum("a", Stack("b")))
    with pytest.raises(UsageError, match="'zz' of the composition is not injected") as exc:
        activate(model, WeightedSum("a", "zz"))
    assert exc.value.code == "unknown_adapter"
    with pytest.raises(UsageError, match="finite") as exc:
        activate(model, WeightedSum("a", "b", weights=[1.0, float("nan")]))
    assert exc.value.location == "composition.weights[1]"
    adapterkit.attached(model)["a"].merge()
    with pytest.raises(UsageError, match="merged"):
        activate(model, WeightedSum("a", "b"))
    adapterkit.attached(model)["a"].unmerge()
    activate(model, WeightedSum("a", "b"))
    with pytest.raises(UsageError, match="deactivate"):
        adapterkit.attached(model)["a"].merge()


def test_dora_and_mixed_methods_are_refused():
    model = BUILDERS["llama"](seed=0).eval()
    adapterkit.inject(model, "dora", r=2, alpha=4, target_modules=["q_proj"], name="d1", registry=REG)
    adapterkit.inject(model, "dora", r=2, alpha=4, target_modules=["v_proj"], name="d2", registry=REG)
    with pytest.raises(UsageError, match="method 'dora' cannot run a weighted_sum composition.*no runtime composition"):
        activate(model, WeightedSum("d1", "d2"))
    adapterkit.inject(model, "lora", r=2, alpha=4, target_modules=["k_proj"], name="l1", registry=REG)
    with pytest.raises(UsageError, match="one method") as exc:
        activate(model, WeightedSum("d1", "l1"))
    assert exc.value.code == "mixed_methods"


def test_a_third_party_method_refuses_by_default_and_can_opt_in():
    class Plain(Method):
        name = "plain"

        def config_schema(self):
            return {"type": "object"}

        def expected_tensors(self, module, target, config):
            return {}

        inject = load_state = extract_state = trainable_parameters = None  # type: ignore[assignment]

    from adapterkit import RuntimeComposable
    from adapterkit.core.plugin.capabilities import composition_refusal

    plain = Plain()
    assert composition_refusal(plain, Stack("a")) == (
        "method 'plain' cannot run a stack composition (Stack('a')): it has no runtime composition")

    class Composing(Plain, RuntimeComposable):  # opts in: the capability, its blocks and its two hooks
        composition_kinds = ("stack",)

        def activate_composition(self, model, composition):
            model.running = composition

        def deactivate_composition(self, model):
            model.running = None

    composing = Composing()
    assert composition_refusal(composing, Stack("a")) is None
    assert "runs stack blocks only" in composition_refusal(composing, Average("a", "b"))


def test_blocks_round_trip_through_json():
    block = Stack("c", Average("a", "b", weights=[2, 1], normalize_weights=False))
    assert parse(json.loads(json.dumps(block.to_dict()))) == block
    assert parse("a") == Stack("a") and parse(["a", "b"]) == Stack("a", "b")
    assert Average("a", "b").coefficients() == [0.25, 0.25]
    assert Average("a", "b", weights=[3, 1]).normalized_weights() == [0.75, 0.25]
    assert WeightedSum("a", "b").coefficients() == [1.0, 1.0]
    assert block.members() == ["c", "a", "b"] and block.kinds() == ["average", "stack"]


# ---- bottleneck ---------------------------------------------------------------------------

BN = {  # model kind -> member name -> config
    "llama": {"a": {"preset": "seq_bn", "reduction_factor": 4}, "b": {"preset": "seq_bn", "reduction_factor": 8},
              "c": {"preset": "seq_bn", "reduction_factor": 16}},
    "bert": {"a": {"preset": "seq_bn", "reduction_factor": 4}, "b": {"preset": "seq_bn", "reduction_factor": 8},
             "c": {"preset": "seq_bn", "reduction_factor": 16}},
}
SETUPS = {  # key -> (ours, AdapterHub's to_dict form)
    "stack": (Stack("a", "b"), {"type": "Stack", "children": [{"type": "single", "children": ["a"]},
                                                             {"type": "single", "children": ["b"]}]}),
    "average": (Average("a", "b"), {"type": "Average", "children": [{"type": "single", "children": ["a"]},
                                                                    {"type": "single", "children": ["b"]}]}),
    "average_w": (Average("a", "b", "c", weights=[0.6, 0.3, 0.1]),
                  {"type": "Average", "children": [{"type": "single", "children": [n]} for n in "abc"],
                   "kwargs": {"weights": [0.6, 0.3, 0.1]}}),
    "weighted_sum": (WeightedSum("a", "b", weights=[0.8, 0.4]),  # = Average(normalize_weights=False, weights=n*w)
                     {"type": "Average", "children": [{"type": "single", "children": [n]} for n in "ab"],
                      "kwargs": {"weights": [1.6, 0.8], "normalize_weights": False}}),
    "nested": (Stack("c", Average("a", "b", weights=[0.7, 0.3])),
               {"type": "Stack", "children": [{"type": "single", "children": ["c"]},
                                              {"type": "Average", "children": [{"type": "single", "children": [n]}
                                                                               for n in "ab"],
                                               "kwargs": {"weights": [0.7, 0.3]}}]}),
}


def bottleneck_model(kind: str):
    model = BUILDERS[kind](seed=0).eval()
    for index, (name, config) in enumerate(BN[kind].items()):
        handle = adapterkit.inject(model, "bottleneck", config, name=name, registry=REG)
        perturb(handle.parameters(), seed=20 + index, scale=0.1)
    return model


@pytest.fixture(scope="module")
def adapterhub(tmp_path_factory):
    if not PEER_PYTHON.is_file():
        pytest.fail(f"the AdapterHub peer venv is missing ({PEER_PYTHON}); see tests/test_adapterhub_format.py",
                    pytrace=False)
    root = tmp_path_factory.mktemp("composition_peer")
    ids = sample_inputs()["input_ids"].numpy()
    np.save(root / "ids.npy", ids)
    ours, jobs = {}, []
    for kind in BN:
        BUILDERS[kind](seed=0).save_pretrained(root / kind)
        model = bottleneck_model(kind)
        folders = []
        for name in BN[kind]:
            folder = root / f"{kind}-{name}"
            adapterkit.save(adapterkit.attached(model)[name].to_adapter(), folder, format="adapterhub", name=name,
                            registry=REG)
            folders.append(str(folder))
        for key, (block, _) in SETUPS.items():
            activate(model, block)
            ours[kind, key] = logits(model, {"input_ids": torch.from_numpy(ids),
                                             "attention_mask": torch.ones_like(torch.from_numpy(ids))}).numpy()
        jobs.append({"model": str(root / kind), "adapters": folders, "inputs": str(root / "ids.npy"),
                     "setups": {key: theirs for key, (_, theirs) in SETUPS.items()}, "out": str(root / f"out-{kind}")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([str(PEER_PYTHON), str(PEER_SCRIPT), str(root / "jobs.json")], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"the AdapterHub peer failed:\n{result.stderr[-4000:]}", pytrace=False)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"root": root, "ours": ours, "reports": reports}


@pytest.mark.parametrize("kind", sorted(BN))
@pytest.mark.parametrize("key", sorted(SETUPS))
def test_bottleneck_compositions_equal_adapterhub(adapterhub, kind, key):
    assert adapterhub["reports"][0]["versions"]["adapters"].startswith("1.3.")
    theirs = np.load(adapterhub["root"] / f"out-{kind}" / f"{key}.npy")
    diff = float(np.abs(theirs - adapterhub["ours"][kind, key]).max())
    print(f"{kind} {key}: max abs diff vs AdapterHub {diff:.2e}", file=sys.stderr)
    assert diff < 1e-5
    others = [adapterhub["ours"][kind, k] for k in SETUPS if k != key]
    assert min(float(np.abs(o - adapterhub["ours"][kind, key]).max()) for o in others) > 1e-4  # setups differ


@pytest.mark.parametrize("kind", sorted(BN))
def test_bottleneck_disable_and_save_reload(kind, tmp_path):
    base = logits(BUILDERS[kind](seed=0).eval())
    model = bottleneck_model(kind)
    stacked = logits(model)  # default: every adapter, stacked in insertion order
    active = activate(model, SETUPS["nested"][0])
    ours = logits(model)
    assert not torch.equal(ours, stacked)
    with active.disabled():
        assert torch.equal(logits(model), base)
    active.save(tmp_path / "mix", registry=REG)
    fresh = BUILDERS[kind](seed=0).eval()
    apply_composition(tmp_path / "mix", fresh, registry=REG)
    assert torch.equal(logits(fresh), ours)
    deactivate(model)
    assert torch.equal(logits(model), stacked)


# ---- the folder: save, validate, inspect ---------------------------------------------------

@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A saved LoRA weighted-sum folder with members copied in, and the two members saved alone."""
    root = tmp_path_factory.mktemp("mix")
    model, names = lora_model("llama", 2)
    for name in names:
        adapterkit.save(adapterkit.attached(model)[name].to_adapter(), root / name, registry=REG)
    activate(model, WeightedSum(*names, weights=[1.0, 0.5])).save(root / "copied", registry=REG)
    return root


def _edit(folder: Path, edit) -> Path:
    data = json.loads((folder / "composition.json").read_text())
    edit(data)
    (folder / "composition.json").write_text(json.dumps(data).replace("12345.678", "1e999"))  # 1e999 reads as inf
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_references_are_relative_and_validate(mix, tmp_path):
    out = save_composition(mix / "ref", WeightedSum("a", "b"), {"a": mix / "a", "b": mix / "b"}, registry=REG)
    doc = json.loads((out / "composition.json").read_text())
    assert doc["adapters"] == {"a": {"method": "lora", "path": "../a"}, "b": {"method": "lora", "path": "../b"}}
    assert doc["format"] == "adapterkit-composition" and doc["format_version"] == "1.0"
    report = adapterkit.validate(out, registry=REG)
    assert report.valid and report.format == "adapterkit-composition" and report.method == "lora"
    summary = adapterkit.inspect(out, registry=REG)
    assert summary["members"]["b"]["path"] == "../b" and summary["coefficients"][0]["coefficients"] == [1.0, 1.0]


@pytest.mark.parametrize("edit, location, code", [
    (lambda d: d["composition"].update(weights=[1.0]), "$.composition.weights", "bad_composition"),
    (lambda d: d["composition"]["children"].append("zz"), "$.composition.children[2]", "unknown_adapter"),
    (lambda d: d["composition"].update(weights=[1.0, 12345.678]), "$.composition.weights[1]", "bad_composition"),
    (lambda d: d["adapters"]["b"].update(path="adapters/nope"), '$.adapters.b.path', "missing_file"),
    (lambda d: d["adapters"]["b"].update(method="bottleneck"), '$.adapters.b.method', "member_mismatch"),
    (lambda d: d.update(extra=1), "$", "schema"),
    (lambda d: d["composition"].update(type="stack"), "$.composition", "schema"),
    (lambda d: d.update(format_version="2.0"), "$.format_version", "unsupported_version"),
    (lambda d: d["composition"].update(type="stack", weights=None) or d["composition"].pop("weights"),
     "$.composition", "composition_unsupported"),
])
def test_validate_reports_problems_with_json_paths(mix, tmp_path, edit, location, code):
    folder = _edit(_copy(mix / "copied", tmp_path / "bad"), edit)
    report = adapterkit.validate(folder, registry=REG)
    assert not report.valid
    found = [(e.location, e.code) for e in report.errors]
    assert (location, code) in found, found
    assert all(e.file and e.file.endswith("composition.json") for e in report.errors if e.location.startswith("$"))


def test_newer_minor_fields_are_ignored(mix, tmp_path):
    folder = _edit(_copy(mix / "copied", tmp_path / "newer"),
                   lambda d: d.update(format_version="1.7", future={"x": 1}))
    assert adapterkit.validate(folder, registry=REG).valid


def test_members_of_different_bases_or_a_broken_member_are_reported(mix, tmp_path):
    gpt2 = BUILDERS["gpt2"](seed=0)
    handle = adapterkit.inject(gpt2, "lora", r=2, alpha=2, target_modules=["c_attn"], registry=REG)
    adapterkit.save(handle.to_adapter(), tmp_path / "g", registry=REG)
    folder = _edit(_copy(mix / "copied", tmp_path / "bases"),
                   lambda d: d["adapters"]["b"].update(path="../g"))
    report = adapterkit.validate(folder, registry=REG)
    assert [e.code for e in report.errors] == ["different_bases"]
    (folder / "adapters" / "a" / "adapter.json").write_text("{")
    report = adapterkit.validate(folder, registry=REG)
    assert report.errors[0].message.startswith("member 'a' ($.adapters.a):")


def test_save_refuses_wrong_members_and_unsupported_methods(mix, tmp_path):
    with pytest.raises(UsageError, match="exactly the composition's members"):
        save_composition(tmp_path / "x", WeightedSum("a", "b"), {"a": mix / "a"}, registry=REG)
    with pytest.raises(UsageError, match="method 'lora' cannot run a stack") as exc:
        save_composition(tmp_path / "x", Stack("a", "b"), {"a": mix / "a", "b": mix / "b"}, registry=REG)
    assert exc.value.code == "composition_unsupported" and not (tmp_path / "x").exists()


def test_cli_validate_and_inspect_detect_a_composition(mix):
    from click.testing import CliRunner

    from adapterkit.cli.main import cli

    result = CliRunner().invoke(cli, ["validate", str(mix / "copied"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "adapterkit-composition"
    result = CliRunner().invoke(cli, ["inspect", str(mix / "copied"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["composition"]["type"] == "weighted_sum"
    text = CliRunner().invoke(cli, ["inspect", str(mix / "copied")])
    assert text.exit_code == 0, text.output
    lines = {line.split(None, 1)[0] + (" " + line.split()[1] if line.startswith("member") else ""):
             line.split(None, 2 if line.startswith("member") else 1)[-1] for line in text.output.splitlines()}
    assert lines["composition"] == "weighted_sum(a, b; weights 1, 0.5)" and lines["method"] == "lora"
    assert lines["weighted_sum"] == "output = a x1, b x0.5" and lines["member a"].startswith("adapters/a (adapterkit")
    # the commands that take one adapter say what a composition folder is, and what to do instead
    merged = CliRunner().invoke(cli, ["merge", str(mix / "copied"), "--base", str(mix), "-o", str(mix / "m")])
    assert merged.exit_code == 1 and "a runtime composition folder (composition.json), not an adapter" in merged.output


def test_cli_compose_runtime_writes_the_folder_the_library_writes(mix, tmp_path):
    """`compose --runtime KIND` is save_composition with the inputs copied in: applied to a fresh model it
    gives the logits of the library's folder, bit for bit; a JSON block (and --names) sets every field."""
    from click.testing import CliRunner

    from adapterkit.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "flat"
    result = runner.invoke(cli, ["compose", str(mix / "a"), str(mix / "b"), "-o", str(out),
                                 "--runtime", "weighted_sum", "--weights", "1,0.5"])
    assert result.exit_code == 0, result.output
    assert "runtime weighted_sum composition of a, b" in result.output
    document = json.loads((out / "composition.json").read_text())
    assert document["composition"] == {"type": "weighted_sum", "children": ["a", "b"], "weights": [1.0, 0.5]}
    assert document["adapters"]["a"]["path"] == "adapters/a"  # copied in: the folder stands alone
    ours, library = BUILDERS["llama"](seed=0).eval(), BUILDERS["llama"](seed=0).eval()
    apply_composition(out, ours, registry=REG)
    apply_composition(mix / "copied", library, registry=REG)
    assert torch.equal(logits(ours), logits(library))
    assert runner.invoke(cli, ["validate", str(out)]).exit_code == 0

    tree = '{"type": "average", "children": ["x", "y"], "weights": [1, 3], "normalize_weights": false}'
    result = runner.invoke(cli, ["compose", str(mix / "a"), str(mix / "b"), "-o", str(tmp_path / "tree"),
                                 "--runtime", tree, "--names", "x,y"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "tree" / "composition.json").read_text())["composition"] == {
        "type": "average", "children": ["x", "y"], "weights": [1.0, 3.0], "normalize_weights": False}


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--runtime", "stack", "--strategy", "linear"], 2, "exactly one of --strategy"),
    ([], 2, "exactly one of --strategy"),
    (["--runtime", "average", "--density", "0.5"], 2, "--density: not used with --runtime"),
    (["--runtime", "average", "--names", "x"], 2, "1 name(s) given for 2 adapter(s)"),
    (["--runtime", "average", "--names", "x,x"], 2, "named alike"),
    (["--runtime", "{not json"], 2, "a JSON block tree"),
    (["--runtime", '{"type": "average", "children": ["a", "z"]}'], 1, "exactly the composition's members"),
    (["--strategy", "linear", "--names", "x,y"], 2, "--names names the members"),
])
def test_cli_compose_runtime_refusals(mix, tmp_path, args, code, message):
    from click.testing import CliRunner

    from adapterkit.cli.main import cli

    result = CliRunner().invoke(cli, ["compose", str(mix / "a"), str(mix / "b"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == code and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
