"""Format plugin ``torchtune``: torchtune's native LoRA checkpoint (adapter_model.pt + adapter_config.json).

What torchtune 0.6 does:

- ``LoRALinear`` (``modules/peft/lora.py``): ``lora_a`` ``[r, in]``, ``lora_b`` ``[out, r]``,
  output ``+ (alpha / rank) * lora_b(lora_a(x))``; one ``lora_rank`` and one ``lora_alpha`` per model.
- ``FullModelHFCheckpointer.save_checkpoint`` ``torch.save``\\ s the adapter state dict with
  torchtune keys (``layers.N.attn.q_proj.lora_a.weight``, q/k rows of ``lora_b`` in Meta's
  rotary order) as ``adapter_model.pt``; beside it, a PEFT copy (``adapter_model.safetensors``,
  through ``tune_to_peft_adapter_weights``) and ``adapter_config.json`` (``r``, ``lora_alpha``,
  ``target_modules`` in PEFT names, ``peft_type``, ``base_model_name_or_path``).
- Loading (``safe_torch_load``) reads ``.safetensors`` by suffix, anything else with
  ``torch.load(weights_only=True)``; a resumed run looks for ``adapter_model.pt``. The recipe then
  requires LoRA tensors for every configured module type in every layer
  (``validate_missing_and_unexpected_for_lora``).

So the writer writes ``adapter_model.pt`` (torchtune's name; ``adapter_model.safetensors`` is
PEFT-keyed in torchtune's folders) and ``adapter_config.json`` as the checkpointer does. Modules the
adapter lacks (other layers of an adapted module type) are filled with B = 0, which changes nothing,
and a seeded kaiming-uniform A as torchtune initialises them. Ranks are padded and scales folded into
B (:mod:`adapterkit.plugins.lora.uniform`); the record in adapter_config.json undoes all of it on reading.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import check_tensor_dims, read_torch_tensors, require_consistent
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter
from adapterkit.core.format.base_model import BaseModelInfo
from adapterkit.core.errors import FormatError, LossyConversionError, UsageError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.io import atomic_write_bytes, canonical_json, read_json

from adapterkit.plugins import lora as U
from . import names as N

PT_NAME = "adapter_model.pt"
SAFETENSORS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_NEEDS_BASE = "pass the base model (--base BASE, or base=...): a local Hugging Face folder with config.json"


class TorchtuneFormat(Format):
    name = "torchtune"
    read_options = ("base", "alpha", "permute_qk")
    write_options = ("base", "permute_qk")
    description = "torchtune LoRA checkpoint (adapter_model.pt with torchtune keys + adapter_config.json)"

    def detect(self, path: Path) -> bool:
        try:
            path = Path(path)
            if path.is_dir():
                # a folder with a PEFT-keyed adapter_model.safetensors is left to the peft format
                if (path / SAFETENSORS_NAME).is_file():
                    return _is_tune_safetensors(path / SAFETENSORS_NAME)
                return (path / PT_NAME).is_file()
            if path.suffix == ".safetensors":
                return _is_tune_safetensors(path)
            return path.name == PT_NAME
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        """Options: ``base`` (needed when q/k are adapted), ``alpha`` (when no adapter_config.json),
        ``permute_qk`` (bool; default from the base's model_type)."""
        adapter = read_torchtune(Path(path), **self.options_for(options, "read"))
        return require_consistent(adapter, options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``base`` (required), ``permute_qk`` (bool; default from the base's model_type)."""
        write_torchtune(adapter, Path(path), **self.options_for(options, "write"))

    def checks(self, path: Path) -> list[str]:
        return ["that the torchtune model builder's lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output "
                "match adapter_config.json target_modules (torchtune does not store them in the checkpoint)"]


def _is_tune_safetensors(file: Path) -> bool:
    keys = [k for k in safetensors_io.read_header(file).tensors]
    return bool(keys) and all(N.parse_key(k) for k in keys)


# ---- reading ---------------------------------------------------------------------

def read_torchtune(path: Path, base: Any = None, alpha: Any = None, permute_qk: bool | None = None) -> Adapter:
    weights = _weights_file(path)
    file = str(weights)
    config_path = weights.parent / CONFIG_NAME
    config = read_json(config_path, max_bytes=U.CONFIG_MAX_BYTES) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise FormatError("adapter_config.json must be a JSON object", file=str(config_path), code="bad_config")
    raw = read_torch_tensors(weights) if weights.suffix != ".safetensors" else safetensors_io.load(weights)[0]
    check_tensor_dims(raw, file)
    alpha = _alpha(config, alpha, str(config_path), file)
    pairs = _pairs(raw, file)
    info = U.base_info(base, config.get("base_model_name_or_path"))
    needs_order = any(name in ("q_proj", "k_proj") for name, _, _ in pairs.values())
    permute = _permute(info, permute_qk, file) if needs_order else False
    modules: dict[str, U.Module] = {}
    for module, (name, a, b) in sorted(pairs.items()):
        if permute and name in ("q_proj", "k_proj"):
            b = _from_meta(b, name, info, module, file)
        r = int(a.shape[0])
        modules[module] = U.Module(np.ascontiguousarray(a), np.ascontiguousarray(b), r, alpha, alpha / r)
    U.check_base(modules, info, file)
    warnings: list[str] = []
    restored = U.restore(config.get(U.RECORD_KEY), modules, U.tensor_digest(raw), warnings)
    ranks = Counter(m.r for m in modules.values())
    r = max(ranks, key=lambda k: (ranks[k], k))
    modules, facts = restored if restored is not None else (modules, None)
    if restored is None and isinstance(config.get("r"), int) and set(ranks) != {config["r"]}:
        warnings.append(f"adapter_config.json says r={config['r']} but the tensors have rank(s) {sorted(ranks)}; "
                        "the tensors' ranks are used")
    source = {k: v for k, v in config.items() if k != U.RECORD_KEY}
    name = config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str) else None
    return U.build_adapter(modules, config=U.plain_config(modules, r, alpha), fmt="torchtune", source_config=source,
                           info=info, name=name, facts=facts, file=file, warnings=warnings)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (PT_NAME, SAFETENSORS_NAME):
        if (path / name).is_file():
            return path / name
    raise FormatError("no torchtune adapter checkpoint found", file=str(path), expected=[PT_NAME, SAFETENSORS_NAME],
                      code="missing_file")


def _alpha(config: dict[str, Any], option: Any, config_file: str, file: str) -> float:
    found = config.get("lora_alpha")
    if found is not None and option is not None and found != option:
        raise UsageError("the alpha option differs from lora_alpha in adapter_config.json", file=config_file,
                         expected=found, found=option, hint="drop the alpha option", code="bad_option")
    value = found if found is not None else option
    if value is None:
        raise FormatError("torchtune's adapter_model.pt does not store alpha and there is no adapter_config.json "
                          "with lora_alpha beside it", file=file,
                          hint="pass the lora_alpha used in training (--alpha / alpha=...)", code="alpha_missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FormatError("lora_alpha must be a number > 0", file=config_file, location="$.lora_alpha", found=value,
                          code="bad_config")
    return value


def _pairs(raw: dict[str, np.ndarray], file: str) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """HF module -> (torchtune name, A [r, in], B [out, r])."""
    found: dict[str, dict[str, Any]] = {}
    for key, array in raw.items():
        parsed = N.parse_key(key)
        if parsed is None:
            peft_file = key.startswith("base_model.model.")
            raise FormatError("not a torchtune LoRA key of a Llama-style model", file=file, location=key,
                              expected="layers.N.attn.{q,k,v,output}_proj / layers.N.mlp.w{1,2,3} / output "
                                       "+ .lora_a.weight / .lora_b.weight",
                              hint="this is torchtune's PEFT copy: read it with --from peft" if peft_file else None,
                              code="unexpected_tensor")
        module, name, _, which = parsed
        if which == "magnitude":
            raise FormatError("DoRA magnitude found: torchtune DoRA adapters are not supported yet", file=file,
                              location=key, hint="retrain with use_dora=False", code="unsupported_method")
        found.setdefault(module, {"name": name})[which] = array
    if not found:
        raise FormatError("the checkpoint holds no tensors", file=file, code="empty_adapter")
    out = {}
    for module, entry in sorted(found.items()):
        for which in ("a", "b"):
            if which not in entry:
                raise FormatError(f"lora_{which} is missing for this module", file=file, location=module,
                                  code="missing_tensor")
        a, b = entry["a"], entry["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise FormatError("LoRA shapes do not pair up", file=file, location=module,
                              expected="lora_a [r, in], lora_b [out, r]", found=[list(a.shape), list(b.shape)],
                              code="tensor_shape")
        out[module] = (entry["name"], a, b)
    return out


def _permute(info: BaseModelInfo | None, option: bool | None, file: str) -> bool:
    """Whether q/k rows are in Meta's order for this base (torchtune's converter for its model type)."""
    if info is None:
        raise FormatError("q/k LoRA rows need the base's head counts to be put back in Hugging Face order",
                          file=file, hint=_NEEDS_BASE, code="base_missing")
    if option is not None:
        return bool(option)
    model_type = info.model_type
    if model_type not in N.META_ORDER:
        raise FormatError("torchtune's q/k row order is unknown for this model type",
                          file=str(info.path / "config.json"), location="model_type",
                          expected=sorted(N.META_ORDER), found=model_type,
                          hint="pass permute_qk=True (torchtune permuted the weights, as for Llama) or False",
                          code="unsupported")
    return N.META_ORDER[model_type]


def _head_count(name: str, info: BaseModelInfo) -> tuple[int, int]:
    n_heads, n_kv, head_dim = N.heads(info.config)
    return (n_heads if name == "q_proj" else n_kv), head_dim


def _from_meta(b: np.ndarray, name: str, info: BaseModelInfo | None, module: str, file: str) -> np.ndarray:
    assert info is not None
    n, head_dim = _head_count(name, info)
    if b.shape[0] != n * head_dim:
        raise FormatError("lora_b rows differ from heads x head_dim of the base", file=file, location=module,
                          expected=n * head_dim, found=b.shape[0], hint="is this the right base model?",
                          code="wrong_base")
    return N.meta_to_hf(b, n, head_dim)


# ---- writing ---------------------------------------------------------------------

def write_torchtune(adapter: Adapter, folder: Path, base: Any = None, permute_qk: bool | None = None) -> None:
    modules = U.adapter_modules(adapter, "torchtune")
    info = U.base_info(base, adapter.manifest.base_model.get("name"))
    if info is None:
        raise FormatError("writing torchtune needs the base model: its head counts order q/k rows and its "
                          "number of layers completes the module set torchtune loads", file=str(folder),
                          hint=_NEEDS_BASE, code="base_missing")
    located = {}
    for module in modules:
        spot = N.tune_module(module)
        if spot is None:
            raise LossyConversionError("torchtune's LoRA cannot adapt this module", location=module,
                                       expected="model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp."
                                                "{gate,up,down}_proj or lm_head", code="unsupported_module")
        located[module] = spot
    U.check_base(modules, info, "(adapter to save)")
    scale = U.common_scale(modules)
    rank = max(m.r for m in modules.values())
    alpha = U.alpha_for(scale, rank)
    plan = U.uniform(modules, alpha / rank)
    names = _module_types({name for name, _ in located.values()})
    blocks = U.num_layers(info) or 0
    deepest = max((layer for _, layer in located.values() if layer is not None), default=-1)
    if deepest >= blocks:
        raise FormatError(f"the adapter has block {deepest} but the base has {blocks} blocks (num_hidden_layers)",
                          file=str(info.path / "config.json"), hint="pass the base model the adapter was made for",
                          code="wrong_base")
    permute = _permute(info, permute_qk, str(folder)) if {"q_proj", "k_proj"} & set(names) else False
    dtype = next(iter(modules.values())).a.dtype
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        for layer in [None] if name == N.OUTPUT else range(blocks):
            module = N.OUTPUT_HF if layer is None else f"model.layers.{layer}.{N.BLOCK_MODULES[name][0]}"
            if module in plan.a:
                a, b = plan.a[module], plan.b[module]
            else:
                a, b = _fill(module, name, layer, rank, dtype, info)
            if permute and name in ("q_proj", "k_proj"):
                n, head_dim = _head_count(name, info)
                b = N.hf_to_meta(b, n, head_dim)
            tensors[N.tune_key(name, layer, "a")], tensors[N.tune_key(name, layer, "b")] = a, b
    targets = [N.BLOCK_MODULES[n][1] if n in N.BLOCK_MODULES else N.OUTPUT_HF for n in names]
    config: dict[str, Any] = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "peft_type": "LORA"}
    if adapter.manifest.base_model.get("name"):
        config["base_model_name_or_path"] = adapter.manifest.base_model["name"]
    config[U.RECORD_KEY] = U.make_record(adapter, modules, plan, U.tensor_digest(tensors))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / PT_NAME, _torch_bytes(tensors))
    atomic_write_bytes(folder / CONFIG_NAME, canonical_json(config))


