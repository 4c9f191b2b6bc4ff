"""Format plugin ``kohya``: kohya-ss / sd-scripts LoRA files (one ``*.safetensors``), read and written.

Read from kohya-ss/sd-scripts (``networks/lora.py``, ``networks/lora_anima.py``,
``library/anima_utils.py``):

- ``lora_name = (prefix + "." + module path + "." + child).replace(".", "_")`` with
  prefix ``lora_unet``, ``lora_te`` (SD1/2, Qwen3 / LLM text encoders), ``lora_te1`` /
  ``lora_te2`` (SDXL, SD3, Flux CLIP) or ``lora_te3`` (T5). An LLM text encoder's root is
  its inner model (``Qwen3ForCausalLM(...).model``): ``lora_te_layers_0_self_attn_q_proj``
  is module ``model.layers.0.self_attn.q_proj`` of the causal-LM checkpoint.
- ``<lora_name>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], ``.alpha`` a
  0-dim buffer; ``scale = alpha / r`` where alpha 0, None or a missing key means r
  (``LoRAModule.__init__``, ``create_network_from_weights``).
- ``save_weights`` casts every tensor, alpha included, to the save dtype;
  ``__metadata__`` holds ``ss_*`` / ``sshs_*`` / ``modelspec.*`` strings.

Underscores cannot be mapped back to dots without knowing the module names.
With ``base`` the names are resolved against the base's weight names; without
it a heuristic applies (:data:`KNOWN_PARTS`, longest known part first, digits
are block indices) and a part it does not know is an error asking for ``base``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapterkit import check_tensor_dims, require_consistent
from adapterkit.core.format import safetensors_io
from adapterkit.core.format.adapter import Adapter, canonical_key
from adapterkit.core.format.base_model import BaseModelInfo, read_base_model, targets_fingerprint
from adapterkit.core.errors import FormatError, LossyConversionError, TensorFileError, UsageError
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.hookspecs import hookimpl
from adapterkit.core.io import atomic_write_bytes
from adapterkit.core.format.manifest import Manifest

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te")
# Canonical root of each prefix when one file holds several models (diffusers component names).
COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
              "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}
DEFAULT_FILE = "lora.safetensors"
_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
_OTHER_NETWORKS = {  # key markers of networks that are not plain LoRA
    "hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a mid tensor (LyCORIS)",
    "dora_scale": "DoRA (a magnitude vector)", "oft_": "OFT", ".diff": "a full weight difference", ".bias": "a bias",
}
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NUMPY = safetensors_io.DTYPES
#: module-name parts the no-base heuristic knows (HF LLMs, CLIP, T5, diffusers and SAI UNets)
KNOWN_PARTS = frozenset("""
model layers self_attn mlp q_proj k_proj v_proj o_proj qkv_proj gate_proj up_proj down_proj gate_up_proj lm_head
embed_tokens dense fc1 fc2 text_model encoder embeddings out_proj text_projection
block layer SelfAttention EncDecAttention DenseReluDense q k v o wi wi_0 wi_1 wo
down_blocks up_blocks mid_block attentions transformer_blocks attn1 attn2 to_q to_k to_v to_out ff net proj
proj_in proj_out resnets conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers conv time_embedding
linear_1 linear_2 input_blocks middle_block output_blocks emb_layers in_layers out_layers skip_connection op time_embed
""".split())


class KohyaFormat(Format):
    name = "kohya"
    read_options = ("base", "root")
    write_options = ("prefix", "root", "filename", "base", "round_alpha")
    file_suffix = ".safetensors"
    description = "kohya-ss / sd-scripts LoRA (.safetensors with lora_te_* / lora_unet_* modules and alpha tensors)"

    def detect(self, path: Path) -> bool:
        try:
            file = _find_file(Path(path))
            if file is None:
                return False
            keys = safetensors_io.read_header(file).tensors
            return bool(keys) and all(_split_prefix(key.split(".", 1)[0]) is not None for key in keys)
        except Exception:
            return False

    def read(self, path: Path, **options: Any) -> Adapter:
        """Options: ``base`` (resolves module names exactly), ``root`` (module-path prefix of the kohya root)."""
        opts = self.options_for(options, "read")
        adapter = read_kohya(Path(path), base=opts.get("base"), root=opts.get("root"))
        return require_consistent(adapter, options.get("registry"), str(path), reader=self.name)

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Options: ``prefix`` (default lora_te), ``root``, ``filename``, ``base``, ``round_alpha``."""
        opts = self.options_for(options, "write")
        write_kohya(adapter, Path(path), **opts)

    def checks(self, path: Path) -> list[str]:
        return ["which model each prefix (lora_te*, lora_unet) belongs to: kohya files do not name their base"]


