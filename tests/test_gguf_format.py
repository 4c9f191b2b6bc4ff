"""The gguf format plugin against llama.cpp's layout, read back with gguf-py's own GGUFReader.

The reference permutation below restates llama.cpp's ``LlamaModel.permute``
(conversion/llama.py) and is applied to the dense weight delta, the way the
converter permutes base q/k weights; the plugin permutes only B's rows, so the
two agree only if the plugin does what llama.cpp's LoraTorchTensor does.

That llama.cpp itself runs the written file as PEFT runs the source is checked by
benchmarks/peer_llama_cpp.py (it needs llama-cpp-python, a ~15 min source build).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import torch
import peft
import gguf

import adapterkit  # noqa: E402
from adapterkit.core.format import safetensors_io  # noqa: E402
from adapterkit.core.errors import FormatError, UsageError  # noqa: E402
import adapterkit.plugins.gguf as gguf_format  # noqa: E402
from adapterkit.plugins.lora import LoraMethod  # noqa: E402
from helpers import registry_with  # noqa: E402
from models import BUILDERS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:fan_in_fan_out")
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
PARTS = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in LLAMA_MODULES}
N_HEAD, N_KV = 4, 2  # tests/models.py tiny_llama


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp conversion/llama.py ``LlamaModel.permute``, restated."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.fixture(scope="module")
def registry():
    return registry_with(("gguf", gguf_format))


def save_peft(folder, kind="llama", **options):
    torch.manual_seed(7)
    config = peft.LoraConfig(init_lora_weights=False, **options)
    model = peft.get_peft_model(BUILDERS[kind](seed=0), config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """r 4, alpha 8; v_proj alpha 16 (fold x2, exact) and o_proj alpha 10 (fold x1.25)."""
    return save_peft(tmp_path_factory.mktemp("peft") / "adapter", r=4, lora_alpha=8, target_modules=LLAMA_MODULES,
                     alpha_pattern={"v_proj": 16, "o_proj": 10})


@pytest.fixture(scope="module")
def written(peft_dir, tiny_base_dirs, registry, tmp_path_factory):
    adapter = adapterkit.load(peft_dir, registry=registry)
    out = adapterkit.save(adapter, tmp_path_factory.mktemp("gguf") / "out", format="gguf", registry=registry,
                          base=tiny_base_dirs["llama"])
    return adapter, out / "adapter.gguf"


def gguf_pairs(file) -> tuple[dict[str, object], dict[str, tuple[np.ndarray, np.ndarray]]]:
    reader = gguf.GGUFReader(file)
    kvs = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    pairs = {name[: -len(".lora_a")]: (np.array(tensors[name].data), np.array(tensors[name[:-1] + "b"].data))
             for name in tensors if name.endswith(".lora_a")}
    return {"kvs": kvs, "tensors": tensors}, pairs


def peft_delta(peft_dir, module: str) -> torch.Tensor:
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors, _ = safetensors_io.load(peft_dir / "adapter_model.safetensors")
    a = torch.from_numpy(tensors[f"base_model.model.{module}.lora_A.weight"]).double()
    b = torch.from_numpy(tensors[f"base_model.model.{module}.lora_B.weight"]).double()
    leaf = module.rsplit(".", 1)[-1]
    alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
    scale = alpha / math.sqrt(config["r"]) if config.get("use_rslora") else alpha / config["r"]
    return b @ a * scale


def test_file_has_llama_cpp_keys_names_shapes_and_types(written, tiny_base_dirs):
    _, file = written
    info, _ = gguf_pairs(file)
    kvs, tensors = info["kvs"], info["tensors"]
    assert kvs["general.architecture"] == "llama"
    assert kvs["general.type"] == "adapter"
    assert kvs["adapter.type"] == "lora"
    assert kvs["adapter.lora.alpha"] == 8.0
    assert gguf.GGUFReader(file).fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    want = {f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_{ab}" for i in (0, 1) for m in LLAMA_MODULES for ab in "ab"}
    assert set(tensors) == want
    base = safetensors_io.read_header(tiny_base_dirs["llama"] / "model.safetensors").tensors
    for i in (0, 1):
        for m in LLAMA_MODULES:
            model_ne = list(reversed(base[f"model.layers.{i}.{PARTS[m]}.{m}.weight"].shape))
            a = tensors[f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_a"]
            b = tensors[f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_b"]
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
            # llama_adapter_lora_init_impl's shape checks, and torch A [r, in] / B [out, r] in ne order
            assert [int(d) for d in a.shape] == [model_ne[0], 4] and [int(d) for d in b.shape] == [4, model_ne[1]]


def test_q_k_rows_of_b_are_permuted_as_llama_cpp_does(written, peft_dir):
    _, file = written
    _, pairs = gguf_pairs(file)
    tensors, _ = safetensors_io.load(peft_dir / "adapter_model.safetensors")
    for i in (0, 1):
        for m, heads in (("q_proj", (N_HEAD, N_HEAD)), ("k_proj", (N_HEAD, N_KV))):
            b = torch.from_numpy(tensors[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.weight"])
            _, b_gguf = pairs[f"blk.{i}.{GGUF_NAMES[m]}.weight"]
            assert torch.equal(torch.from_numpy(b_gguf), llama_cpp_permute(b, *heads))
        _, b_gguf = pairs[f"blk.{i}.ffn_up.weight"]
        b = tensors[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"]
        assert np.array_equal(b_gguf, b)


def test_delta_w_from_the_gguf_matches_peft(written, peft_dir, tiny_base_dirs):
    """llama.cpp's ΔW = alpha/rank * B @ A (rank = b->ne[0]) against the converter-permuted base weights."""
    _, file = written
    info, pairs = gguf_pairs(file)
    alpha = info["kvs"]["adapter.lora.alpha"]
    base, _ = safetensors_io.load(tiny_base_dirs["llama"] / "model.safetensors")
    for i in (0, 1):
        for m in LLAMA_MODULES:
            module = f"model.layers.{i}.{PARTS[m]}.{m}"
            a, b = (torch.from_numpy(x).double() for x in pairs[f"blk.{i}.{GGUF_NAMES[m]}.weight"])
            delta_gguf = alpha / b.shape[1] * b @ a
            w = torch.from_numpy(base[f"{module}.weight"]).double()
            want = w + peft_delta(peft_dir, module)
            got = w
            if m in ("q_proj", "k_proj"):
                heads = (N_HEAD, N_HEAD) if m == "q_proj" else (N_HEAD, N_KV)
                want, got = llama_cpp_permute(want, *heads), llama_cpp_permute(w, *heads)
            assert torch.allclose(got + delta_gguf, want, atol=1e-6, rtol=0), module


