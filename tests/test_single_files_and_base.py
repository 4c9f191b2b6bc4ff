"""Single-file outputs (``convert ... a.gguf``) and ``--base`` on every command that reads an adapter.

A destination ending in a single-file format's extension (``.gguf``, ``.onnx_adapter``, kohya's
``.safetensors``) is that file, written atomically; ``inspect``, ``export onnx``, ``merge``, ``bench``
and ``compose`` hand their base to a reader that needs it (torchtune, PEFT prompt tuning).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.errors import AdapterkitError, UsageError
from adapterkit.testing import TINY_MODELS, perturb


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "lora", r=2, target_modules=["q_proj", "v_proj"])
    perturb(handle.parameters(), seed=3)
    return adapterkit.save(handle.to_adapter(), tmp_path_factory.mktemp("single") / "lora")


def same_update(a: adapterkit.Adapter, b: adapterkit.Adapter) -> bool:
    """The two LoRA adapters change every module by the same delta (formats may fold the scale into B)."""
    lora = adapterkit.default_registry().method("lora")

    def delta(adapter: adapterkit.Adapter, module: str) -> np.ndarray:
        return lora.delta_weight(module, adapter.targets[module], adapter.config, adapter.module_tensors(module))

    return set(a.targets) == set(b.targets) and all(np.allclose(delta(a, m), delta(b, m), atol=1e-6) for m in a.targets)


@pytest.mark.parametrize(("fmt", "name", "options"), [
    ("gguf", "a.gguf", ("--base", "llama")),
    ("onnx-adapter", "a.onnx_adapter", ()),
    ("kohya", "a.safetensors", ()),
])
def test_a_destination_with_the_formats_extension_is_that_file(lora, tmp_path, tiny_base_dirs, fmt, name, options):
    options = tuple(str(tiny_base_dirs["llama"]) if o == "llama" else o for o in options)
    dst = tmp_path / name
    result = run("convert", lora, dst, "--to", fmt, *options)
    assert result.exit_code == 0, result.output
    assert dst.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind
    back = adapterkit.load(dst, base=tiny_base_dirs["llama"])
    assert same_update(adapterkit.load(lora), back)
    # the file exists: refused without --overwrite, untouched; replaced with it
    before = dst.read_bytes()
    result = run("convert", lora, dst, "--to", fmt, *options)
    assert result.exit_code == 1 and "already exists" in result.output and dst.read_bytes() == before
    assert run("convert", lora, dst, "--to", fmt, *options, "--overwrite").exit_code == 0
    assert dst.is_file()


def test_a_folder_destination_still_holds_the_file(lora, tmp_path, tiny_base_dirs):
    out = adapterkit.convert(lora, tmp_path / "folder", "gguf", base=tiny_base_dirs["llama"])
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["adapter.gguf"]


def test_a_refused_single_file_conversion_writes_nothing(tmp_path, tiny_base_dirs):
    handle = adapterkit.inject(TINY_MODELS["llama"](0), "prompt", num_virtual_tokens=2)
    prompt = adapterkit.save(handle.to_adapter(), tmp_path / "prompt")
    with pytest.raises(AdapterkitError):
        adapterkit.convert(prompt, tmp_path / "p.gguf", "gguf", base=tiny_base_dirs["llama"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt"]
    with pytest.raises(UsageError, match="filename"):
        adapterkit.convert(tmp_path / "prompt", tmp_path / "x.onnx_adapter", "onnx-adapter", filename="y.onnx_adapter")


@pytest.fixture(scope="module")
def torchtune_folder(lora, tiny_base_dirs) -> Path:
    return adapterkit.convert(lora, lora.parent / "tt", "torchtune", base=tiny_base_dirs["llama"])


def test_inspect_takes_the_base_a_torchtune_folder_needs(torchtune_folder, tiny_base_dirs):
    result = run("inspect", torchtune_folder)
    assert result.exit_code == 1 and "--base" in result.output
    result = run("inspect", torchtune_folder, "--base", tiny_base_dirs["llama"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "torchtune" and summary["targets"] == 4 and summary["ranks"] == {"2": 4}
    assert adapterkit.inspect(torchtune_folder, tiny_base_dirs["llama"])["parameters"] == summary["parameters"]


def test_merge_compose_and_bench_give_the_base_to_the_reader(torchtune_folder, lora, tiny_base_dirs, tmp_path):
    base = tiny_base_dirs["llama"]
    assert run("merge", torchtune_folder, "--base", base, "-o", tmp_path / "merged").exit_code == 0
    result = run("compose", torchtune_folder, lora, "--strategy", "linear", "-o", tmp_path / "c", "--base", base)
    assert result.exit_code == 0, result.output
    assert run("compose", torchtune_folder, lora, "--strategy", "linear", "-o", tmp_path / "d").exit_code == 1
    report = adapterkit.bench_adapter(torchtune_folder, base, repeats=1, batch_sizes=[1], seq_len=4)
    assert report is not None


def test_export_onnx_gives_its_base_to_a_peft_prompt_folder(tiny_base_dirs, tmp_path):
    import peft

    torch.manual_seed(7)
    model = peft.get_peft_model(TINY_MODELS["llama"](0), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "prompt")
    result = run("export", "onnx", tmp_path / "prompt", "--base", tiny_base_dirs["llama"], "-o", tmp_path / "onnx",
                 "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output[result.output.index("{"):])
    assert manifest["mode"] == "merged" and manifest["adapter"]["method"] == "prompt"
    assert manifest["verification"]["max_abs_diff"]
    assert run("export", "check", tmp_path / "onnx").exit_code == 0
