"""Every adapterkit command works with the installed adapterkit-ia3 exactly as with a built-in method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterkit
from adapterkit.testing import TINY_MODELS, outputs, perturb, run_cli, sample_inputs, save_tiny_base

from ia3_helpers import CONFIGS

import torch


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny bases and saved IA3 adapters (adapterkit format), made once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ia3cli")
    paths = {}
    for kind, config in (("llama", CONFIGS["llama"]), ("gpt2", CONFIGS["gpt2"]),
                         ("gpt2ff", {"target_modules": ["c_proj"], "feedforward_modules": ["c_proj"]})):
        base = save_tiny_base(kind.removesuffix("ff"), root / f"base-{kind}", tokenizer=True)
        model = TINY_MODELS[kind.removesuffix("ff")](0)
        handle = adapterkit.inject(model, "ia3", config)
        perturb(handle.parameters(), seed=4, scale=0.5)
        paths[kind] = (base, adapterkit.save(handle.to_adapter(), root / f"ia3-{kind}"))
    yield root, paths
    torch.set_num_threads(threads)


def cli(*args: str):
    from adapterkit.cli.main import cli as group  # the `adapterkit` console script

    return CliRunner().invoke(group, list(args))


def test_plugins_lists_ia3_next_to_the_built_ins():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    entries = json.loads(result.stdout)
    names = [e["name"] for e in entries]
    ia3 = entries[names.index("ia3")]
    assert ia3["distribution"] == "adapterkit-ia3" and ia3["version"] == "0.2.0" and ia3["module"] == "adapterkit_ia3"
    assert ia3["methods"] == ["ia3"] and ia3["formats"] == [] and ia3["codecs"] == ["peft:IA3"] and ia3["errors"] == []
    assert ia3["method_capabilities"] == {"ia3": {"capabilities": ["MergedWeight", "MergedBias", "Composable"],
                                                  "merge": True, "compose": ["linear"], "runtime_composition": [],
                                                  "adapter_pool": False}}
    assert names.index("lora") < names.index("ia3")  # built-ins first, then third parties
    text = run_cli("plugins").stdout
    assert "ia3  [ok]  adapterkit-ia3 0.2.0  (adapterkit_ia3)" in text
    assert run_cli("schema", "--method", "ia3").returncode == 0


def test_validate_and_inspect(work):
    _, paths = work
    base, adapter = paths["llama"]
    result = cli("validate", str(adapter), "--base", str(base))
    assert result.exit_code == 0 and result.stdout.startswith(f"valid: {adapter} (adapterkit, ia3)"), result.output
    report = json.loads(cli("validate", str(adapter), "--json").stdout)
    assert report["valid"] and report["method"] == "ia3"
    result = cli("inspect", str(adapter))
    assert result.exit_code == 0 and "ia3" in result.stdout, result.output
    info = json.loads(cli("inspect", str(adapter), "--json").stdout)
    assert info["method"] == "ia3" and info["parameters"] == 2 * (16 + 16 + 64)
    # a tampered config is refused with the method's schema
    manifest = json.loads((adapter / "adapter.json").read_text())
    manifest["method"]["config"]["target_modulez"] = ["x"]
    bad = adapter.parent / "tampered"
    bad.mkdir()
    for file in adapter.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    (bad / "adapter.json").write_text(json.dumps(manifest))
    result = cli("validate", str(bad))
    assert result.exit_code == 1 and "target_modulez" in result.stdout


def test_convert_to_and_from_peft(work):
    """The built-in peft format writes and reads PEFT IA3 folders through the plugin's codec."""
    root, paths = work
    base, adapter = paths["gpt2"]
    peft_dir, back = root / "conv-peft", root / "conv-back"
    result = cli("convert", str(adapter), str(peft_dir), "--to", "peft")
    assert result.exit_code == 0, result.output
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "IA3"
    import peft

    inputs = sample_inputs()
    theirs = outputs(peft.PeftModel.from_pretrained(TINY_MODELS["gpt2"](0), str(peft_dir)).eval(), inputs)
    ours = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["gpt2"](0)), inputs)
    assert (theirs - ours).abs().max().item() <= 1e-5
    result = cli("validate", str(peft_dir), "--base", str(base))  # auto-detected
    assert result.exit_code == 0 and "(peft, ia3)" in result.stdout, result.output
    result = cli("validate", str(peft_dir))
    assert result.exit_code == 1 and "base model is needed" in result.stdout
    result = cli("convert", str(peft_dir), str(back), "--from", "peft", "--to", "adapterkit", "--base", str(base))
    assert result.exit_code == 0, result.output
    one, two = adapterkit.load(adapter), adapterkit.load(back)
    assert one.targets == two.targets and sorted(one.tensors) == sorted(two.tensors)
    for key in one.tensors:
        assert one.tensors[key].tobytes() == two.tensors[key].tobytes(), key
    assert cli("validate", str(back)).exit_code == 0


