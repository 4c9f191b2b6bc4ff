"""The contract a PETL method plugin implements.

A :class:`Method` describes one method's whole life cycle. The torch-free part
(config schema, expected tensors, scale) serves ``validate``, ``inspect`` and
``convert`` without importing torch; the torch part (inject, load, extract,
merge) is called only by commands that run a model, and a plugin imports torch
inside those methods, never at module import.

Canonical tensor keys are ``<module path>.<method>.<param>`` (docs/format.md).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .adapter import Adapter


class Method(ABC):
    """One PETL method. Subclass it and register an instance from a plugin."""

    #: method id used in manifests, the CLI and ``adapterkit plugins``
    name: str = ""
    #: version of this method's config and tensor layout
    version: str = "1"
    #: one line for ``adapterkit plugins``
    description: str = ""
    #: whether the adapter can be folded into the base weights exactly
    mergeable: bool = False
    #: plugin API version this method targets (see adapterkit.PLUGIN_API_VERSION)
    api_version: str = "1"
    #: runtime composition blocks this method runs (``"stack"``, ``"average"``, ``"weighted_sum"``;
    #: adapterkit.core.composition); empty: none, and ``activate`` refuses with :meth:`composition_refusal`
    composition_kinds: tuple[str, ...] = ()
    #: strategies this method gives ``adapterkit compose`` through :meth:`compose` (LoRA's own are
    #: adapterkit's: linear, cat, svd, ties, dare_*, magnitude_prune); empty: compose refuses the method
    compose_strategies: tuple[str, ...] = ()

    # ---- torch-free: validation, inspection, conversion -------------------
    @abstractmethod
    def config_schema(self) -> dict[str, Any]:
        """JSON Schema of ``method.config`` in the manifest."""

    def default_config(self) -> dict[str, Any]:
        """Values of config fields that may be left out of the manifest."""
        return {}

    def resolve_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The full config: defaults filled in. Raise UsageError for invalid values."""
        return {**self.default_config(), **config}

    def minimal_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config as written to the manifest: fields equal to their default left out."""
        defaults = self.default_config()
        return {k: v for k, v in sorted(config.items()) if k not in defaults or defaults[k] != v}

    def target_schema(self) -> dict[str, Any]:
        """JSON Schema of one entry of ``targets`` (beyond ``kind`` and ``shape``)."""
        return {"type": "object"}

    @abstractmethod
    def expected_tensors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Canonical key -> shape of every tensor the adapter must hold for ``module``."""

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        """Method-specific problems of one target, as messages (empty when fine)."""
        return []

    def merge_refusal(self, config: Mapping[str, Any]) -> str | None:
        """Why this adapter cannot be merged into the base, or None when it can."""
        return None if self.mergeable else f"method {self.name!r} cannot be merged into the base weights"

    def delta_weight(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The float32 change to the module's base weight (same shape as ``target['shape']``), if mergeable.

        ``tensors`` holds this module's tensors under their canonical keys (``<module>.<method>.<param>``).
        """
        return None

    def composition_refusal(self, composition: Any) -> str | None:
        """Why this method cannot run ``composition`` (an :class:`adapterkit.core.composition.Block`), or None.

        Torch-free (``validate`` calls it). The default accepts exactly the block kinds in
        :attr:`composition_kinds`; override it to refuse shapes of tree the method cannot run.
        """
        unsupported = [kind for kind in composition.kinds() if kind not in self.composition_kinds]
        if not unsupported:
            return None
        can = (f"it runs {', '.join(self.composition_kinds)} blocks only" if self.composition_kinds
               else "it has no runtime composition")
        return f"method {self.name!r} cannot run a {unsupported[0]} composition ({composition!r}): {can}"

    # ---- torch: injection, training, extraction, merge ---------------------
    @abstractmethod
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any], adapter_name: str = "default",
               targets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Wrap the model's modules for this method; return the targets as written to the manifest.

        With ``targets`` (from a saved manifest) exactly those modules are wrapped with
        their recorded per-module fields; otherwise the config's selection decides.
        New parameters are initialised for training.
        """

    @abstractmethod
    def load_state(self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Copy canonical tensors into an injected model (shapes must match)."""

    @abstractmethod
    def extract_state(self, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors under canonical keys."""

    @abstractmethod
    def trainable_parameters(self, model: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
        """The parameters a trainer updates for this adapter."""

    def set_enabled(self, model: torch.nn.Module, enabled: bool) -> None:
        """Turn every adapter of this method on or off (off: exactly the base output)."""
        raise NotImplementedError(f"method {self.name!r} cannot be disabled")

    def merge(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        """Fold the adapter into the base weights in place."""
        raise NotImplementedError(self.merge_refusal({}) or f"method {self.name!r} has no merge")

    def unmerge(self, model: torch.nn.Module, adapter_name: str = "default") -> None:
        """Undo :meth:`merge`, restoring the base weights exactly."""
        raise NotImplementedError(f"method {self.name!r} has no unmerge")

    def unload(self, model: torch.nn.Module) -> torch.nn.Module:
        """Remove every wrapper of this method, returning the base modules."""
        raise NotImplementedError(f"method {self.name!r} cannot be unloaded")

    # ---- runtime composition (adapterkit.core.activation, docs/compose.md) ------
    def activate_composition(self, model: torch.nn.Module, composition: Any) -> None:
        """Run only the adapters of ``composition``, combined as its blocks say, until deactivated.

        Called by ``adapterkit.activate`` after it checked that every member is injected into
        ``model`` under its name with this method, none is merged, and :meth:`composition_refusal`
        is None. A method that opts in (:attr:`composition_kinds`) overrides this and
        :meth:`deactivate_composition`.
        """
        raise NotImplementedError(self.composition_refusal(composition)
                                  or f"method {self.name!r} does not implement activate_composition")

    def deactivate_composition(self, model: torch.nn.Module) -> None:
        """Undo :meth:`activate_composition`: the model runs as after injection again."""
        raise NotImplementedError(f"method {self.name!r} has no runtime composition")

    def compose(self, adapters: Sequence[Adapter], weights: Sequence[float], strategy: str,
                options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
        """Combine adapters of this method into a new one's ``(config, targets, tensors)``, for ``compose``.

        Called only with a ``strategy`` from :attr:`compose_strategies`, one finite float
        weight per adapter, and adapters that the caller checked were made for one base
        model (same kind and shape for every shared module). ``options`` holds what the
        user gave of ``density``, ``rank`` and ``seed``: raise ``UsageError`` for one the
        strategy does not take. adapterkit writes the rest of the manifest (base model,
        dtype, provenance naming the sources) and validates the result against
        :meth:`expected_tensors` before anything is saved.
        """
        raise NotImplementedError(f"method {self.name!r} declares compose strategies but does not implement compose")

    # ---- ONNX export (adapterkit.core.onnx_export, docs/onnx.md) -------------
    def export_factors(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any],
                       tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """The module's update as low-rank factors, for a swappable ONNX export; None when it has none.

        Returns float32 ``(A [in, r], B [r, out])`` with the scale folded into B, so that
        the module computes ``base(x) + (x @ A) @ B``; these become graph inputs. The
        default serves methods whose tensors are canonical ``A`` ``[r, in]`` and ``B``
        ``[out, r]`` with an additive update ``delta_weight = s * B @ A`` (LoRA, rsLoRA),
        and gives None to the others (see :func:`adapterkit.core.onnx_lora.default_export_factors`).
        """
        from .onnx_lora import default_export_factors

        return default_export_factors(self, module, target, config, tensors)

    def prepare_export(self, model: torch.nn.Module, mode: str = "merged",
                       adapter_name: str = "default") -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context manager that readies a model holding this adapter for ONNX tracing; it yields the module to trace.

        The exporter calls it with ``mode="merged"``. The default merges the adapter when the
        method can (undone on exit) and otherwise leaves the injected modules to be traced as
        they are (bottleneck adapters, virtual tokens, prefixes). Override it to swap in
        trace-friendly modules (see :func:`adapterkit.core.onnx_trace.default_prepare_export`).
        """
        from .onnx_trace import default_prepare_export

        return default_prepare_export(self, model, mode, adapter_name)


def capabilities(method: Method) -> dict[str, Any]:
    """What adapterkit can do with adapters of ``method``, for ``adapterkit plugins``.

    ``merge``: into the base weights; ``compose``: the strategies of ``adapterkit compose``;
    ``runtime_composition``: the blocks it runs (``compose --runtime``, ``activate``);
    ``adapter_pool``: served by :class:`adapterkit.AdapterPool` (hot-swap, mixed batches).
    """
    from .compose import COMPOSABLE_METHODS, STRATEGIES

    strategies = STRATEGIES if method.name in COMPOSABLE_METHODS else tuple(method.compose_strategies)
    return {"merge": bool(method.mergeable), "compose": list(strategies),
            "runtime_composition": list(method.composition_kinds), "adapter_pool": method.name == "lora"}
