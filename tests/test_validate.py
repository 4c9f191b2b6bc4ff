"""adapterkit.validate: one test per error class, base-model checks, JSON reports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import adapterkit
from adapterkit.core.store import consistency as validate_mod
from adapterkit.core.format.manifest import Manifest
from adapterkit.core.store.native import TENSOR_FILE
from helpers import (
    bert_targets,
    edit_manifest,
    error_codes,
    gpt2_targets,
    load_tensors,
    make_lora_adapter,
    raw_safetensors,
    replace_tensor_file,
    replace_tensors,
    write_adapter,
)

Q0 = "model.layers.0.self_attn.q_proj"
LLAMA_BASE = {"model_type": "llama", "architecture": "LlamaForCausalLM"}


def validate(folder: Path, **kwargs) -> adapterkit.ValidationReport:
    report = adapterkit.validate(folder, **kwargs)
    # every report, valid or not, is plain JSON
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    return report


def only_error(report) -> adapterkit.AdapterkitError:
    assert not report.valid
    assert len(report.errors) == 1, [str(e) for e in report.errors]
    return report.errors[0]


# ---- a valid adapter -----------------------------------------------------------

def test_valid_adapter(tmp_path):
    report = validate(write_adapter(tmp_path))
    assert report.valid and report.errors == []
    data = report.to_dict()
    assert data["valid"] is True and data["format"] == "adapterkit" and data["method"] == "lora"
    assert "manifest schema" in data["checks"]
    assert any("sha256" in c for c in data["checks"])
    assert any("--base" in c for c in data["not_checked"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_valid_adapter_in_other_dtypes(tmp_path, dtype):
    assert validate(write_adapter(tmp_path, dtype=dtype)).valid


def test_valid_conv1d_adapter(tmp_path):
    assert validate(write_adapter(tmp_path, targets=gpt2_targets())).valid


# ---- one test per error ----------------------------------------------------------

def test_bad_json(tmp_path):
    folder = write_adapter(tmp_path)
    (folder / "adapter.json").write_bytes(b'{"format": "adapterkit",')
    err = only_error(validate(folder))
    assert err.code == "bad_json"
    assert "not valid JSON" in str(err) and "adapter.json" in str(err)


def test_manifest_not_an_object(tmp_path):
    folder = write_adapter(tmp_path)
    (folder / "adapter.json").write_bytes(b"[1, 2]")
    err = only_error(validate(folder))
    assert err.code == "schema" and err.location == "$"
    assert "must be a JSON object" in str(err) and "list" in str(err)


def test_schema_error_in_method_config(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["method"]["config"].update(r=0))
    err = only_error(validate(folder))
    assert err.code == "schema"
    assert "$.method.config.r" in str(err) and "minimum" in str(err)
    assert str(err).endswith("adapter.json $.method.config.r: 0 is less than the minimum of 1")


def test_schema_error_in_manifest(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d.update(dtype="float8"))
    err = only_error(validate(folder))
    assert err.code == "schema" and err.location == "$.dtype" and "float8" in str(err)


def test_schema_error_in_a_target(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["targets"][Q0].update(kind="embedding"))
    err = only_error(validate(folder))
    assert err.location == f'$.targets["{Q0}"].kind' and "embedding" in str(err)


def test_unknown_method(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["method"].update(name="vera_x"))
    err = only_error(validate(folder))
    assert err.code == "unknown_method" and err.location == "$.method.name"
    assert "'vera_x'" in str(err) and "lora" in str(err) and "install the plugin" in str(err)
    assert err.file.endswith("adapter.json")


def test_missing_tensor_file(tmp_path):
    folder = write_adapter(tmp_path)
    (folder / TENSOR_FILE).unlink()
    err = only_error(validate(folder))
    assert err.code == "missing_file" and TENSOR_FILE in str(err) and "missing" in str(err)


def test_size_mismatch(tmp_path):
    folder = write_adapter(tmp_path)
    size = (folder / TENSOR_FILE).stat().st_size
    with open(folder / TENSOR_FILE, "ab") as handle:
        handle.write(b"\0" * 8)
    err = only_error(validate(folder))
    assert err.code == "size_mismatch" and isinstance(err, adapterkit.IntegrityError)
    assert err.expected == size and err.found == size + 8
    assert "size" in str(err) and TENSOR_FILE in str(err)


def test_sha256_mismatch(tmp_path):
    folder = write_adapter(tmp_path)
    path = folder / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    err = only_error(validate(folder))
    assert err.code == "checksum" and isinstance(err, adapterkit.IntegrityError)
    assert "sha256" in str(err) and "corrupt" in str(err)


def test_malformed_safetensors_header(tmp_path):
    folder = write_adapter(tmp_path)
    replace_tensor_file(folder, raw_safetensors([1, 2, 3]))
    err = only_error(validate(folder))
    assert err.code == "bad_header" and isinstance(err, adapterkit.TensorFileError)
    assert "header must be a JSON object" in str(err) and TENSOR_FILE in str(err)


def test_truncated_safetensors(tmp_path):
    folder = write_adapter(tmp_path)
    replace_tensor_file(folder, (folder / TENSOR_FILE).read_bytes()[:-4])
    err = only_error(validate(folder))
    assert isinstance(err, adapterkit.TensorFileError) and err.code in ("truncated", "bad_header")


def test_missing_expected_tensor(tmp_path):
    folder = write_adapter(tmp_path)
    tensors = load_tensors(folder)
    del tensors[f"{Q0}.lora.B"]
    replace_tensors(folder, tensors)
    err = only_error(validate(folder))
    assert err.code == "missing_tensor" and err.location == f"{Q0}.lora.B"
    assert "missing" in str(err) and "[32, 4]" in str(err)


def test_wrong_shape(tmp_path):
    folder = write_adapter(tmp_path)
    tensors = load_tensors(folder)
    tensors[f"{Q0}.lora.A"] = np.ones((5, 32), np.float32)
    replace_tensors(folder, tensors)
    err = only_error(validate(folder))
    assert err.code == "shape" and err.location == f"{Q0}.lora.A"
    assert err.expected == [4, 32] and err.found == [5, 32]
    assert "expected [4, 32], found [5, 32]" in str(err)


def test_a_target_that_makes_empty_tensors_is_refused():
    """No adapter tensor is empty (docs/format.md): whatever a method's own checks say, a target whose expected
    tensors have an empty dimension is refused per tensor, also where the adapter holds exactly those tensors."""
    adapter = make_lora_adapter()
    adapter.targets[Q0]["r"] = 0
    adapter.tensors[f"{Q0}.lora.A"] = adapter.tensors[f"{Q0}.lora.A"][:0]
    adapter.tensors[f"{Q0}.lora.B"] = adapter.tensors[f"{Q0}.lora.B"][:, :0]
    errors = validate_mod.structure_errors(adapter, adapterkit.default_registry())
    empty = [e for e in errors if e.code == "empty_tensor"]
    assert sorted(e.location for e in empty) == [f"{Q0}.lora.A", f"{Q0}.lora.B"], [e.code for e in errors]
    assert "rank 0" in empty[0].hint and "shape" not in [e.code for e in errors]


def test_unexpected_tensor(tmp_path):
    folder = write_adapter(tmp_path)
    tensors = load_tensors(folder)
    tensors["model.layers.0.mlp.up_proj.lora.A"] = np.ones((4, 32), np.float32)
    replace_tensors(folder, tensors)
    err = only_error(validate(folder))
    assert err.code == "unexpected_tensor" and err.location == "model.layers.0.mlp.up_proj.lora.A"
    assert "unexpected" in str(err)


def test_dtype_mismatch(tmp_path):
    folder = write_adapter(tmp_path)
    tensors = load_tensors(folder)
    tensors[f"{Q0}.lora.A"] = tensors[f"{Q0}.lora.A"].astype(np.float16)
    replace_tensors(folder, tensors)
    err = only_error(validate(folder))
    assert err.code == "dtype" and err.location == f"{Q0}.lora.A"
    assert err.expected == "F32" and err.found == "F16"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_and_inf(tmp_path, dtype):
    folder = write_adapter(tmp_path, dtype=dtype)
    tensors = load_tensors(folder)
    b = tensors[f"{Q0}.lora.B"].copy()
    b[0, 0], b[1, 1], b[2, 2] = np.nan, np.inf, -np.inf
    tensors[f"{Q0}.lora.B"] = b
    replace_tensors(folder, tensors)
    err = only_error(validate(folder))
    assert err.code == "non_finite" and err.location == f"{Q0}.lora.B"
    assert "3 NaN or infinite values" in str(err)


def test_fingerprint_edited_by_hand(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["base_model"].update(fingerprint="sha256:" + "1" * 64))
    err = only_error(validate(folder))
    assert err.code == "fingerprint" and err.location == "$.base_model.fingerprint"
    assert "edited by hand" in str(err)


def test_fingerprint_definition():
    """docs/format.md section 6: sha256 over sorted "<module>.weight:<d0>x<d1>" lines, dtype not included."""
    import hashlib

    from adapterkit.core.format.base_model import fingerprint, targets_fingerprint

    lines = "a.proj.weight:16x32\nb.proj.weight:32x32\n"
    want = "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert fingerprint([("b.proj", (32, 32)), ("a.proj", [16, 32])]) == want
    assert targets_fingerprint({"b.proj": {"shape": [32, 32]}, "a.proj": {"shape": [16, 32], "kind": "x"}}) == want


def test_target_shape_edited_by_hand_breaks_the_fingerprint(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["targets"][Q0].update(shape=[32, 64]))
    report = validate(folder)
    assert "fingerprint" in error_codes(report)
    assert "shape" in error_codes(report)  # A no longer matches [r, in]


def test_path_escape_is_rejected_by_the_schema(tmp_path):
    folder = write_adapter(tmp_path)

    def escape(d):
        d["tensors"] = {"../x.safetensors": d["tensors"][TENSOR_FILE]}

    edit_manifest(folder, escape)
    shutil.copy(folder / TENSOR_FILE, tmp_path / "x.safetensors")
    err = only_error(validate(folder))
    assert err.code == "schema" and err.location == "$.tensors"
    assert "'../x.safetensors' does not match" in str(err)


def test_path_escape_is_rejected_by_the_reader_too(tmp_path):
    """Defence in depth: the tensor reader refuses '..' even when the schema is bypassed."""
    folder = write_adapter(tmp_path)
    data = json.loads((folder / "adapter.json").read_text())
    shutil.copy(folder / TENSOR_FILE, tmp_path / "x.safetensors")
    manifest = Manifest.from_dict(data)
    manifest.tensors = {"../x.safetensors": manifest.tensors[TENSOR_FILE]}
    report = adapterkit.ValidationReport(str(folder))
    from adapterkit.core.store import native

    assert native._read_tensor_files(folder, manifest, "adapter.json", report) is None
    err = only_error(report)
    assert err.code == "path_escape" and err.location == '$.tensors["../x.safetensors"]'


def test_symlink_out_of_the_folder(tmp_path):
    folder = write_adapter(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / TENSOR_FILE, outside)
    (folder / TENSOR_FILE).symlink_to(outside)
    err = only_error(validate(folder))
    assert err.code == "path_escape" and "outside the adapter folder" in str(err)
    with pytest.raises(adapterkit.ManifestError, match="outside the adapter folder"):
        adapterkit.load(folder)


def test_duplicate_key_in_two_files(tmp_path):
    folder = write_adapter(tmp_path)
    shutil.copy(folder / TENSOR_FILE, folder / "more.safetensors")
    edit_manifest(folder, lambda d: d["tensors"].update({"more.safetensors": d["tensors"][TENSOR_FILE]}))
    report = validate(folder)
    assert not report.valid and set(error_codes(report)) == {"duplicate_key"}


def test_missing_path_and_unknown_folder(tmp_path):
    err = only_error(validate(tmp_path / "nope"))
    assert err.code == "missing_file"
    (tmp_path / "empty").mkdir()
    err = only_error(validate(tmp_path / "empty"))
    assert err.code == "unknown_format" and "no installed format" in str(err)


def test_all_problems_are_reported_not_only_the_first(tmp_path):
    folder = write_adapter(tmp_path)
    tensors = load_tensors(folder)
    tensors[f"{Q0}.lora.A"] = np.full((4, 32), np.nan, np.float32)
    tensors["extra.lora.A"] = np.ones((1, 1), np.float32)
    del tensors["model.layers.1.self_attn.v_proj.lora.B"]
    replace_tensors(folder, tensors)
    assert sorted(error_codes(validate(folder))) == ["missing_tensor", "non_finite", "unexpected_tensor"]


def test_load_raises_the_first_error(tmp_path):
    folder = write_adapter(tmp_path)
    edit_manifest(folder, lambda d: d["method"]["config"].update(r=0))
    with pytest.raises(adapterkit.ManifestError, match=r"\$\.method\.config\.r"):
        adapterkit.load(folder)


# ---- --base ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory) -> Path:
    """A llama with hidden size 64 (the adapters here are made for hidden size 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("wide_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_correct_base_passes(tmp_path, tiny_base_dirs):
    folder = write_adapter(tmp_path, base_model=LLAMA_BASE)
    report = validate(folder, base=tiny_base_dirs["llama"])
    assert report.valid, [str(e) for e in report.errors]
    assert report.warnings == []
    assert any("base model" in c for c in report.checks)
    assert not any("--base" in c for c in report.not_checked)


def test_correct_base_passes_for_conv1d_and_prefixed_checkpoints(tmp_path, tiny_base_dirs):
    assert validate(write_adapter(tmp_path, "gpt2", targets=gpt2_targets()), base=tiny_base_dirs["gpt2"]).valid
    # BERT: the task model's paths ("bert.encoder...") are the live model's; without the prefix, apply would
    # not find the modules, so validate refuses them too, naming the path the base has
    assert validate(write_adapter(tmp_path, "bert", targets=bert_targets()), base=tiny_base_dirs["bert"]).valid
    report = validate(write_adapter(tmp_path, "bert2", targets=bert_targets(prefix="")), base=tiny_base_dirs["bert"])
    assert not report.valid and set(error_codes(report)) == {"missing_module"}
    first = report.errors[0]
    assert first.location == "encoder.layer.0.attention.self.query"
    assert "closest module it has is bert.encoder.layer.0.attention.self.query" in str(first)
    assert "lacks the prefix 'bert.'" in first.hint


def test_sharded_base_passes(tmp_path, tiny_base_dirs):
    from models import tiny_llama

    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert validate(write_adapter(tmp_path, base_model=LLAMA_BASE), base=sharded).valid


def test_wrong_base_other_architecture(tmp_path, tiny_base_dirs):
    folder = write_adapter(tmp_path, base_model=LLAMA_BASE)
    report = validate(folder, base=tiny_base_dirs["gpt2"])
    assert not report.valid
    assert set(error_codes(report)) == {"wrong_base", "missing_module"}
    by_location = {e.location: e for e in report.errors}
    assert by_location["model_type"].expected == "llama" and by_location["model_type"].found == "gpt2"
    assert Q0 in by_location and by_location[Q0].code == "missing_module"
    assert "which the base model does not have" in str(by_location[Q0])
    assert [w.location for w in report.warnings] == ["architecture"]


def test_wrong_base_other_hidden_size(tmp_path, wide_llama_dir):
    folder = write_adapter(tmp_path, base_model=LLAMA_BASE)
    report = validate(folder, base=wide_llama_dir)
    assert not report.valid and set(error_codes(report)) == {"wrong_base"}
    shape_errors = {e.location: e for e in report.errors if e.location}
    err = shape_errors[f"{Q0}.weight"]
    assert err.expected == [32, 32] and err.found == [64, 64]
    text = str(err)
    assert Q0 in text and "[32, 32]" in text and "[64, 64]" in text
    v_err = shape_errors["model.layers.1.self_attn.v_proj.weight"]
    assert v_err.expected == [16, 32] and v_err.found == [32, 64]


def test_wrong_base_model_type(tmp_path, tiny_base_dirs):
    base = tmp_path / "renamed"
    shutil.copytree(tiny_base_dirs["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "mistral"
    config["architectures"] = ["MistralForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    report = validate(write_adapter(tmp_path, base_model=LLAMA_BASE), base=base)
    err = only_error(report)
    assert err.code == "wrong_base" and err.location == "model_type"
    assert "expected llama, found mistral" in str(err)
    assert [w.location for w in report.warnings] == ["architecture"]
    assert "LlamaForCausalLM" in str(report.warnings[0]) and "MistralForCausalLM" in str(report.warnings[0])


@pytest.mark.parametrize("architectures", [5, {"x": 1}, "LlamaForCausalLM", [None], []])
def test_base_with_a_malformed_architectures_field(tmp_path, tiny_base_dirs, architectures):
    """A config.json whose "architectures" is not a list of strings is not a crash (and "L" is not an architecture)."""
    base = tmp_path / "odd"
    shutil.copytree(tiny_base_dirs["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = architectures
    (base / "config.json").write_text(json.dumps(config))
    report = validate(write_adapter(tmp_path, base_model=LLAMA_BASE), base=base)
    assert report.valid and report.warnings == []


def test_base_missing(tmp_path):
    folder = write_adapter(tmp_path)
    err = only_error(validate(folder, base=tmp_path / "missing"))
    assert err.code == "base_missing" and isinstance(err, adapterkit.BaseModelError)
    assert "not found" in str(err) and "nothing is downloaded" in str(err)
    (tmp_path / "noconfig").mkdir()
    err = only_error(validate(folder, base=tmp_path / "noconfig"))
    assert err.code == "base_missing" and "config.json" in str(err)


def test_base_without_weights(tmp_path, tiny_base_dirs):
    base = tmp_path / "noweights"
    base.mkdir()
    shutil.copy(tiny_base_dirs["llama"] / "config.json", base)
    err = only_error(validate(write_adapter(tmp_path), base=base))
    assert err.code == "base_missing" and "safetensors" in str(err)


def test_base_is_checked_from_headers_only(tmp_path, tiny_base_dirs, monkeypatch):
    from adapterkit.core.format import safetensors_io

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("validate --base must not read base weights")

    adapter = adapterkit.load(write_adapter(tmp_path, base_model=LLAMA_BASE))
    monkeypatch.setattr(safetensors_io, "read_tensor", no_tensor_reads)
    monkeypatch.setattr(safetensors_io, "load", no_tensor_reads)
    report = adapterkit.ValidationReport("x")
    from adapterkit.core.check.validate import check_base

    check_base(adapter, tiny_base_dirs["llama"], report)
    assert report.valid and report.checks


def test_errors_to_dict_fields(tmp_path, wide_llama_dir):
    report = validate(write_adapter(tmp_path, base_model=LLAMA_BASE), base=wide_llama_dir)
    entry = next(e for e in report.to_dict()["errors"] if e.get("location") == f"{Q0}.weight")
    assert entry == {
        "code": "wrong_base",
        "message": "base weight shape differs from the adapter's target",
        "file": str(wide_llama_dir),
        "location": f"{Q0}.weight",
        "expected": [32, 32],
        "found": [64, 64],
        "hint": "the adapter was made for another base model",
    }


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "bad_json": lambda f: (f / "adapter.json").write_bytes(b"{"),
    "not_utf8": lambda f: (f / "adapter.json").write_bytes(b'{"\xff"}'),
    "size": lambda f: (f / TENSOR_FILE).write_bytes((f / TENSOR_FILE).read_bytes() + b"x"),
    "header": lambda f: replace_tensor_file(f, raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)),
    "version": lambda f: edit_manifest(f, lambda d: d.update(format_version="9.0")),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_reports_are_json_serialisable(tmp_path, name):
    folder = write_adapter(tmp_path)
    CORRUPTIONS[name](folder)
    report = validate(folder)
    assert not report.valid
    json.dumps(report.to_dict(), allow_nan=False)
