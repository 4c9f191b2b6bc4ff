"""The kohya ``LOHA`` codec: LyCORIS LoHa networks inside adapterkit's built-in ``kohya`` format.

The ``kohya`` format owns the ``.safetensors`` file (module names, alpha tensors, metadata); this codec
says what a module with ``hada_*`` tensors means, through the context the format hands it
(docs/plugins.md, "The kohya codec context"). Public API only.

Restated from LyCORIS 4.1.3 (``lycoris/modules/loha.py``: ``LohaModule.__init__``,
``custom_state_dict``, ``make_module_from_state_dict``), never copied. Per adapted ``nn.Linear``::

    <lora_name>.hada_w1_a  [out, r]  -> <module>.loha.w1_a
    <lora_name>.hada_w1_b  [r, in]   -> <module>.loha.w1_b      (r = hada_w1_b.shape[0], LyCORIS' lora_dim)
    <lora_name>.hada_w2_a  [out, r]  -> <module>.loha.w2_a
    <lora_name>.hada_w2_b  [r, in]   -> <module>.loha.w2_b
    <lora_name>.alpha      0-dim     -> target alpha             (0 or missing: alpha = r, scale 1)

byte for byte; ``delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``, the update LyCORIS' forward
adds (``LohaModule.forward``: ``get_weight``, scale applied once). LyCORIS stores ``alpha *
sqrt(r)`` for ``rs_lora``, so ``alpha / r`` is the scale in either case. Refused on reading, with a
one-line error: Tucker tensors (``hada_t1`` / ``hada_t2``, LyCORIS' ``use_tucker`` on a conv
layer), ``dora_scale`` (weight decomposition), any other leaf, factors that are not 2-d, ranks that
differ between the two halves, and (with ``base``) a module whose base weight is a convolution.
Writing: ``linear`` targets only (LyCORIS adapts ``nn.Linear``, not transformers ``Conv1D``).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from adapterkit import Adapter, Codec, FormatError, LossyConversionError, TensorFileError, canonical_key

from .math import PARAMS
from .method import NAME

PREFIX = "hada_"
#: file leaf -> canonical parameter
LEAVES = {f"{PREFIX}{p}": p for p in PARAMS}


class LohaKohyaCodec(Codec):
    """LyCORIS' LoHa layout (``hada_*``) in kohya files, for the ``loha`` method."""

    format = "kohya"
    key = "LOHA"
    methods = (NAME,)
    description = "LyCORIS LoHa in kohya files (hada_w1_a ... / alpha; linear modules)"

    # ---- read ------------------------------------------------------------------------
    def read(self, context: Any) -> Adapter:
        file = str(context.file)
        for name, parts in context.modules.items():
            context.check_leaves(name, [*LEAVES, "alpha"], NAME)
            missing = [leaf for leaf in LEAVES if leaf not in parts]
            if missing:
                raise TensorFileError(f"LoHa module has no {missing[0]}", file=file, location=name,
                                      expected=list(LEAVES), found=sorted(parts), code="unpaired")
            shapes = {leaf: tuple(int(n) for n in parts[leaf].shape) for leaf in LEAVES}
            if any(len(s) != 2 for s in shapes.values()):
                raise LossyConversionError("convolution LoHa (factors that are not 2-d) is not supported by adapterkit's "
                                           "loha method", file=file, location=name, found=shapes, code="unsupported")
            (out, r), (r_b, inn) = shapes["hada_w1_a"], shapes["hada_w1_b"]
            if r != r_b or shapes["hada_w2_a"] != (out, r) or shapes["hada_w2_b"] != (r, inn):
                raise TensorFileError("LoHa factors are not w1_a, w2_a [out, r] and w1_b, w2_b [r, in] with one r",
                                      file=file, location=name, found=shapes, code="shape")
        dtype = context.dtype({f"{n}.{leaf}": p[leaf] for n, p in context.modules.items() for leaf in LEAVES},
                              "hada_* tensors")
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        for name, parts in sorted(context.modules.items()):
            module = context.module_of(name)
            out, r = (int(n) for n in parts["hada_w1_a"].shape)
            shape = [out, int(parts["hada_w1_b"].shape[1])]
            base = context.base_shape(module)
            if base is not None and len(base) != 2:
                raise LossyConversionError("LoHa on a convolution is not supported by adapterkit's loha method",
                                           file=file, location=name, found=base, code="unsupported")
            context.check_shape(module, shape, name)
            targets[module] = {"kind": "linear", "shape": shape, "r": r, "alpha": context.alpha(name, r)}
            for leaf, param in LEAVES.items():
                tensors[canonical_key(module, NAME, param)] = parts[leaf]
        rs, alphas = Counter(t["r"] for t in targets.values()), Counter(t["alpha"] for t in targets.values())
        config = {"r": max(rs, key=lambda v: (rs[v], -v)), "alpha": max(alphas, key=lambda v: (alphas[v], -v)),
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
        return context.adapter(NAME, config, targets, tensors, dtype)

    # ---- write -----------------------------------------------------------------------
    def refusal(self, adapter: Adapter) -> str | None:
        other = sorted(m for m, t in adapter.targets.items() if t.get("kind") != "linear")
        if other:
            return (f"{other[0]} is a {adapter.targets[other[0]].get('kind')!r} target; LyCORIS LoHa adapts nn.Linear "
                    "(and convolutions), not transformers Conv1D (GPT-2)")
        return None

    def write(self, adapter: Adapter, context: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        targets = adapter.targets
        known = {canonical_key(m, NAME, p) for m in targets for p in PARAMS}
        extra = sorted(set(adapter.tensors) - known)
        if extra:
            raise LossyConversionError("tensor has no place in a kohya LoHa file and would be lost", location=extra[0],
                                       expected="only <module>.loha.w1_a / w1_b / w2_a / w2_b of the manifest's targets",
                                       code="unsupported")
        out: dict[str, np.ndarray] = {}
        for module, target in sorted(targets.items()):
            name = context.lora_name(module)
            context.check_shape(module, target["shape"], f"{module}.weight")
            r, alpha = int(target["r"]), target["alpha"]
            for leaf, param in LEAVES.items():
                tensor = adapter.tensors.get(canonical_key(module, NAME, param))
                if tensor is None:
                    raise TensorFileError(f"LoHa tensor {param} of {module} is missing",
                                          location=canonical_key(module, NAME, param), code="missing_tensor")
                out[f"{name}.{leaf}"] = tensor
            alpha_tensor = context.alpha_tensor(name, alpha, r)
            if alpha_tensor is not None:
                out[f"{name}.alpha"] = alpha_tensor
        rs = {int(t["r"]) for t in targets.values()}
        alphas = {float(t["alpha"]) for t in targets.values()}
        if not out:
            raise FormatError("the adapter has no target to write", location="$.targets", code="empty")
        fields = {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": str(next(iter(rs))) if len(rs) == 1 else "Dynamic",
            "ss_network_alpha": str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
            "ss_network_args": json.dumps({"algo": "loha"}),
        }
        return fields, out


__all__ = ["LEAVES", "LohaKohyaCodec"]