def merged_logits_match(base: Path, adapter: Path, merged: Path, kind: str) -> float:
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs()
    applied = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS[kind](0)), inputs)
    got = outputs(AutoModelForCausalLM.from_pretrained(merged).eval(), inputs)
    return (got - applied).abs().max().item()


def test_merge(work):
    root, paths = work
    # bias-free Linear outputs and inputs; Conv1D inputs (rows of [in, out]); Conv1D outputs with a bias
    # (GPT-2's c_attn: merged_bias scales it too)
    for name in ("llama", "gpt2ff", "gpt2"):
        base, adapter = paths[name]
        out = root / f"merged-{name}"
        result = cli("merge", str(adapter), "--base", str(base), "-o", str(out))
        assert result.exit_code == 0, result.output
        assert merged_logits_match(base, adapter, out, name.removesuffix("ff")) <= 1e-5


def test_export_onnx_merged(work):
    root, paths = work
    base, adapter = paths["gpt2"]  # the torch merge scales biases too, so GPT-2's c_attn exports
    out = root / "onnx"
    result = cli("export", "onnx", str(adapter), "--base", str(base), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file()
    import onnxruntime as ort

    inputs = sample_inputs()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs() if i.name in inputs}
    got = session.run(None, feed)[0]
    applied = outputs(adapterkit.apply(adapterkit.load(adapter), TINY_MODELS["gpt2"](0)), inputs).numpy()
    assert np.abs(got - applied).max() <= 1e-4
    result = cli("export", "onnx", str(adapter), "--base", str(base), "-o", str(root / "onnx2"), "--mode", "swappable")
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_train(work, tmp_path):
    root, paths = work
    base, _ = paths["llama"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n} ->", "completion": f" {n * 2}"}) + "\n" for n in range(24)))
    out = tmp_path / "trained"
    result = cli("train", "--base", str(base), "--method", "ia3", "--data", str(data), "-o", str(out),
                 "--targets", "k_proj,v_proj,down_proj", "--config", 'feedforward_modules=["down_proj"]',
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--max-length", "16", "--json")
    assert result.exit_code == 0, result.output
    trained = adapterkit.load(out)
    assert trained.method == "ia3" and any(not np.all(v == 1) for v in trained.tensors.values())
    assert trained.targets["model.layers.0.mlp.down_proj"]["feedforward"] is True
    assert cli("validate", str(out), "--base", str(base)).exit_code == 0


def test_bench(work):
    _, paths = work
    base, adapter = paths["llama"]
    result = cli("bench", str(adapter), "--base", str(base), "--repeats", "1", "--seq-len", "8", "--batch-sizes", "1",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "ia3"


def test_compose_through_the_plugin_hook(work):
    """compose runs the plugin's strategy; the result validates, applies and equals the weighted sum."""
    root, paths = work
    base, adapter = paths["llama"]
    out = root / "composed"
    result = cli("compose", str(adapter), str(adapter), "-o", str(out), "--strategy", "linear", "--weights", "0.5,0.25")
    assert result.exit_code == 0, result.output
    assert "ia3 linear of 2 adapters" in result.output
    assert cli("validate", str(out), "--base", str(base)).exit_code == 0
    source, composed = adapterkit.load(adapter), adapterkit.load(out)
    for key, vector in source.tensors.items():
        np.testing.assert_array_equal(composed.tensors[key], vector * np.float32(0.5) + vector * np.float32(0.25))
    refused = cli("compose", str(adapter), str(adapter), "-o", str(root / "x"), "--strategy", "svd")
    assert refused.exit_code == 1 and "no compose strategy 'svd'" in refused.output and "linear" in refused.output
    assert "Traceback" not in refused.output and not (root / "x").exists()