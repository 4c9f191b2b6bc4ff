"""The PEFT ``LOKR`` codec: LoKr adapters inside adapterkit's ``peft`` format (PEFT 0.21.2's layout).

The ``peft`` format owns the folder; this codec says what ``peft_type: "LOKR"`` means, through the
context the format hands it (docs/plugins.md, "The PEFT codec context"). Public ``adapterkit`` API only.

Per adapted module (``peft/tuners/lokr/layer.py``: ``LoKrLayer.create_adapter_parameters``; the
adapter name is stripped on save, and the ``nn.ParameterDict`` entries have no ``.weight``)::

    base_model.model.<module>.lokr_w1    [a, c]   or  .lokr_w1_a [a, r] + .lokr_w1_b [r, c]
    base_model.model.<module>.lokr_w2    [b, d]   or  .lokr_w2_a [b, r] + .lokr_w2_b [r, d]

-> canonical ``<module>.lokr.w1`` (``w1_a``, ``w1_b``, ``w2``, ``w2_a``, ``w2_b``), byte for byte.
The tensors give the shapes (``out = a * b``, ``in = c * d``), so reading needs no base. PEFT
0.21.2's LoKr adapts ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` only (not transformers'
``Conv1D``: GPT-2 is refused by PEFT itself); convolution LoKr (3-d / 4-d tensors, ``lokr_t2``)
is refused here, as are ``modules_to_save`` and any config field this codec does not know with a
value set. A folder that disagrees with PEFT's own layout rule for its config (a rank or factor
PEFT would not build) is refused too: PEFT could not load it.

PEFT before 0.14.0 applied no ``alpha / r`` to LoKr (``make_kron(w1, w2)``; 0.14.0 added the scale
and the ``rank_dropout_scale`` field, which every later config holds). A config without
``rank_dropout_scale`` is read as such a folder: each module's alpha is its r (scale 1, what that
PEFT computes), with a warning when the config's alphas said otherwise. Written for a release
before 0.14.0 (``--peft-version``), each module's scale is folded into ``w1`` (or ``w1_a``) and its
alpha written equal to its r, so that every release computes the same update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit import (
    Adapter, Codec, FormatError, LossyConversionError, UsageError, canonical_key, check_tensor_dims, in_out_features,
)

from .math import PARAMS, layout_of, peft_layout, tensor_shapes
from .method import DEFAULTS, LokrMethod, validate_config

PREFIX = "lokr_"
#: PEFT's LoKr leaves, longest first (``lokr_w1_a`` must not be read as ``lokr_w1``)
LEAVES = tuple(sorted((PREFIX + p for p in (*PARAMS, "t2")), key=len, reverse=True))
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: PeftConfig's own fields (the format handles them)
#: LoKrConfig 0.21.2's fields that the method config holds (same names)
HELD_FIELDS = ("r", "alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "decompose_both",
               "decompose_factor", "use_effective_conv2d", "init_weights", "target_modules", "exclude_modules",
               "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")
#: every field of PEFT 0.21.2's LoKrConfig besides PeftConfig's
KNOWN_FIELDS = frozenset({*HELD_FIELDS, "modules_to_save"})
_PATTERNS = (("r", "rank_pattern"), ("alpha", "alpha_pattern"))
#: the first PEFT release whose LoKr scales by alpha / r (and whose configs hold rank_dropout_scale)
SCALED_SINCE = "0.14.0"
_FIX = "fix the value in adapter_config.json (PEFT itself could not load it)"


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def check_config(config: Mapping[str, Any], file: str) -> dict[str, Any]:
    """The method config a PEFT LoKr config means; refuses what it cannot hold, naming the field."""
    if not _unset(config.get("modules_to_save")):
        raise LossyConversionError("modules_to_save (fully trained modules) has no place in a lokr adapter and would "
                                   "be lost", file=file, location="$.modules_to_save", found=config["modules_to_save"],
                                   hint="save the adapter without modules_to_save (keep the trained head in the base)",
                                   code="unsupported")
    wanted = {k: config[k] for k in HELD_FIELDS if k in config and config[k] is not None}
    wanted.setdefault("target_modules", DEFAULTS["target_modules"])
    try:
        return validate_config(wanted)
    except UsageError as exc:
        field = str(getattr(exc, "location", "") or "").rsplit(".", 1)[-1] or "?"
        raise FormatError(exc.message, file=file,
                          location=f"$.{field}", found=config.get(field), hint=_FIX, code="bad_config") from None


class LokrPeftCodec(Codec):
    """PEFT's LOKR layout for the ``lokr`` method."""

    format = "peft"
    key = "LOKR"
    methods = ("lokr",)
    description = "PEFT LoKr (linear modules; reading needs no base)"

    # ---- read -----------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        config, file, config_file = context.config, context.tensors_file, context.config_file
        context.refuse_unknown_fields(KNOWN_FIELDS, "lokr")
        resolved = check_config(config, config_file)
        unscaled = "rank_dropout_scale" not in config  # saved by PEFT < 0.14.0: no alpha / r in its LoKr
        if unscaled:
            said = (resolved["alpha"], resolved["r"], dict(resolved.get("alpha_pattern") or {}))
            resolved = {**resolved, "alpha": resolved["r"], "alpha_pattern": dict(resolved.get("rank_pattern") or {})}
        raw = context.tensors
        check_tensor_dims(raw, file)
        modules: dict[str, dict[str, np.ndarray]] = {}
        other = []
        for key, value in raw.items():
            leaf = next((leaf for leaf in LEAVES if context.module_of(key, leaf) is not None), None)
            if leaf is None:
                other.append(key)
                continue
            if leaf == PREFIX + "t2" or value.ndim != 2:
                raise LossyConversionError("convolution LoKr (a lokr_t2 or a 3-d / 4-d tensor) is not supported: "
                                           "adapterkit-lokr adapts linear modules", file=file, location=key,
                                           found=list(value.shape), code="unsupported")
            modules.setdefault(context.module_of(key, leaf), {})[leaf[len(PREFIX):]] = value
        if other:
            raise LossyConversionError(f"the file holds {len(other)} tensors that are not LoKr tensors; they would be "
                                       "lost", file=file, found=sorted(other)[:5], hint="modules_to_save weights have "
                                       "no place in a lokr adapter", code="unsupported")
        if not modules:
            raise FormatError(f"the file holds no LoKr tensor ({context.key('<module>', 'lokr_w1')})", file=file,
                              code="no_targets")
        targets, tensors, dtypes = {}, {}, set()
        for module, own in sorted(modules.items()):
            targets[module] = self._target(context, module, own, resolved, file)
            for param, value in own.items():
                tensors[canonical_key(module, "lokr", param)] = value
                dtypes.add(str(value.dtype))
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
            raise FormatError("the LoKr tensors must share one float dtype", file=file, found=sorted(dtypes),
                              code="dtype")
        method_config = dict(resolved)
        if config.get("target_modules") is None:
            method_config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in targets})
        warnings = []
        if unscaled and (said[0] != said[1] or said[2]):
            warnings.append(f"{config_file} $.rank_dropout_scale: the config lacks rank_dropout_scale, so PEFT before "
                            f"{SCALED_SINCE} saved it, whose LoKr applies no alpha / r: read with scale 1 (alpha = r), "
                            "as that PEFT computes. If a later PEFT wrote it, add \"rank_dropout_scale\": false to "
                            "the config to read its alphas")
        return context.adapter("lokr", LokrMethod().minimal_config(method_config), targets, tensors, dtypes.pop(),
                               warnings=warnings)

    def _target(self, context: Any, module: str, own: Mapping[str, np.ndarray], config: Mapping[str, Any],
                file: str) -> dict[str, Any]:
        found = layout_of(own)
        if found is None or set(own) != set(tensor_shapes({**found, "r": 1})):
            raise FormatError(f"{module} lacks a LoKr half (lokr_w1 or lokr_w1_a + lokr_w1_b; lokr_w2 or lokr_w2_a + "
                              f"lokr_w2_b)", file=file, location=module, found=sorted(PREFIX + p for p in own),
                              code="missing_tensor")
        r = context.pattern_value(module, config.get("rank_pattern"), config["r"])
        alpha = context.pattern_value(module, config.get("alpha_pattern"), config["alpha"])
        if any(rank != r for rank in found.pop("ranks")):
            raise FormatError(f"{module}: the low-rank LoKr tensors have another rank than r / rank_pattern give it "
                              f"({r})", file=file, location=module, expected=r,
                              found={k: list(v.shape) for k, v in own.items()}, hint=_FIX, code="rank_mismatch")
        (a, b), (c, d) = found["out_factors"], found["in_factors"]
        want = peft_layout(a * b, c * d, r, config["decompose_both"], config["decompose_factor"])
        if want != found:
            raise FormatError(f"{module}: PEFT builds LoKr [{a * b}, {c * d}] at r={r} as {_describe(want)}, the file "
                              f"holds {_describe(found)}", file=file, location=module, hint=_FIX,
                              code="layout_mismatch")
        return {"kind": "linear", "shape": [a * b, c * d], "r": int(r), "alpha": alpha, **found}

    # ---- write ----------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        config = adapter.config
        for module, target in sorted(adapter.targets.items()):
            if target.get("kind") != "linear":
                return (f"{module} is a {target.get('kind')!r} target; PEFT 0.21's LoKr adapts nn.Linear (and torch "
                        "convolutions), not transformers Conv1D (GPT-2)")
            fan_in, fan_out = in_out_features("linear", target["shape"])
            want = peft_layout(fan_out, fan_in, int(target["r"]), bool(config.get("decompose_both", False)),
                               int(config.get("decompose_factor", -1)))
            have = {k: target.get(k) for k in want}
            if have != want:
                return (f"{module} holds {_describe(have)}; PEFT builds {_describe(want)} for r={target['r']}, "
                        f"decompose_both={config.get('decompose_both', False)}, "
                        f"decompose_factor={config.get('decompose_factor', -1)}")
        expected = {k for m, t in adapter.targets.items() for k in LokrMethod().expected_tensors(m, t, config)}
        missing = sorted(expected - set(adapter.tensors))
        if missing:
            return f"the tensor {missing[0]} is missing"
        extra = sorted(set(adapter.tensors) - expected)
        if extra:
            return f"the tensor {extra[0]} has no place in a PEFT LoKr file and would be lost"
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {**DEFAULTS, **adapter.config}
        targets, own = adapter.targets, adapter.tensors
        if context.release is not None and context.release.before(SCALED_SINCE):
            targets, own = _unscaled(targets, own)
        modules = sorted(targets)
        tensors = {}
        for module in modules:
            for param in tensor_shapes(targets[module]):
                tensors[context.key(module, PREFIX + param)] = own[canonical_key(module, "lokr", param)]
        fields = {
            **context.selection(modules, wanted=config.get("target_modules"), layers=config.get("layers_to_transform")),
            **_ranks(targets, context),
            **{k: config[k] for k in ("rank_dropout", "module_dropout", "rank_dropout_scale", "decompose_both",
                                      "decompose_factor", "use_effective_conv2d")},
            "init_weights": context.original.get("init_weights", config["init_weights"]),
            "modules_to_save": None,
        }
        if "auto_mapping" not in context.original:
            fields["auto_mapping"] = None
        return fields, tensors


