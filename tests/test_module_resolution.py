"""core/format/module_index.py: validate --base, merge and apply resolve an adapter's modules alike.

The contract: no adapter that ``validate --base B`` calls valid is refused by ``apply`` on the model
loaded from B, and an adapter naming a module B lacks is refused by all three, naming the module and
the closest path B has. The sweep runs every built-in method, and every format that writes it, through
both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterkit
from adapterkit.cli.main import cli
from adapterkit.core.errors import AdapterkitError, BaseModelError
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import read_base_model
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.format.module_index import ModuleIndex, resolve_targets
from adapterkit.core.runtime.models import load_base
from adapterkit.testing import TINY_MODELS, perturb

from helpers import error_codes


def peft_lora(folder: Path, kind: str = "llama", **options) -> Path:
    import peft

    torch.manual_seed(7)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False,
                                "target_modules": ["q_proj", "v_proj"], **options})
    peft.get_peft_model(TINY_MODELS[kind](0), config).save_pretrained(folder)
    return folder


def with_extra_prefix(folder: Path, out: Path) -> Path:
    """The PEFT folder with one ``model.`` too many in every tensor key (a broken export)."""
    shutil.copytree(folder, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.", "base_model.model.model.", 1): v for k, v in tensors.items()},
              out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def wrong_prefix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wrong_prefix")
    return with_extra_prefix(peft_lora(root / "good"), root / "wrong")


def test_wrong_prefix_is_invalid_under_validate_base_and_apply_refuses_it(wrong_prefix, tiny_base_dirs):
    base = tiny_base_dirs["llama"]
    assert adapterkit.validate(wrong_prefix).valid  # nothing to resolve against without a base
    report = adapterkit.validate(wrong_prefix, base=base)
    assert not report.valid and set(error_codes(report)) == {"missing_module"}
    first = report.errors[0]
    assert first.location == "model.model.layers.0.self_attn.q_proj"
    assert "closest module it has is model.layers.0.self_attn.q_proj" in str(first)
    assert "prefix 'model.' too many" in first.hint
    assert len(report.errors) == 4  # every adapted module is named
    with pytest.raises(BaseModelError) as info:
        adapterkit.apply(adapterkit.load(wrong_prefix), load_base(base))
    assert info.value.code == "missing_module" and info.value.location == first.location
    with pytest.raises(BaseModelError, match="model.model.layers.0.self_attn.q_proj"):
        adapterkit.merge(wrong_prefix, base, wrong_prefix.parent / "merged")
    assert not (wrong_prefix.parent / "merged").exists()


def test_wrong_prefix_cli_exit_1_names_the_module(wrong_prefix, tiny_base_dirs):
    result = CliRunner().invoke(cli, ["validate", str(wrong_prefix), "--base", str(tiny_base_dirs["llama"])])
    assert result.exit_code == 1, result.output
    assert "invalid" in result.output and "model.model.layers.0.self_attn.q_proj" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["validate", str(wrong_prefix), "--base", str(tiny_base_dirs["llama"]), "--json"])
    data = json.loads(result.output)
    assert result.exit_code == 1 and not data["valid"]
    assert {e["location"] for e in data["errors"]} >= {"model.model.layers.1.self_attn.v_proj"}


def test_closest_path_and_shapes_come_from_the_same_index(tiny_base_dirs):
    info = read_base_model(tiny_base_dirs["llama"])
    index = ModuleIndex.from_base(info)
    live = adapterkit.core.runtime.inject.live_index(load_base(tiny_base_dirs["llama"]))
    targets = {"model.layers.0.self_attn.q_pro": {"kind": "linear", "shape": [32, 32]},
               "model.layers.1.mlp.up_proj": {"kind": "linear", "shape": [64, 32]},
               "model.layers.0.self_attn.k_proj": {"kind": "linear", "shape": [99, 32]}}
    for idx in (index, live):
        landings, errors = resolve_targets(targets, idx)
        assert set(landings) == {"model.layers.1.mlp.up_proj"}
        by = {e.location: e for e in errors}
        assert by["model.layers.0.self_attn.k_proj.weight"].found == [16, 32]
        assert "closest module it has is model.layers.0.self_attn.q_proj" in str(by["model.layers.0.self_attn.q_pro"])
    # every module of the live model with a weight is in the checkpoint's index, with the same shape
    assert {m: s for m, s in live.shapes.items() if s is not None} == {m: s for m, s in index.shapes.items() if s}


def test_a_tied_head_resolves_in_validate_merge_and_apply(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "tied"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(base)
    model = load_base(base)
    handle = adapterkit.inject(model, "lora", r=2, target_modules=["lm_head", "q_proj"])
    perturb(handle.parameters(), seed=1)
    folder = adapterkit.save(handle.to_adapter(), tmp_path / "a")
    assert "lm_head" in adapterkit.load(folder).targets
    report = adapterkit.validate(folder, base=base)
    assert report.valid, [str(e) for e in report.errors]
    adapterkit.apply(adapterkit.load(folder), load_base(base))
    adapterkit.merge(folder, base, tmp_path / "merged")


# ---- the sweep: every built-in method and the formats that write it ----------------------------

#: (base kind, method, config): one adapter per built-in method (and the example plugin's IA3; peft writes it)
METHOD_CASES = [
    ("llama", "lora", {"r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("gpt2", "lora", {"r": 2, "target_modules": ["c_attn", "c_proj"]}),
    ("bert", "lora", {"r": 2, "target_modules": ["query", "value"]}),
    ("llama", "dora", {"r": 2, "target_modules": ["q_proj", "o_proj"]}),
    ("llama", "qlora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
    ("llama", "prompt", {"num_virtual_tokens": 2}),
    ("llama", "prefix", {"num_virtual_tokens": 2}),
    ("llama", "bottleneck", {}),
    ("bert", "bottleneck", {}),
    ("llama", "ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
]
FORMATS = ("adapterkit", "peft", "mlx", "torchtune", "adapterhub", "gguf", "kohya", "onnx-adapter")


def _fixtures(root: Path, bases: dict[str, Path]) -> list[tuple[str, str, Path]]:
    """(name, base kind, path) of every fixture: each method case written in each format that takes it."""
    registry = adapterkit.default_registry()
    out = []
    for kind, method, config in METHOD_CASES:
        if method not in registry.methods:
            continue
        model = TINY_MODELS[kind](0)
        handle = adapterkit.inject(model, method, config)
        perturb(handle.parameters(), seed=1, scale=0.05)
        adapter = handle.to_adapter(base_name=str(bases[kind]))
        for fmt in FORMATS:
            if fmt not in registry.formats:
                continue
            name = f"{kind}-{method}-{fmt}"
            try:
                path = adapterkit.save(adapter, root / name, fmt, **_write_options(registry.format(fmt), bases[kind]))
            except AdapterkitError:
                continue  # the format cannot hold this method / base (refused before writing)
            out.append((name, kind, path))
    return out


def _write_options(fmt, base: Path) -> dict:
    declared = fmt.write_options
    return {"base": base} if declared is None or "base" in declared else {}


@pytest.fixture(scope="module")
def fixtures(tiny_base_dirs, tmp_path_factory) -> list[tuple[str, str, Path]]:
    return _fixtures(tmp_path_factory.mktemp("sweep"), tiny_base_dirs)


def _renamed(adapter: Adapter, prefix: str) -> Adapter:
    """The same adapter with every module path given ``prefix`` (keys, targets and shared tensors)."""
    manifest = adapter.manifest
    targets = {prefix + m: dict(t) for m, t in manifest.targets.items()}
    tensors = {}
    for key, value in adapter.tensors.items():
        module = next((m for m in manifest.targets if key.startswith(m + ".")), None)
        tensors[prefix + key if module else key] = value
    renamed = Manifest(method=manifest.method, config=dict(manifest.config), targets=targets, dtype=manifest.dtype,
                       base_model={k: v for k, v in manifest.base_model.items() if k != "fingerprint"},
                       task=manifest.task)
    return Adapter(renamed, tensors)


def test_the_sweep_covers_every_built_in_method_and_format(fixtures):
    names = {name for name, _, _ in fixtures}
    methods = {name.split("-")[1] for name in names}
    assert {"lora", "dora", "qlora", "prompt", "prefix", "bottleneck"} <= methods
    formats = {name.split("-", 2)[2] for name in names}
    assert {"adapterkit", "peft", "mlx", "torchtune", "adapterhub", "gguf", "kohya", "onnx-adapter"} <= formats


def test_validate_base_says_valid_only_when_apply_takes_it(fixtures, tiny_base_dirs):
    """Every fixture as written, and with one prefix too many: validate --base agrees with apply."""
    checked = 0
    for name, kind, path in fixtures:
        base = tiny_base_dirs[kind]
        report = adapterkit.validate(path, base=base)
        assert report.valid, (name, [str(e) for e in report.errors])
        adapter = adapterkit.load(path, base=base)
        adapterkit.apply(adapter, load_base(base))  # must not raise
        wrong = _renamed(adapter, "model.")
        folder = adapterkit.save(wrong, path.parent / f"{name}-wrong")
        report = adapterkit.validate(folder, base=base)
        assert not report.valid and "missing_module" in error_codes(report), name
        with pytest.raises(AdapterkitError):
            adapterkit.apply(adapterkit.load(folder), load_base(base))
        checked += 1
    assert checked == len(fixtures) >= 20


def test_a_module_the_base_lacks_is_refused_by_every_method(tiny_base_dirs, tmp_path):
    """One target renamed to a module the base lacks (the rest intact): both refuse, for every method."""
    registry = adapterkit.default_registry()
    for kind, method, config in METHOD_CASES:
        if method not in registry.methods:
            continue
        handle = adapterkit.inject(TINY_MODELS[kind](0), method, config)
        adapter = handle.to_adapter()
        module = sorted(adapter.targets)[0]
        bad = module.rsplit(".", 1)[0] + ".nope"
        manifest = adapter.manifest
        targets = {(bad if m == module else m): t for m, t in manifest.targets.items()}
        tensors = {(bad + k[len(module):] if k.startswith(module + ".") else k): v for k, v in adapter.tensors.items()}
        edited = Adapter(Manifest(method=manifest.method, config=dict(manifest.config), targets=targets,
                                  dtype=manifest.dtype, task=manifest.task), tensors)
        folder = adapterkit.save(edited, tmp_path / f"{kind}-{method}")
        report = adapterkit.validate(folder, base=tiny_base_dirs[kind])
        assert [e.location for e in report.errors if e.code == "missing_module"] == [bad], (method, report.errors)
        with pytest.raises(BaseModelError, match=bad.replace(".", r"\.")):
            adapterkit.apply(adapterkit.load(folder), load_base(tiny_base_dirs[kind]))


def test_index_of_a_checkpoint_without_weights_is_never_used_for_shapes():
    """A module holding only a bias (or buffers) is known, without a weight shape: it still resolves."""
    index = ModuleIndex({"a.b": None, "a.c": (2, 2)}, "base")
    landings, errors = resolve_targets({"a.b": {"shape": [3, 3]}, "a.c": {"shape": [2, 2]}}, index)
    assert set(landings) == {"a.b", "a.c"} and not errors
    assert np.array_equal(np.array(landings["a.c"].shape), [2, 2])
