"""Method configs from ``adapterkit train`` options: shortcuts, ``--config KEY=VALUE``, ``--quantize``.

Shortcut options (``--rank``, ``--alpha``, ``--targets``, ...) map to the first
config key the method's schema declares among a few spellings, so a third-party
method whose schema says ``rank`` still gets ``--rank``; every other option is
``--config KEY=VALUE``. The result is checked by the method's own
``resolve_config`` before any model is loaded. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterkit.core.errors import UsageError
from adapterkit.core.plugin.capabilities import Quantizable
from adapterkit.core.plugin.registry import Registry, default_registry

#: shortcut option -> config keys it may mean, in order of preference
SHORTCUTS: dict[str, tuple[str, ...]] = {
    "rank": ("r", "rank"),
    "alpha": ("alpha", "lora_alpha"),
    "targets": ("target_modules", "targets"),
    "dropout": ("dropout",),
    "reduction_factor": ("reduction_factor",),
    "num_virtual_tokens": ("num_virtual_tokens",),
}
QUANT_TYPES = ("nf4", "fp4")
_REGEX_CHARS = set("*?[](){}|^$\\+")


def parse_targets(value: str) -> str | list[str]:
    """``--targets``: ``all-linear``, a regex (any regex metacharacter), or a comma list of module names."""
    value = value.strip()
    if value == "all-linear" or _REGEX_CHARS & set(value):
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError("--targets is empty", hint='use "all-linear", a comma list such as q_proj,v_proj, or a regex',
                         code="bad_option")
    return names


def method_config(
    method: str,
    config: Mapping[str, Any] | None = None,
    *,
    shortcuts: Mapping[str, Any] | None = None,
    quantize: str | None = None,
    registry: Registry | None = None,
) -> tuple[str, dict[str, Any]]:
    """(method id, config) from a config mapping plus shortcut options; validated by the method.

    ``quantize`` (``nf4`` / ``fp4``) turns ``lora`` into ``qlora`` with that ``quant_type``.
    """
    registry = registry or default_registry()
    out: dict[str, Any] = {}
    if quantize is not None:
        if quantize not in QUANT_TYPES:
            raise UsageError(f"unknown quantization {quantize!r}", expected=list(QUANT_TYPES), code="bad_option")
        plugin = registry.method(method)
        quantized = getattr(plugin, "quantized_method", "") if isinstance(plugin, Quantizable) else ""
        if not quantized:
            able = sorted(name for name, m in registry.methods.items() if isinstance(m, Quantizable))
            raise UsageError(f"--quantize trains on a quantised base; method {method!r} has no quantised variant",
                             expected=able, hint=f"use --method {' or '.join(able) or 'lora'} with --quantize",
                             code="bad_option")
        if quantized not in registry.methods:
            raise UsageError(f"--quantize needs the {quantized} method, which no loaded plugin provides",
                             hint="adapterkit plugins lists the methods", code="unknown_method")
        method = quantized
        out["quant_type"] = quantize
    plugin = registry.method(method)
    known = (plugin.config_schema() or {}).get("properties") or {}
    for option, value in (shortcuts or {}).items():
        if value is None:
            continue
        candidates = SHORTCUTS[option]
        key = next((k for k in candidates if k in known), None if known else candidates[0])
        if key is None:
            raise UsageError(f"--{option.replace('_', '-')} does not apply to method {method!r}",
                             expected=sorted(known), hint="use --config KEY=VALUE with one of the method's options",
                             code="bad_option")
        out[key] = value
    for key, value in (config or {}).items():
        if key in out and out[key] != value:
            raise UsageError(f"{key} is given twice with different values", found=[out[key], value],
                             hint="give it once (a shortcut option or --config)", code="bad_option")
        out[key] = value
    plugin.resolve_config(out)  # the method's own check: UsageError at $.method.config.<key>
    return method, out
