"""The kohya ``LOKR`` codec: LyCORIS LoKr networks inside adapterkit's built-in ``kohya`` format.

The ``kohya`` format owns the ``.safetensors`` file (module names, alpha tensors, metadata); this codec
says what a module with ``lokr_*`` tensors means, through the context the format hands it
(docs/plugins.md, "The kohya codec context"). Public API only.

Restated from LyCORIS 4.1.3 (``lycoris/modules/lokr.py``: ``LokrModule.__init__``,
``custom_state_dict``, ``make_module_from_state_dict``; ``lycoris/functional/lokr.py``), never copied.
Per adapted ``nn.Linear`` ``[out, in]`` with ``out = a * b`` and ``in = c * d``::

    <lora_name>.lokr_w1   [a, c]   or  .lokr_w1_a [a, r] + .lokr_w1_b [r, c]   -> <module>.lokr.w1 / w1_a / w1_b
    <lora_name>.lokr_w2   [b, d]   or  .lokr_w2_a [b, r] + .lokr_w2_b [r, d]   -> <module>.lokr.w2 / w2_a / w2_b
    <lora_name>.alpha     0-dim                                               -> target alpha

byte for byte; ``delta W = kron(W1, W2) * scale``, the update LyCORIS' forward adds (``get_weight``,
scale applied once). The scale, as ``LokrModule`` computes it:

- ``r`` is the inner dimension of the factorised half (``lokr_w1_a.shape[1]``, else
  ``lokr_w2_a.shape[1]``); ``scale = alpha / r``, alpha 0 or missing meaning ``r`` (LyCORIS stores
  ``alpha * sqrt(r)`` for ``rs_lora``, so ``alpha / r`` is the scale in either case);
- both halves full matrices (``lokr_w1`` and ``lokr_w2``): **scale 1** whatever the file's alpha
  (``if self.use_w2 and self.use_w1: alpha = lora_dim``). Such a module is read with
  ``r = alpha = `` the file's alpha (LyCORIS saves its ``lora_dim`` there: an integer) so that
  writing gives the same tensor back; a non-integer alpha is read as ``r = alpha = 1``. Writing
  a full/full target whose ``alpha / r`` is not 1 (a PEFT LoKr, where every layout scales by
  ``alpha / r``) folds the scale into ``lokr_w1`` (one rounding of ``w1 * scale`` in its dtype),
  as LyCORIS and ComfyUI would ignore it otherwise.

Refused on reading, with a one-line error: ``lokr_t1`` / ``lokr_t2`` (Tucker, LyCORIS'
``use_tucker`` on a conv layer), ``dora_scale`` (weight decomposition), any other leaf, tensors that
are not 2-d (convolution LoKr), a half given both full and factorised, and ranks that differ between
the halves. Writing: ``linear`` targets only (LyCORIS adapts ``nn.Linear``, not transformers ``Conv1D``).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from adapterkit import Adapter, Codec, FormatError, LossyConversionError, TensorFileError, canonical_key

from .math import PARAMS, layout_of, lycoris_full_scale, tensor_shapes

NAME = "lokr"
PREFIX = "lokr_"
#: file leaf -> canonical parameter
LEAVES = {f"{PREFIX}{p}": p for p in PARAMS}


class LokrKohyaCodec(Codec):
    """LyCORIS' LoKr layout (``lokr_*``) in kohya files, for the ``lokr`` method."""

    format = "kohya"
    key = "LOKR"
    methods = (NAME,)
    description = "LyCORIS LoKr in kohya files (lokr_w1 / lokr_w2 or their _a/_b halves, alpha; linear modules)"

    # ---- read ------------------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        file = str(context.file)
        layouts: dict[str, dict[str, Any]] = {}
        for name, parts in context.modules.items():
            context.check_leaves(name, [*LEAVES, "alpha"], NAME)
            own = {LEAVES[leaf]: tensor for leaf, tensor in parts.items() if leaf in LEAVES}
            shapes = {f"{PREFIX}{p}": [int(n) for n in t.shape] for p, t in own.items()}
            if any(len(s) != 2 for s in shapes.values()):
                raise LossyConversionError("convolution LoKr (tensors that are not 2-d) is not supported by adapterkit's "
                                           "lokr method", file=file, location=name, found=shapes, code="unsupported")
            for side in ("w1", "w2"):
                if side in own and (f"{side}_a" in own or f"{side}_b" in own):
                    raise FormatError(f"LoKr module has both {PREFIX}{side} and {PREFIX}{side}_a / _b", file=file,
                                      location=name, found=sorted(shapes), code="shape")
            layout = layout_of(own)
            if layout is None:
                raise TensorFileError("LoKr module lacks a half: it needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 "
                                      "(or lokr_w2_a + lokr_w2_b)", file=file, location=name, found=sorted(shapes),
                                      code="unpaired")
            if len(set(layout["ranks"])) > 1:
                raise TensorFileError("LoKr factors disagree on the rank (lokr_w*_a [., r], lokr_w*_b [r, .], one r)",
                                      file=file, location=name, found=shapes, code="shape")
            layouts[name] = layout
        dtype = context.dtype({f"{n}.{leaf}": t for n, p in context.modules.items() for leaf, t in p.items()
                               if leaf in LEAVES}, "lokr_* tensors")
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        warnings: list[str] = []
        for name, parts in sorted(context.modules.items()):
            module, layout = context.module_of(name), layouts[name]
            (a, b), (c, d) = layout["out_factors"], layout["in_factors"]
            shape = [a * b, c * d]
            context.check_shape(module, shape, name)
            if lycoris_full_scale(layout["w1_full"], layout["w2_full"]):
                value = context.alpha(name, 1)
                r = int(value) if float(value).is_integer() and value >= 1 else 1
                if r != value:
                    warnings.append(f"{name}: alpha {value} of a LoKr module with two full matrices is ignored by "
                                    "LyCORIS (scale 1); it is read as alpha = r = 1")
                alpha: int | float = r
            else:
                r = int(layout["ranks"][0])
                alpha = context.alpha(name, r)
            targets[module] = {"kind": "linear", "shape": shape, "r": r, "alpha": alpha, "out_factors": [a, b],
                               "in_factors": [c, d], "w1_full": layout["w1_full"], "w2_full": layout["w2_full"]}
            for leaf, tensor in parts.items():
                if leaf in LEAVES:
                    tensors[canonical_key(module, NAME, LEAVES[leaf])] = tensor
        rs, alphas = Counter(t["r"] for t in targets.values()), Counter(t["alpha"] for t in targets.values())
        config: dict[str, Any] = {"r": max(rs, key=lambda v: (rs[v], -v)), "alpha": max(alphas, key=lambda v: (alphas[v], -v)),
                                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
        if any(not t["w1_full"] for t in targets.values()):
            config["decompose_both"] = True
        return context.adapter(NAME, config, targets, tensors, dtype, warnings=warnings)

    # ---- write -----------------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        other = sorted(m for m, t in adapter.targets.items() if t.get("kind") != "linear")
        if other:
            return (f"{other[0]} is a {adapter.targets[other[0]].get('kind')!r} target; LyCORIS LoKr adapts nn.Linear "
                    "(and convolutions), not transformers Conv1D (GPT-2)")
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets = adapter.targets
        if not targets:
            raise FormatError("the adapter has no target to write", location="$.targets", code="empty")
        known = {canonical_key(m, NAME, p) for m, t in targets.items() for p in tensor_shapes(t)}
        extra = sorted(set(adapter.tensors) - known)
        if extra:
            raise LossyConversionError("tensor has no place in a kohya LoKr file and would be lost", location=extra[0],
                                       expected="only the <module>.lokr.* factors of each target's layout", code="unsupported")
        out: dict[str, np.ndarray] = {}
        for module, target in sorted(targets.items()):
            name = context.lora_name(module)
            context.check_shape(module, target["shape"], f"{module}.weight")
            r, alpha = int(target["r"]), target["alpha"]
            own: dict[str, np.ndarray] = {}
            for param in tensor_shapes(target):
                tensor = adapter.tensors.get(canonical_key(module, NAME, param))
                if tensor is None:
                    raise TensorFileError(f"LoKr tensor {param} of {module} is missing",
                                          location=canonical_key(module, NAME, param), code="missing_tensor")
                own[param] = tensor
            if lycoris_full_scale(bool(target["w1_full"]), bool(target["w2_full"])):
                scale = float(alpha) / r
                if scale != 1:  # LyCORIS / ComfyUI use scale 1 here: carry alpha / r in w1
                    w1 = own["w1"]
                    own["w1"] = (np.asarray(w1, dtype=np.float64) * scale).astype(w1.dtype)
                alpha = r
            for param, tensor in own.items():
                out[f"{name}.{PREFIX}{param}"] = tensor
            alpha_tensor = context.alpha_tensor(name, alpha, r)
            if alpha_tensor is not None:
                out[f"{name}.alpha"] = alpha_tensor
        rs = {int(t["r"]) for t in targets.values()}
        alphas = {float(t["alpha"]) for t in targets.values()}
        fields = {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": str(next(iter(rs))) if len(rs) == 1 else "Dynamic",
            "ss_network_alpha": str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
            "ss_network_args": json.dumps({"algo": "lokr"}),
        }
        return fields, out


__all__ = ["LEAVES", "LokrKohyaCodec"]