def _module_types(present: set[str]) -> list[str]:
    """torchtune's module set: the adapted attention modules, all of w1 w2 w3 if any (apply_lora_to_mlp),
    and output; in get_lora_module_names' order."""
    names = [n for n in N.ATTN if n in present]
    if present & set(N.MLP):
        names += list(N.MLP)
    if N.OUTPUT in present:
        names.append(N.OUTPUT)
    return names


def _fill(module: str, name: str, layer: int | None, rank: int, dtype: np.dtype,
          info: BaseModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """A module torchtune needs but the adapter lacks: B = 0 (no effect), A seeded kaiming-uniform."""
    shape = info.weight_shape(module)
    if shape is None:
        raise FormatError("torchtune needs LoRA on this module in every layer, but the base lacks it",
                          file=str(info.path), location=module, code="wrong_base")
    out, fan_in = int(shape[0]), int(shape[1])
    seed = int.from_bytes(hashlib.sha256(N.tune_key(name, layer, "a").encode()).digest()[:8], "little")
    bound = 1.0 / np.sqrt(fan_in)
    a = np.random.default_rng(seed).uniform(-bound, bound, size=(rank, fan_in)).astype(dtype)
    return a, np.zeros((out, rank), dtype=dtype)


def _torch_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    import torch

    from adapterkit.core.format.torch_bridge import to_torch

    buffer = io.BytesIO()
    torch.save({key: to_torch(tensors[key]) for key in sorted(tensors)}, buffer)
    return buffer.getvalue()
