"""DoRA (Liu et al., 2024) as an adapterkit :class:`Method`: method id ``dora``.

Weight-decomposed low-rank adaptation: LoRA's ``A`` and ``B`` give the direction
update, and a learned magnitude vector ``m`` (one value per output row) rescales
each row of the updated weight::

    W' = m * (W + s B A) / ||W + s B A||_row          (s = alpha / r, or alpha / sqrt(r))

Canonical tensors per adapted module ``M``: ``M.dora.A`` ``[r, in]``,
``M.dora.B`` ``[out, r]`` and ``M.dora.magnitude`` ``[out]``. For a GPT-2
Conv1D (weight stored ``[in, out]``) the norm is still taken over each *output*
(a column of the stored weight), as PEFT does with ``fan_in_fan_out``. A new
adapter starts with ``B = 0`` and ``m = ||W||_row``: it changes nothing.

The forward pass is PEFT's (``DoraLinearLayer``): the norm is recomputed from
the current ``A``, ``B`` and detached from the graph. The config is LoRA's
(same fields, same defaults). The update is not additive, so merging uses
:meth:`DoraMethod.merged_weight` instead of ``delta_weight``. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adapterkit.core.plugin.capabilities import MergedWeight

from .config import CONFIG_SCHEMA
from .method import LoraFamily
from .targeting import in_out_features

DORA_CONFIG_SCHEMA: dict[str, Any] = {
    **CONFIG_SCHEMA,
    "title": "DoRA config (method.config of a dora adapter): the LoRA fields, same meaning and defaults",
}


class DoraMethod(LoraFamily, MergedWeight):
    """Weight-decomposed LoRA: LoRA's direction update plus a learned per-output magnitude.

    Not :class:`~adapterkit.LowRank`: the magnitude rescales ``W + dW`` row by row, so the
    update depends on the base weight (and DoRA adapters do not add up: no runtime composition).
    """

    name = "dora"
    version = "1"
    description = "DoRA: LoRA direction update with a learned per-output magnitude m (mergeable, not additive)"
    params = ("A", "B", "magnitude")

    def config_schema(self) -> dict[str, Any]:
        return DORA_CONFIG_SCHEMA

    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_tensors(module, target, config)
        _, fan_out = in_out_features(target.get("kind", "linear"), target["shape"])
        return {**shapes, f"{module}.dora.magnitude": (fan_out,)}

    def merged_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], base_weight: np.ndarray) -> np.ndarray:
        """``m / ||W + s B A||_row * (W + s B A)`` in the stored orientation, float32 (float64 for a float64 base).

        ``tensors`` may be keyed canonically (``<module>.dora.A``) or by param (``A``, ``B``, ``magnitude``).
        """
        magnitude = tensors.get(f"{module}.dora.magnitude", tensors.get("magnitude"))
        if magnitude is None:
            from adapterkit.core.errors import TensorFileError

            raise TensorFileError(f"DoRA magnitude of {module} is missing", location=f"{module}.dora.magnitude",
                                  found=sorted(tensors), code="missing_tensor")
        work = np.float64 if np.asarray(base_weight).dtype == np.float64 else np.float32
        delta = self.factors(module, target, config, tensors).delta(target.get("kind", "linear")).astype(work, copy=False)
        return dora_merge(np.asarray(base_weight, dtype=work), delta, np.asarray(magnitude, dtype=work),
                          conv1d=target.get("kind") == "conv1d")


def dora_merge(weight: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, conv1d: bool = False) -> np.ndarray:
    """``m / ||W + dW||_row * (W + dW)``; ``weight`` and ``delta`` in the stored orientation, ``magnitude`` ``[out]``.

    Rows are outputs: for a Conv1D (``[in, out]``) the norm runs over each column.
    """
    total = weight + delta
    axis = 0 if conv1d else 1
    norm = np.sqrt(np.sum(np.square(total, dtype=total.dtype), axis=axis, dtype=total.dtype))
    factor = (magnitude / norm).astype(total.dtype, copy=False)
    return np.ascontiguousarray(total * (factor[None, :] if conv1d else factor[:, None]))
