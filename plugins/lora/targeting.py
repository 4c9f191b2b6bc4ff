"""Which modules LoRA adapts, and with which rank and alpha.

The string rules (suffix, regex, patterns, layer index) are torch-free so that
``validate`` and ``inspect`` can use them; :func:`select_modules` walks a live
model and imports torch lazily.

Rules (documented in the config schema):

- ``target_modules`` as a list: a module matches when its path equals an entry
  or ends with ``"." + entry`` (whole dotted components, PEFT's rule), so
  ``"self_attn.q_proj"`` and ``"q_proj"`` both work.
- ``target_modules`` as a string: a regex full-matched against the module path,
  except ``"all-linear"``: every supported linear module but the output head.
- ``rank_pattern`` / ``alpha_pattern``: key ``k`` matches path ``m`` when
  ``re.match(rf"(.*\\.)?({k})$", m)``; the first matching key wins.
- ``layers_to_transform``: the layer index of a module is the first all-digit
  component of its path (``model.layers.3.mlp.up_proj`` -> 3); modules without
  one are skipped when the option is set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALL_LINEAR = "all-linear"
#: last path components that name a task or output head, never adapted by "all-linear"
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "embed_out", "output", "qa_outputs"})


def matches_target(path: str, target_modules: str | Sequence[str]) -> bool:
    """Whether ``path`` is selected by ``target_modules`` ("all-linear" is handled by the caller)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in target_modules)


def pattern_value(path: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """The value of the first key of ``patterns`` matching ``path`` (PEFT's rule), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_index(path: str) -> int | None:
    """The first all-digit component of ``path`` (the block index), or None."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_hparams(path: str, config: Mapping[str, Any]) -> tuple[int, float]:
    """(r, alpha) of one module under ``config``, patterns applied."""
    r = pattern_value(path, config.get("rank_pattern") or {}, config.get("r", 8))
    alpha = pattern_value(path, config.get("alpha_pattern") or {}, config.get("alpha", 8))
    return int(r), alpha


def in_out_features(kind: str, shape: Sequence[int]) -> tuple[int, int]:
    """(in, out) of a module from its kind and stored weight shape (Conv1D stores [in, out])."""
    return (int(shape[0]), int(shape[1])) if kind == "conv1d" else (int(shape[1]), int(shape[0]))


def is_head(path: str) -> bool:
    """Whether ``path`` names an output or task head by its last component."""
    return path.rsplit(".", 1)[-1] in HEAD_NAMES


# ---- torch: walking a live model --------------------------------------------

def walk_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, module) of every sub-module, a LoRA wrapper standing for the module it wraps.

    The wrapper's own children (``base_layer``, dropout) are not visited, so a
    second injection sees the same paths as the first.
    """
    from .layer import LoraLayer

    seen: set[int] = set()

    def visit(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if not isinstance(child, LoraLayer):
                yield from visit(child, path)

    yield from visit(model, "")


def select_modules(model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The modules ``config`` selects, by path, in model order (wrappers included as themselves).

    Raises UsageError when a selected module cannot be adapted or nothing is selected.
    """
    from adapterkit.core.errors import UsageError

    from .layer import LoraLayer, module_kind

    target_modules = config["target_modules"]
    layers = config.get("layers_to_transform")
    output_head = _output_embeddings(model)
    selected: dict[str, torch.nn.Module] = {}
    for path, module in walk_modules(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if target_modules == ALL_LINEAR:
            if module_kind(base) is None or is_head(path) or output_head in (module, base):
                continue
        elif not matches_target(path, target_modules):
            continue
        if layers is not None and layer_index(path) not in layers:
            continue
        if module_kind(base) is None:
            raise UsageError(
                f"target_modules selects {path!r}, a {type(base).__name__}; LoRA adapts only "
                "nn.Linear and transformers Conv1D modules",
                location="$.method.config.target_modules", found=path,
                hint="name the linear layers inside it instead (e.g. its q_proj / v_proj)", code="bad_target",
            )
        selected[path] = module
    if not selected:
        raise UsageError(
            "target_modules selects no module of the model", location="$.method.config.target_modules",
            found=target_modules,
            hint='use module-name suffixes such as ["q_proj", "v_proj"], a regex matching whole module paths, '
            'or "all-linear"; check layers_to_transform too',
            code="no_targets",
        )
    return selected


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