def _unscaled(targets: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, np.ndarray]
              ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """The same updates with each module's alpha / r folded into w1 (or w1_a) and alpha = r: what a PEFT release
    that applies no scale (before 0.14.0) and one that does both compute as the adapter's update."""
    out_targets, out_tensors = {}, dict(tensors)
    for module, target in targets.items():
        out_targets[module] = {**target, "alpha": target["r"]}
        scale = float(target["alpha"]) / float(target["r"])
        if scale != 1.0:
            key = canonical_key(module, "lokr", "w1" if target["w1_full"] else "w1_a")
            value = np.asarray(tensors[key])
            out_tensors[key] = (value.astype(np.float64) * scale).astype(value.dtype)
    return out_targets, out_tensors


def _describe(layout: Mapping[str, Any]) -> str:
    (a, b), (c, d) = layout["out_factors"], layout["in_factors"]
    w1 = f"w1 [{a}, {c}]" if layout["w1_full"] else f"w1_a @ w1_b ([{a}, {c}])"
    w2 = f"w2 [{b}, {d}]" if layout["w2_full"] else f"w2_a @ w2_b ([{b}, {d}])"
    return f"{w1} x {w2}"


def _ranks(targets: Mapping[str, Mapping[str, Any]], context: Any) -> dict[str, Any]:
    """r, alpha, rank_pattern, alpha_pattern under which PEFT gives every target its own r and alpha: the
    original's when they still do, else the most common values plus one pattern entry per other module,
    else every other module's full path as its key."""
    values = {field: {m: t[field] for m, t in targets.items()} for field, _ in _PATTERNS}
    original = context.original
    keep = {k: original[k] for k in ("r", "alpha", "rank_pattern", "alpha_pattern") if k in original}
    computed: dict[str, Any] = {}
    for field, pattern in _PATTERNS:
        computed[field], computed[pattern] = context.patterns(values[field])
    full_paths = {**computed, **{pattern: {m: values[field][m] for m in sorted(targets)
                                           if values[field][m] != computed[field]} for field, pattern in _PATTERNS}}
    release = context.release
    if release is not None and release.added(context.peft_type) is not None:  # else the format refuses the release
        for _, pattern in _PATTERNS:
            if computed[pattern] and not release.knows(context.peft_type, pattern):
                added = release.added(context.peft_type, pattern)
                raise release.refusal(pattern, computed[pattern], added[0] if added else None)
    for fields in (keep, computed, full_paths):
        given = {field: (fields.get(field, DEFAULTS[field]), dict(sorted((fields.get(pattern) or {}).items())))
                 for field, pattern in _PATTERNS}
        if fields and all(context.pattern_values(m, given) == {f: values[f][m] for f in values} for m in targets):
            return {k: fields.get(k, DEFAULTS[k]) for k in ("r", "alpha", "rank_pattern", "alpha_pattern")}
    raise LossyConversionError("no r / alpha / rank_pattern / alpha_pattern give every module its rank and alpha under "
                               "PEFT's matching", location="$.targets", code="peft_version")


__all__ = ["LokrPeftCodec", "check_config"]
