"""Which modules LoRA adapts, and with which rank and alpha.

The module-selection rules are adapterkit's (PEFT's, restated: :mod:`adapterkit.core.format.targeting`,
torch-free; :func:`adapterkit.select_modules` walks a live model). LoRA adds the
per-module rank and alpha of ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.format.targeting import (  # noqa: F401  (LoRA's modules import the rules from here)
    ALL_LINEAR, HEAD_NAMES, PARAMETER, in_out_features, is_head, layer_index, matches_target, pattern_value,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


def module_hparams(path: str, config: Mapping[str, Any]) -> tuple[int, float]:
    """(r, alpha) of one module under ``config``, patterns applied."""
    r = pattern_value(path, config.get("rank_pattern") or {}, config.get("r", 8))
    alpha = pattern_value(path, config.get("alpha_pattern") or {}, config.get("alpha", 8))
    return int(r), alpha


def select_modules(model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The modules ``config`` (``target_modules``, ``layers_to_transform``) selects for LoRA, in model order."""
    from adapterkit import select_modules as select

    return select(model, config["target_modules"], layers_to_transform=config.get("layers_to_transform"),
                  method="LoRA")