def test_per_module_alpha_is_folded_into_b(written, peft_dir):
    _, file = written
    info, pairs = gguf_pairs(file)
    tensors, _ = safetensors_io.load(peft_dir / "adapter_model.safetensors")
    meta = json.loads(info["kvs"]["adapterkit.lora"])
    for i in (0, 1):
        b = tensors[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.weight"]
        assert np.array_equal(pairs[f"blk.{i}.attn_v.weight"][1], b * np.float32(2))  # 16 / 8, exact
        assert meta["folds"][f"model.layers.{i}.self_attn.v_proj"] == 2.0
        assert meta["folds"][f"model.layers.{i}.self_attn.o_proj"] == 1.25
    originals = {k[len("adapterkit.lora.b."):] for k in info["kvs"] if k.startswith("adapterkit.lora.b.")}
    # x2 divides back bit for bit; x1.25 does not for every value, so the original B rides along in a KV
    assert originals == {"blk.0.attn_output.weight", "blk.1.attn_output.weight"}


def test_round_trip_peft_gguf_adapterkit_peft(written, peft_dir, registry, tmp_path):
    adapter, file = written
    back = adapterkit.load(file, registry=registry)
    assert back.manifest.to_dict() == adapter.manifest.to_dict()
    assert set(back.tensors) == set(adapter.tensors)
    for key, array in adapter.tensors.items():
        assert back.tensors[key].dtype == array.dtype and back.tensors[key].tobytes() == array.tobytes(), key
    out = adapterkit.save(back, tmp_path / "peft", format="peft", registry=registry)
    a, _ = safetensors_io.load(peft_dir / "adapter_model.safetensors")
    b, _ = safetensors_io.load(out / "adapter_model.safetensors")
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((peft_dir / "adapter_config.json").read_text())


def test_gguf_rewrite_is_byte_identical(written, registry, tiny_base_dirs, tmp_path):
    _, file = written
    back = adapterkit.load(file, registry=registry)
    out = adapterkit.save(back, tmp_path / "again", format="gguf", registry=registry, base=tiny_base_dirs["llama"])
    assert (out / "adapter.gguf").read_bytes() == file.read_bytes()
    native = adapterkit.save(back, tmp_path / "native", registry=registry)  # schema-valid manifest
    assert adapterkit.load(native, registry=registry).manifest.targets == back.manifest.targets


def write_like_convert_lora_to_gguf(peft_dir, file, n_blocks=2):
    """What llama.cpp's converter writes for a uniform-alpha PEFT adapter (no adapterkit KV)."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors, _ = safetensors_io.load(peft_dir / "adapter_model.safetensors")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        base_name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        a, b = tensors[key], torch.from_numpy(tensors[key.replace("lora_A", "lora_B")])
        if base_name.endswith("q_proj.weight"):
            b = llama_cpp_permute(b, N_HEAD, N_HEAD)
        if base_name.endswith("k_proj.weight"):
            b = llama_cpp_permute(b, N_HEAD, N_KV)
        name = name_map.get_name(base_name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name + ".lora_a", a)
        writer.add_tensor(name + ".lora_b", b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_a_llama_cpp_converted_file(tmp_path, tiny_base_dirs, registry):
    peft_dir = save_peft(tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"])
    file = tmp_path / "third_party.gguf"
    write_like_convert_lora_to_gguf(peft_dir, file)
    with pytest.raises(FormatError, match="--base") as error:
        adapterkit.load(file, registry=registry)
    assert "n_kv_head" in error.value.message
    adapter = adapterkit.load(file, registry=registry, base=tiny_base_dirs["llama"])
    original = adapterkit.load(peft_dir, registry=registry)
    assert adapter.targets == original.targets
    for key, array in original.tensors.items():
        assert adapter.tensors[key].tobytes() == array.tobytes(), key
    assert adapter.manifest.provenance["converted_from"]["config"]["adapter.lora.alpha"] == 16.0
    method = LoraMethod()
    for module, target in adapter.targets.items():
        got = method.delta_weight(module, target, adapter.config, adapter.tensors)
        assert np.allclose(got, peft_delta(peft_dir, module).float().numpy(), atol=1e-6)


def test_changed_tensors_fall_back_to_llama_cpp_semantics(written, registry, tiny_base_dirs, tmp_path):
    """The adapterkit KV is tied to the tensors by a digest: edit one and the file reads as llama.cpp sees it."""
    _, file = written
    edited = copy_gguf(file, tmp_path / "edited.gguf",
                       lambda name, array: array * np.float32(2) if name == "blk.0.ffn_up.weight.lora_b" else array)
    adapter = adapterkit.load(edited, registry=registry, base=tiny_base_dirs["llama"])
    assert any("no longer matches" in w for w in adapter.warnings)
    assert {t["alpha"] for t in adapter.targets.values()} == {8}  # the global alpha; folds stay in B
    _, pairs = gguf_pairs(edited)
    assert adapter.tensors["model.layers.0.self_attn.v_proj.lora.B"].tobytes() == pairs["blk.0.attn_v.weight"][1].tobytes()
    assert adapter.manifest.provenance["converted_from"]["format"] == "gguf"


def test_write_refuses_without_base(written, registry, tmp_path):
    adapter, _ = written
    with pytest.raises(FormatError, match="GGUF needs --base"):
        adapterkit.save(adapter, tmp_path / "x", format="gguf", registry=registry)
    with pytest.raises(UsageError, match="unknown option"):
        adapterkit.save(adapter, tmp_path / "y", format="gguf", registry=registry, bsae="x")


def test_rslora_uses_the_global_alpha_without_folding(tmp_path, tiny_base_dirs, registry):
    peft_dir = save_peft(tmp_path / "peft", r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"])
    adapter = adapterkit.load(peft_dir, registry=registry)
    out = adapterkit.save(adapter, tmp_path / "gguf", format="gguf", registry=registry, base=tiny_base_dirs["llama"])
    info, pairs = gguf_pairs(out / "adapter.gguf")
    assert info["kvs"]["adapter.lora.alpha"] == pytest.approx(12.0)  # 6 * sqrt(4): scale alpha/r == 6/sqrt(4)
    assert json.loads(info["kvs"]["adapterkit.lora"])["folds"] == {}
    a, b = (torch.from_numpy(x).double() for x in pairs["blk.1.attn_v.weight"])
    assert torch.allclose(12.0 / 4 * b @ a, peft_delta(peft_dir, "model.layers.1.self_attn.v_proj"), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(written, registry, tiny_base_dirs, tmp_path, dtype):
    adapter, _ = written
    import copy

    import ml_dtypes

    low = copy.deepcopy(adapter)
    low.manifest.dtype = dtype
    low.tensors = {k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16) for k, v in adapter.tensors.items()}
    out = adapterkit.save(low, tmp_path / dtype, format="gguf", registry=registry, base=tiny_base_dirs["llama"])
    info, _ = gguf_pairs(out / "adapter.gguf")
    want = gguf.GGMLQuantizationType.BF16 if dtype == "bfloat16" else gguf.GGMLQuantizationType.F16
    assert {t.tensor_type for t in info["tensors"].values()} == {want}
    back = adapterkit.load(out, registry=registry)
    assert back.manifest.dtype == dtype
    assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in low.tensors.items())


def test_gpt2_conv1d_and_qwen2(tmp_path, tiny_base_dirs, registry):
    peft_dir = save_peft(tmp_path / "gpt2", kind="gpt2", r=4, lora_alpha=8, fan_in_fan_out=True,
                         target_modules=["c_attn", "c_proj", "c_fc"])
    adapter = adapterkit.load(peft_dir, registry=registry)
    out = adapterkit.save(adapter, tmp_path / "g", format="gguf", registry=registry, base=tiny_base_dirs["gpt2"])
    info, pairs = gguf_pairs(out / "adapter.gguf")
    assert info["kvs"]["general.architecture"] == "gpt2"
    assert {"blk.0.attn_qkv.weight", "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= set(pairs)
    a, b = pairs["blk.0.attn_qkv.weight"]  # unchanged A [r, in], B [out, r]: ne [32, r] / [r, 96] as llama.cpp checks
    assert a.tobytes() == adapter.tensors["transformer.h.0.attn.c_attn.lora.A"].tobytes() and b.shape == (96, 4)
    back = adapterkit.load(out, registry=registry)
    assert all(back.tensors[k].tobytes() == v.tobytes() for k, v in adapter.tensors.items())

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    qwen.save_pretrained(tmp_path / "qwen")
    qwen_peft = peft.get_peft_model(qwen, peft.LoraConfig(init_lora_weights=False, r=2, target_modules=["q_proj"]))
    qwen_peft.save_pretrained(tmp_path / "qpeft")
    adapter = adapterkit.load(tmp_path / "qpeft", registry=registry)
    out = adapterkit.save(adapter, tmp_path / "q", format="gguf", registry=registry, base=tmp_path / "qwen")
    info, pairs = gguf_pairs(out / "adapter.gguf")
    assert info["kvs"]["general.architecture"] == "qwen2"
    assert pairs["blk.0.attn_q.weight"][1].tobytes() == adapter.tensors["model.layers.0.self_attn.q_proj.lora.B"].tobytes()


def test_detect(written, registry, tmp_path, peft_dir):
    _, file = written
    fmt = registry.format("gguf")
    assert fmt.detect(file) and fmt.detect(file.parent)
    assert adapterkit.detect_format(file, registry=registry) == "gguf"
    assert not fmt.detect(peft_dir)
    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not fmt.detect(model)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 4)
    assert not fmt.detect(tmp_path / "junk.gguf")


def copy_gguf(src, dest, transform=lambda name, array: array, skip=("general.architecture",)):
    """Copy a GGUF file KV by KV and tensor by tensor through ``transform`` (gguf-py only)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, transform(tensor.name, gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
