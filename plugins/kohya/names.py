"""kohya's underscore module names (``lora_te_layers_0_self_attn_q_proj``) to module paths and back.

``lora_name = (prefix + "." + module path + "." + child).replace(".", "_")`` (sd-scripts
``networks/lora.py``; LyCORIS' ``lycoris/kohya.py`` names its modules alike). Underscores
cannot be mapped back to dots without knowing the module names: with ``base`` the names are
resolved against the base's weight names; without it a heuristic applies (:data:`KNOWN_PARTS`,
longest known part first, digits are block indices) and a part it does not know is an error
asking for ``base``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from adapterkit.core.errors import FormatError, LossyConversionError, UsageError
from adapterkit.core.format.base_model import BaseModelInfo

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te")
# Canonical root of each prefix when one file holds several models (diffusers component names).
COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
              "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}
#: module-name parts the no-base heuristic knows (HF LLMs, CLIP, T5, diffusers and SAI UNets)
KNOWN_PARTS = frozenset("""
model layers self_attn mlp q_proj k_proj v_proj o_proj qkv_proj gate_proj up_proj down_proj gate_up_proj lm_head
embed_tokens dense fc1 fc2 text_model encoder embeddings out_proj text_projection
block layer SelfAttention EncDecAttention DenseReluDense q k v o wi wi_0 wi_1 wo
down_blocks up_blocks mid_block attentions transformer_blocks attn1 attn2 to_q to_k to_v to_out ff net proj
proj_in proj_out resnets conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers conv time_embedding
linear_1 linear_2 input_blocks middle_block output_blocks emb_layers in_layers out_layers skip_connection op time_embed
""".split())
HEURISTIC_WARNING = ("module names were resolved without a base model by adapterkit's naming heuristic "
                     "(pass --base to resolve them against the base's weight names)")


def split_prefix(lora_name: str) -> tuple[str, str] | None:
    for prefix in PREFIXES:
        if lora_name.startswith(prefix + "_") and len(lora_name) > len(prefix) + 1:
            return prefix, lora_name[len(prefix) + 1:]
    return None


def flat(path: str) -> str:
    return path.replace(".", "_")


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# ---- read: lora_name -> module path ----------------------------------------------------

def resolve(names: Iterable[str], info: BaseModelInfo | None, root: str | Mapping[str, str] | None, file: str
            ) -> tuple[dict[str, str], dict[str, str]]:
    """lora_name -> module path, and kohya prefix -> canonical root."""
    by_prefix: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        prefix, rest = split_prefix(name)  # type: ignore[misc]
        by_prefix.setdefault(prefix, []).append((name, rest))
    component = len(by_prefix) > 1 and info is None
    paths: dict[str, str] = {}
    roots: dict[str, str] = {}
    for prefix, pairs in sorted(by_prefix.items()):
        wanted = root.get(prefix) if isinstance(root, Mapping) else root
        if info is not None:
            roots[prefix], resolved = _with_base(pairs, info, wanted, file)
        else:
            resolved = {name: _heuristic(rest, name, file) for name, rest in pairs}
            inner = wanted if wanted is not None else ("model" if all(p.startswith("layers.") for p in resolved.values()) else "")
            roots[prefix] = join(COMPONENTS[prefix], inner) if component and wanted is None else inner
            resolved = {name: join(roots[prefix], p) for name, p in resolved.items()}
        paths.update(resolved)
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
            index.setdefault((".".join(parts[:i]), flat(".".join(parts[i:]))), set()).add(module)
    roots = {r for r, _ in index} if wanted is None else {wanted}
    fits = sorted(r for r in roots if all((r, rest) in index for _, rest in names))
    if not fits:
        missing = next(name for name, rest in names if not any((r, rest) in index for r in roots))
        raise FormatError("no module of the base model has this name", file=file, location=missing,
                          hint="is this the adapter's base? (pass root=... if the kohya root is unusual)", code="wrong_base")
    if len(fits) > 1:
        raise FormatError("the names fit several roots of the base model", file=file, found=fits,
                          hint="pass root=<module-path prefix> to choose", code="ambiguous_name")
    out = {}
    for name, rest in names:
        found = sorted(index[(fits[0], rest)])
        if len(found) > 1:
            raise FormatError("the name fits several modules of the base model", file=file, location=name, found=found,
                              hint="kohya names lose the dots; this file cannot be mapped unambiguously", code="ambiguous_name")
        out[name] = found[0]
    return fits[0], out


def _heuristic(rest: str, name: str, file: str) -> str:
    """Dots back from underscores: longest known part first, digit runs are indices."""
    tokens = rest.split("_")
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


# ---- write: module path -> lora_name ---------------------------------------------------

def lora_names(modules: Iterable[str], source: Mapping[str, Any], prefix: str | None, root: str | None) -> dict[str, str]:
    """module path -> kohya lora_name, through the recorded prefix roots or the given prefix / root."""
    if prefix is not None and prefix not in PREFIXES:
        raise UsageError("unknown kohya prefix", expected=list(PREFIXES), found=prefix, code="bad_option")
    modules = list(modules)
    recorded = source.get("roots") if prefix is None and root is None else None
    out: dict[str, str] = {}
    for module in modules:
        choice = _recorded(module, recorded) if isinstance(recorded, Mapping) and recorded else None
        if choice is None:
            use_root = root if root is not None else ("model" if all(m.startswith("model.layers.") for m in modules) else "")
            choice = (prefix or "lora_te", use_root)
        kprefix, kroot = choice
        if kroot and not module.startswith(kroot + "."):
            raise LossyConversionError(f"module is outside the kohya root {kroot!r}", location=module,
                                       hint="pass root='' (or the module-path prefix of the model the prefix names)",
                                       code="unsupported")
        out[module] = f"{kprefix}_{flat(module[len(kroot) + 1:] if kroot else module)}"
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
