"""The built-in ``kohya:LORA`` codec: sd-scripts' ``networks.lora`` layout (and LyCORIS' LoCon on linear layers).

- ``<lora_name>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], ``.alpha`` a 0-dim buffer;
  ``scale = alpha / r`` where alpha 0, None or a missing key means r (``LoRAModule.__init__``,
  ``create_network_from_weights``).
- ``save_weights`` casts every tensor, alpha included, to the save dtype.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from adapterkit.core.errors import LossyConversionError, TensorFileError
from adapterkit.core.format.adapter import Adapter, canonical_key
from adapterkit.core.plugin.codecs import Codec

from .context import KohyaReadContext, KohyaWriteContext

LEAVES = ("lora_down.weight", "lora_up.weight", "alpha")


class KohyaLoraCodec(Codec):
    format = "kohya"
    key = "LORA"
    methods = ("lora",)
    description = "kohya / sd-scripts LoRA (lora_down / lora_up / alpha)"

    def read(self, context: KohyaReadContext) -> Adapter:
        file = str(context.file)
        for name, parts in context.modules.items():
            context.check_leaves(name, LEAVES, "lora")
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                missing = "lora_down" if "lora_down.weight" not in parts else "lora_up"
                raise TensorFileError(f"module has no {missing}.weight", file=file, location=name, code="unpaired")
            a, b = parts["lora_down.weight"], parts["lora_up.weight"]
            if a.ndim == 4 or b.ndim == 4:
                raise LossyConversionError("Conv2d LoRA (4-d lora_down / lora_up) is not supported by adapterkit's lora method",
                                           file=file, location=f"{name}.lora_down.weight", found=list(a.shape),
                                           code="unsupported")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise TensorFileError("lora_down / lora_up are not [r, in] / [out, r]", file=file, location=name,
                                      found=f"{list(a.shape)}, {list(b.shape)}", code="shape")
        dtype = context.dtype({f"{n}.{leaf}": p[leaf] for n, p in context.modules.items()
                               for leaf in ("lora_down.weight", "lora_up.weight")}, "lora_down / lora_up tensors")
        targets: dict[str, dict[str, Any]] = {}
        tensors: dict[str, np.ndarray] = {}
        for name, parts in sorted(context.modules.items()):
            module = context.module_of(name)
            a, b = parts["lora_down.weight"], parts["lora_up.weight"]
            r = int(a.shape[0])
            alpha = context.alpha(name, r)
            shape = [int(b.shape[0]), int(a.shape[1])]
            context.check_shape(module, shape, name)
            targets[module] = {"kind": "linear", "shape": shape, "r": r, "alpha": alpha}
            tensors[canonical_key(module, "lora", "A")] = a
            tensors[canonical_key(module, "lora", "B")] = b
        rs, alphas = Counter(t["r"] for t in targets.values()), Counter(t["alpha"] for t in targets.values())
        config: dict[str, Any] = {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets})}
        common_r, common_alpha = max(rs, key=lambda v: (rs[v], -v)), max(alphas, key=lambda v: (alphas[v], -v))
        if common_r != 8:
            config["r"] = common_r
        if common_alpha != 8:
            config["alpha"] = common_alpha
        return context.adapter("lora", config, targets, tensors, dtype)

    def write(self, adapter: Adapter, context: KohyaWriteContext) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        manifest = adapter.manifest
        rslora = bool(manifest.config.get("use_rslora", False))
        extra = sorted(set(adapter.tensors) - {canonical_key(m, "lora", p) for m in manifest.targets for p in "AB"})
        if extra:
            raise LossyConversionError("tensor has no place in a kohya LoRA file and would be lost", location=extra[0],
                                       expected="only <module>.lora.A / .lora.B of the manifest's targets", code="unsupported")
        out: dict[str, np.ndarray] = {}
        for module, target in sorted(manifest.targets.items()):
            name = context.lora_name(module)
            if target.get("kind") != "linear":
                raise LossyConversionError(f"kohya LoRA here holds linear modules only, not {target.get('kind')!r}",
                                           location=f"$.targets[{module!r}].kind", expected="linear", found=target.get("kind"),
                                           code="unsupported")
            context.check_shape(module, target["shape"], f"{module}.weight")
            a, b = adapter.tensors.get(canonical_key(module, "lora", "A")), adapter.tensors.get(canonical_key(module, "lora", "B"))
            r, alpha = int(target["r"]), target["alpha"]
            if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                raise TensorFileError("LoRA tensors missing or not [r, in] / [out, r]", location=canonical_key(module, "lora", "A"),
                                      expected=f"A [{r}, in], B [out, {r}]", code="shape")
            alpha = alpha * math.sqrt(r) if rslora else alpha  # kohya scale alpha/r == rsLoRA alpha/sqrt(r)
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
            alpha_tensor = context.alpha_tensor(name, alpha, r)
            if alpha_tensor is not None:
                out[f"{name}.alpha"] = alpha_tensor
        rs = {t["r"] for t in manifest.targets.values()}
        alphas = {t["alpha"] * math.sqrt(t["r"]) if rslora else t["alpha"] for t in manifest.targets.values()}
        fields = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(next(iter(rs))) if len(rs) == 1 else "Dynamic",
            "ss_network_alpha": str(float(next(iter(alphas)))) if len(alphas) == 1 else "Dynamic",
        }
        return fields, out
