"""The contract every PETL method plugin implements (its capabilities are in :mod:`.capabilities`).

A :class:`Method` describes one method's life cycle. The torch-free part
(config schema, expected tensors) serves ``validate``, ``inspect`` and
``convert`` without importing torch; the torch part (inject, load, extract,
merge) is called only by commands that run a model, and a plugin imports torch
inside those methods, never at module import.

Canonical tensor keys are ``<module path>.<method>.<param>`` (docs/format.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterkit.core.plugin.capabilities import can_merge
from adapterkit.core.plugin.hookspecs import PLUGIN_API_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Method(ABC):
    """One PETL method. Subclass it (and the capabilities it has) and register an instance from a plugin.

    The base contract is what every method has: a config, targets and their tensors, and the
    torch life cycle. What a method can do beyond that (give low-rank factors, merge, compose,
    run compositions, ...) it declares by subclassing the capabilities of
    :mod:`adapterkit.core.plugin.capabilities`; the core asks for those, never for a name.
    """

    #: method id used in manifests, the CLI and ``adapterkit plugins``
    name: str = ""
    #: version of this method's config and tensor layout
    version: str = "1"
    #: one line for ``adapterkit plugins``
    description: str = ""
    #: plugin API version this method targets (see adapterkit.PLUGIN_API_VERSION)
    api_version: str = PLUGIN_API_VERSION

    # ---- torch-free: config, targets, tensors ----------------------------------
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

    def shared_tensors(self, targets: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Key -> shape of tensors shared by every module (VeRA's projections), keyed ``<method>.<param>``.

        Default: none. They are stored once and handed to the capability calls of every module.
        """
        return {}

    def check_target(self, module: str, target: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
        """Method-specific problems of one target, as messages (empty when fine)."""
        return []

    def merge_refusal(self, config: Mapping[str, Any]) -> str | None:
        """Why an adapter with ``config`` cannot be merged into the base, or None when it can."""
        return None if can_merge(self) else f"method {self.name!r} cannot be merged into the base weights"

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