def _find_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if path.is_dir() and not (path / "adapter.json").exists() and not (path / "adapter_config.json").exists():
        found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        return found[0] if len(found) == 1 else None
    return None


def _split_prefix(lora_name: str) -> tuple[str, str] | None:
    for prefix in PREFIXES:
        if lora_name.startswith(prefix + "_") and len(lora_name) > len(prefix) + 1:
            return prefix, lora_name[len(prefix) + 1:]
    return None


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's key, dtype, shape and bytes: tells whether a write changes the tensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.asarray(tensors[key])
        digest.update(f"{key}\0{safetensors_io.dtype_name(array)}\0{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# ---- read ------------------------------------------------------------------------

def read_kohya(path: Path, base: Any = None, root: str | Mapping[str, str] | None = None) -> Adapter:
    file = _find_file(path)
    if file is None:
        raise FormatError("no single .safetensors file here", file=str(path), hint="point at the kohya .safetensors file",
                          code="missing_file")
    raw, metadata = safetensors_io.load(file)
    check_tensor_dims(raw, str(file))
    modules = _group(raw, str(file))
    info = None if base is None else base if isinstance(base, BaseModelInfo) else read_base_model(base)
    warnings: list[str] = []
    paths, roots = _resolve(modules, info, root, str(file), warnings)
    dtypes = {safetensors_io.dtype_name(m[k]) for m in modules.values() for k in ("A", "B")}
    if len(dtypes) != 1:
        raise TensorFileError("lora_down / lora_up tensors have mixed dtypes; an adapter has one dtype", file=str(file),
                              found=sorted(dtypes), hint="cast every tensor to one dtype and save again", code="mixed_dtype")
    targets: dict[str, dict[str, Any]] = {}
    tensors: dict[str, np.ndarray] = {}
    alpha_record: dict[str, Any] = {"missing": [], "zero": [], "dtypes": {}}
    dtype = dtypes.pop()
    for name, parts in sorted(modules.items()):
        module = paths[name]
        a, b = parts["A"], parts["B"]
        r = int(a.shape[0])
        alpha = _alpha(parts.get("alpha"), r, name, str(file), alpha_record)
        shape = [int(b.shape[0]), int(a.shape[1])]
        if info is not None and (found := info.weight_shape(module)) is not None and list(found) != shape:
            raise FormatError("LoRA shapes do not fit the base weight", file=str(file), location=name,
                              expected=list(found), found=shape, hint="is this the adapter's base?", code="wrong_base")
        targets[module] = {"kind": "linear", "shape": shape, "r": r, "alpha": alpha}
        tensors[canonical_key(module, "lora", "A")] = a
        tensors[canonical_key(module, "lora", "B")] = b
    alpha_dtypes = Counter(alpha_record.pop("dtypes").values())
    if alpha_dtypes and (common := max(alpha_dtypes, key=lambda d: alpha_dtypes[d])) != dtype:
        alpha_record["dtype"] = common  # unusual (sd-scripts saves alpha in the weights' dtype): keep it
    source = {"format": "kohya", "config": dict(metadata), "file": file.name, "roots": roots,
              "alpha": {k: v for k, v in alpha_record.items() if v}, "tensors_sha256": tensors_digest(raw)}
    rs, alphas = Counter(t["r"] for t in targets.values()), Counter(t["alpha"] for t in targets.values())
    config: dict[str, Any] = {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
    common_r, common_alpha = max(rs, key=lambda v: (rs[v], -v)), max(alphas, key=lambda v: (alphas[v], -v))
    if common_r != 8:
        config["r"] = common_r
    if common_alpha != 8:
        config["alpha"] = common_alpha
    base_model: dict[str, Any] = {"fingerprint": targets_fingerprint(targets)}
    if info is not None:
        base_model.update({k: v for k, v in (("model_type", info.model_type), ("architecture", info.architecture)) if v})
    manifest = Manifest(method="lora", config=config, targets=targets, dtype=_DTYPES[dtype], base_model=base_model,
                        provenance={"converted_from": source})
    return Adapter(manifest, tensors, source=file, source_format="kohya", warnings=warnings)


def _group(raw: Mapping[str, np.ndarray], file: str) -> dict[str, dict[str, np.ndarray]]:
    """lora_name -> {"A", "B", "alpha"?}; refuse keys a plain LoRA cannot hold."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in raw.items():
        lora_name, dot, rest = key.partition(".")
        part = _SUFFIXES.get(dot + rest)
        if part is None or _split_prefix(lora_name) is None:
            what = next((v for k, v in _OTHER_NETWORKS.items() if k in key), None)
            if what:
                raise LossyConversionError(f"{what} is not a plain LoRA; converting would lose it", file=file, location=key,
                                           hint="use the file with a tool that supports it (ComfyUI, LyCORIS)",
                                           code="unsupported")
            raise FormatError("not a kohya LoRA key", file=file, location=key,
                              expected="<lora_te*|lora_unet>_<module>.lora_down.weight / .lora_up.weight / .alpha",
                              code="unknown_key")
        modules.setdefault(lora_name, {})[part] = array
    if not modules:
        raise TensorFileError("holds no LoRA tensors", file=file, code="empty")
    for name, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_down" if "A" not in parts else "lora_up"
            raise TensorFileError(f"module has no {missing}.weight", file=file, location=name, code="unpaired")
        a, b = parts["A"], parts["B"]
        if a.ndim == 4 or b.ndim == 4:
            raise LossyConversionError("Conv2d LoRA (4-d lora_down / lora_up) is not supported by adapterkit's lora method",
                                       file=file, location=f"{name}.lora_down.weight", found=list(a.shape), code="unsupported")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise TensorFileError("lora_down / lora_up are not [r, in] / [out, r]", file=file, location=name,
                                  found=f"{list(a.shape)}, {list(b.shape)}", code="shape")
        if _DTYPES.get(safetensors_io.dtype_name(a)) is None:
            raise TensorFileError("LoRA weights must be a float dtype", file=file, location=name,
                                  expected=sorted(_DTYPES), found=safetensors_io.dtype_name(a), code="bad_dtype")
    return modules


def _alpha(tensor: np.ndarray | None, r: int, name: str, file: str, record: dict[str, Any]) -> int | float:
    """The module's alpha as sd-scripts reads it: 0 or missing means r."""
    if tensor is None:
        record["missing"].append(name)
        return r
    if tensor.size != 1:
        raise TensorFileError("alpha must be a scalar", file=file, location=f"{name}.alpha", found=list(tensor.shape),
                              code="shape")
    record["dtypes"][name] = safetensors_io.dtype_name(tensor)
    value = float(tensor.astype(np.float64).reshape(()))
    if value == 0:
        record["zero"].append(name)
        return r
    if not (math.isfinite(value) and value > 0):
        raise FormatError("alpha must be a finite number > 0 (or 0 for 'alpha = r')", file=file, location=f"{name}.alpha",
                          found=value, code="bad_alpha")
    return int(value) if value.is_integer() else value


# ---- module names ------------------------------------------------------------------

def _resolve(modules: Mapping[str, Any], info: BaseModelInfo | None, root: str | Mapping[str, str] | None, file: str,
             warnings: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """lora_name -> module path, and kohya prefix -> canonical root."""
    by_prefix: dict[str, list[tuple[str, str]]] = {}
    for name in modules:
        prefix, flat = _split_prefix(name)  # type: ignore[misc]
        by_prefix.setdefault(prefix, []).append((name, flat))
    component = len(by_prefix) > 1 and info is None
    paths: dict[str, str] = {}
    roots: dict[str, str] = {}
    for prefix, names in sorted(by_prefix.items()):
        wanted = root.get(prefix) if isinstance(root, Mapping) else root
        if info is not None:
            roots[prefix], resolved = _with_base(names, info, wanted, file)
        else:
            resolved = {name: _heuristic(flat, name, file) for name, flat in names}
            inner = wanted if wanted is not None else ("model" if all(p.startswith("layers.") for p in resolved.values()) else "")
            roots[prefix] = _join(COMPONENTS[prefix], inner) if component and wanted is None else inner
            resolved = {name: _join(roots[prefix], p) for name, p in resolved.items()}
        paths.update(resolved)
    if info is None:
        warnings.append("module names were resolved without a base model by adapterkit's naming heuristic "
                        "(pass --base to resolve them against the base's weight names)")
    seen: dict[str, str] = {}
    for name, module in sorted(paths.items()):
        if module in seen:
            raise FormatError("two kohya modules map to one module path", file=file, location=name, found=[seen[module], name],
                              code="ambiguous_name")
        seen[module] = name
    return paths, roots


def _with_base(names: list[tuple[str, str]], info: BaseModelInfo, wanted: str | None, file: str) -> tuple[str, dict[str, str]]:
    """Resolve flattened names against the base's module paths; the root is a dotted prefix shared by all."""
    modules = [key[: -len(".weight")] for key in info.weights if key.endswith(".weight")]
    index: dict[tuple[str, str], set[str]] = {}
    for module in modules:
        parts = module.split(".")
        for i in range(len(parts)):
            index.setdefault((".".join(parts[:i]), _flat(".".join(parts[i:]))), set()).add(module)
    roots = {r for r, _ in index} if wanted is None else {wanted}
    fits = sorted(r for r in roots if all((r, flat) in index for _, flat in names))
    if not fits:
        missing = next(name for name, flat in names if not any((r, flat) in index for r in roots))
        raise FormatError("no module of the base model has this name", file=file, location=missing,
                          hint="is this the adapter's base? (pass root=... if the kohya root is unusual)", code="wrong_base")
    if len(fits) > 1:
        raise FormatError("the names fit several roots of the base model", file=file, found=fits,
                          hint="pass root=<module-path prefix> to choose", code="ambiguous_name")
    out = {}
    for name, flat in names:
        found = sorted(index[(fits[0], flat)])
        if len(found) > 1:
            raise FormatError("the name fits several modules of the base model", file=file, location=name, found=found,
                              hint="kohya names lose the dots; this file cannot be mapped unambiguously", code="ambiguous_name")
        out[name] = found[0]
    return fits[0], out


def _heuristic(flat: str, name: str, file: str) -> str:
    """Dots back from underscores: longest known part first, digit runs are indices."""
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i].isdigit():
            parts.append(tokens[i])
            i += 1
            continue
        for j in range(len(tokens), i, -1):
            if "_".join(tokens[i:j]) in KNOWN_PARTS:
                parts.append("_".join(tokens[i:j]))
                i = j
                break
        else:
            raise FormatError(
                f"cannot tell where {tokens[i]!r} begins and ends: underscores stand for dots and for underscores in names",
                file=file, location=name, hint="pass --base (the base model folder) to resolve the names exactly",
                code="ambiguous_name",
            )
    return ".".join(parts)


# ---- write ---------------------------------------------------------------------------

def write_kohya(adapter: Adapter, folder: Path, prefix: str | None = None, root: str | None = None,
                filename: str | None = None, base: Any = None, round_alpha: bool = False) -> Path:
    """Write ``adapter`` as one kohya ``.safetensors`` file in ``folder``; returns the file."""
    manifest = adapter.manifest
    if manifest.method != "lora":
        raise LossyConversionError(f"kohya LoRA files hold LoRA only, not {manifest.method!r}", location="$.method.name",
                                   expected="lora", found=manifest.method, code="unsupported")
    if prefix is not None and prefix not in PREFIXES:
        raise UsageError("unknown kohya prefix", expected=list(PREFIXES), found=prefix, code="bad_option")
    source = manifest.provenance.get("converted_from") or {}
    source = source if source.get("format") == "kohya" else {}
    info = None if base is None else base if isinstance(base, BaseModelInfo) else read_base_model(base)
    names = _names(manifest.targets, source, prefix, root)
    rslora = bool(manifest.config.get("use_rslora", False))
    record = source.get("alpha") or {}
    out: dict[str, np.ndarray] = {}
    extra = sorted(set(adapter.tensors) - {canonical_key(m, "lora", p) for m in manifest.targets for p in "AB"})
    if extra:
        raise LossyConversionError("tensor has no place in a kohya LoRA file and would be lost", location=extra[0],
                                   expected="only <module>.lora.A / .lora.B of the manifest's targets", code="unsupported")
    for module, target in sorted(manifest.targets.items()):
        name = names[module]
        if target.get("kind") != "linear":
            raise LossyConversionError(f"kohya LoRA here holds linear modules only, not {target.get('kind')!r}",
                                       location=f"$.targets[{module!r}].kind", expected="linear", found=target.get("kind"),
                                       code="unsupported")
        if info is not None and (found := info.weight_shape(module)) is not None and list(found) != list(target["shape"]):
            raise FormatError("base weight shape differs from the adapter's target", file=str(info.path),
                              location=f"{module}.weight", expected=list(target["shape"]), found=list(found), code="wrong_base")
        a, b = adapter.tensors.get(canonical_key(module, "lora", "A")), adapter.tensors.get(canonical_key(module, "lora", "B"))
        r, alpha = int(target["r"]), target["alpha"]
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise TensorFileError("LoRA tensors missing or not [r, in] / [out, r]", location=canonical_key(module, "lora", "A"),
                                  expected=f"A [{r}, in], B [out, {r}]", code="shape")
        alpha = alpha * math.sqrt(r) if rslora else alpha  # kohya scale alpha/r == rsLoRA alpha/sqrt(r)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
        if name in record.get("missing", ()) and alpha == r:
            continue
        value = 0.0 if name in record.get("zero", ()) and alpha == r else alpha
        out[f"{name}.alpha"] = _alpha_tensor(value, record.get("dtype") or safetensors_io.dtype_name(a), name, round_alpha)
    metadata = _metadata(source, manifest.targets, out, rslora)
    recorded = source.get("file")
    file = folder / _plain_name(filename or (recorded if _is_plain(recorded) else None) or DEFAULT_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, safetensors_io.serialize(out, metadata))
    return file


def _is_plain(name: Any) -> bool:
    return isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name and not name.startswith(".")


def _plain_name(name: str) -> str:
    if not _is_plain(name):
        raise UsageError("filename must be a plain *.safetensors file name", found=name, code="bad_option")
    return name


def _names(targets: Mapping[str, Any], source: Mapping[str, Any], prefix: str | None, root: str | None) -> dict[str, str]:
    """module path -> kohya lora_name, through the recorded prefix roots or the given prefix / root."""
    recorded = source.get("roots") if prefix is None and root is None else None
    out: dict[str, str] = {}
    for module in targets:
        choice = _recorded(module, recorded) if recorded else None
        if choice is None:
            use_root = root if root is not None else ("model" if all(m.startswith("model.layers.") for m in targets) else "")
            choice = (prefix or "lora_te", use_root)
        kprefix, kroot = choice
        if kroot and not module.startswith(kroot + "."):
            raise LossyConversionError(f"module is outside the kohya root {kroot!r}", location=module,
                                       hint="pass root='' (or the module-path prefix of the model the prefix names)",
                                       code="unsupported")
        out[module] = f"{kprefix}_{_flat(module[len(kroot) + 1:] if kroot else module)}"
    seen: dict[str, str] = {}
    for module, name in sorted(out.items()):
        if name in seen:
            raise LossyConversionError("two modules get the same kohya name (kohya names lose the dots)", location=name,
                                       found=[seen[name], module], code="ambiguous_name")
        seen[name] = module
    return out


def _recorded(module: str, roots: Mapping[str, str]) -> tuple[str, str] | None:
    fits = [(len(r), p, r) for p, r in roots.items() if r == "" or module.startswith(r + ".")]
    return (max(fits)[1], max(fits)[2]) if fits else None


def _alpha_tensor(value: float, dtype: str, name: str, round_alpha: bool) -> np.ndarray:
    """A 0-dim alpha in ``dtype`` (sd-scripts saves it in the weights' dtype); float32 when that dtype would round it."""
    np_dtype = _NUMPY.get(dtype, _NUMPY["F32"])
    if np_dtype.kind in "iu":  # an integer alpha (diffusers' convert_state_dict_to_kohya writes r as int64)
        if float(value).is_integer():
            return np.array(int(value), dtype=np_dtype)
        np_dtype = _NUMPY["F32"]
    for candidate in (np_dtype, _NUMPY["F32"]):
        array = np.array(value, dtype=candidate)
        if float(array.astype(np.float64)) == value:
            return array
    if round_alpha:
        return np.array(value, dtype=np.float32)
    raise LossyConversionError(f"alpha {value!r} cannot be stored exactly in a {dtype} or float32 tensor",
                               location=f"{name}.alpha",
                               hint="pass round_alpha=True to store float32(alpha) (a relative change below 1e-7)",
                               code="inexact_alpha")


def _metadata(source: Mapping[str, Any], targets: Mapping[str, Any], out: Mapping[str, np.ndarray],
              rslora: bool) -> dict[str, str]:
    """The original ``__metadata__`` (its sshs_* hashes only when the tensors are unchanged), else minimal ss_* keys."""
    original = source.get("config")
    if isinstance(original, dict):
        if source.get("tensors_sha256") == tensors_digest(out):
            return dict(original)
        return {k: v for k, v in original.items() if not k.startswith("sshs_")}
    rs = {t["r"] for t in targets.values()}
    alphas = {t["alpha"] * math.sqrt(t["r"]) if rslora else t["alpha"] for t in targets.values()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(next(iter(rs))) if len(rs) == 1 else "Dynamic",
        "ss_network_alpha": str(float(next(iter(alphas)))) if len(alphas) == 1 else "Dynamic",
    }


@hookimpl
def adapterkit_register_formats(register: Callable[..., None]) -> None:
    register(KohyaFormat())
