"""Capabilities: small contracts a method opts into by subclassing them beside :class:`adapterkit.Method`.

The core asks ``isinstance(method, LowRank)``, never "is this LoRA?": a third party's
method that subclasses a capability gets every command that capability serves.

===================  =======================================================================
capability           what it serves
===================  =======================================================================
:class:`LowRank`     the adapter pool, compose (linear, cat, svd, ties, dare, magnitude prune),
                     swappable ONNX export, ``.onnx_adapter``, ``validate --target``, ``to-lora``
:class:`DeltaWeight` merge (an additive update that needs no base weight), ``to-lora``
:class:`MergedWeight` merge (an update computed from the base weight), ``to-lora --base``
:class:`FromFactors` holding plain low-rank factors: the results of compose and ``to-lora``
:class:`Composable`  ``compose`` through the method's own strategies
:class:`RuntimeComposable` runtime composition blocks (``activate``, ``compose --runtime``)
:class:`Quantizable` ``train --quantize`` (the method that trains on a quantised base)
:class:`QuantizedBase` merge into a float base exactly as the quantised base was trained
:class:`MergedBias`  merge that also changes a module's bias
:class:`TraceExport` ONNX tracing of the method's own injected modules (``export onnx``)
:class:`TrainingHooks` training beyond plain gradients (AdaLoRA's regulariser and rank budget)
===================  =======================================================================

``tensors`` in every numpy call holds one module's tensors keyed by parameter name
(``"A"``, ``"B"``, ...) plus the adapter's shared tensors under their keys
(``<method>.<param>``, :meth:`adapterkit.Method.shared_tensors`), float arrays of any dtype.
Shapes follow the module's *stored* weight (``[out, in]``, or ``[in, out]`` for a GPT-2
``Conv1D``); factors are orientation-free: ``A [r, in]``, ``B [out, r]``.

Torch-free: a capability that touches a model imports torch inside its methods.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adapterkit.core.format.adapter import Adapter

#: adapterkit's own compose strategies, which every :class:`LowRank` method gets (adapterkit.core.ops.compose)
LOW_RANK_STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")

#: a target as the manifest records it: ``kind``, ``shape`` and the method's own fields
Target = Mapping[str, Any]


class Factors(NamedTuple):
    """One module's low-rank update: the module computes ``base(x) + scale * (x @ A.T) @ B.T``."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float

    def delta(self, kind: str = "linear") -> np.ndarray:
        """``scale * B @ A`` in float32, in the stored weight's orientation (transposed for ``conv1d``)."""
        a = np.asarray(self.a, dtype=np.float32)
        b = np.asarray(self.b, dtype=np.float32)
        delta = (b @ a) * np.float32(self.scale)
        return np.ascontiguousarray(delta.T if kind == "conv1d" else delta, dtype=np.float32)


class LowRank(ABC):
    """Gives low-rank factors per module: ``delta W = scale * B @ A``, exactly."""

    @abstractmethod
    def lora_factors(self, module: str, target: Target, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> Factors:
        """The module's factors (``A [r, in]``, ``B [out, r]``, ``scale``), computed from its tensors.

        A rank-0 module (AdaLoRA after pruning) gives ``r = 0`` factors; callers skip it.
        """

    def stacked_factors(self, module: str, target: Target, config: Mapping[str, Any],
                        tensors: Mapping[str, np.ndarray]) -> Factors | None:
        """A stacked ``parameter`` target's factors, one pair per index of its first (expert) axis:
        ``A [n, r, in]``, ``B [n, out, r]`` and the scale; None (the default) when the method has none.
        :meth:`lora_factors` refuses such a target: the commands that need one pair per module refuse it too."""
        return None


class DeltaWeight(ABC):
    """Has an additive update of each module's weight that needs no base weight."""

    @abstractmethod
    def delta_weight(self, module: str, target: Target, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 change to the module's weight, shaped like ``target["shape"]``."""


class MergedWeight(ABC):
    """Computes each module's merged weight from its base weight (a multiplicative or normalised update)."""

    @abstractmethod
    def merged_weight(self, module: str, target: Target, config: Mapping[str, Any],
                      tensors: Mapping[str, np.ndarray], weight: np.ndarray) -> np.ndarray:
        """The merged weight from the base ``weight`` (float32 or float64, stored orientation), same dtype."""


class MergedBias(ABC):
    """Merging also rewrites the adapted module's bias (a method that scales a module's whole output)."""

    @abstractmethod
    def merged_bias(self, module: str, target: Target, config: Mapping[str, Any],
                    tensors: Mapping[str, np.ndarray], bias: np.ndarray) -> np.ndarray:
        """The merged bias from the stored ``bias``."""


class QuantizedBase(ABC):
    """Trains against a quantised base: a merge into a float base first rounds the weights the same way."""

    @abstractmethod
    def quantized_modules(self, config: Mapping[str, Any], base_dir: Any) -> dict[str, dict[str, Any]]:
        """Every module the trained model held quantised (path -> ``{"kind", "shape"}``), adapted or not."""

    @abstractmethod
    def base_weight(self, module: str, target: Target, config: Mapping[str, Any], weight: np.ndarray) -> np.ndarray:
        """The weight as the quantised base saw it (``Q(W)``, dequantised to the given dtype)."""


class FromFactors(ABC):
    """Holds plain low-rank factors: compose and ``to-lora`` write their results as adapters of such a method."""

    @abstractmethod
    def from_factors(self, factors: Mapping[str, tuple[Target, Factors]],
                     like: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]],
                                                                     dict[str, np.ndarray]]:
        """``(config, targets, tensors)`` of an adapter holding ``factors`` exactly (``module -> (target, factors)``,
        ``target`` giving at least ``kind`` and ``shape``). ``like``: a source config whose selection fields
        (``target_modules``, ``dropout``, ...) may be kept when they still describe the result."""


class Composable(ABC):
    """Combines adapters of this method through its own strategies (``adapterkit compose --strategy``)."""

    #: the strategy names :meth:`compose` takes
    compose_strategies: tuple[str, ...] = ()

    @abstractmethod
    def compose(self, adapters: Sequence[Adapter], weights: Sequence[float], strategy: str,
                options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
        """``(config, targets, tensors)`` of the combined adapter.

        Called with a strategy of :attr:`compose_strategies`, one finite weight per adapter, and
        adapters checked to be made for one base. ``options`` holds what the user gave of
        ``density``, ``rank`` and ``seed``: raise ``UsageError`` for one the strategy does not take.
        adapterkit writes the rest of the manifest and checks the result against
        :meth:`~adapterkit.Method.expected_tensors` before anything is saved.
        """


class RuntimeComposable(ABC):
    """Runs several of its adapters at once in a live model, combined as a composition block says."""

    #: the block kinds it runs: ``"stack"``, ``"average"``, ``"weighted_sum"``
    composition_kinds: tuple[str, ...] = ()

    def composition_refusal(self, composition: Any) -> str | None:
        """Why ``composition`` (a block tree) cannot run, or None. Torch-free (``validate`` calls it)."""
        unsupported = [kind for kind in composition.kinds() if kind not in self.composition_kinds]
        if not unsupported:
            return None
        return (f"method {getattr(self, 'name', '?')!r} cannot run a {unsupported[0]} composition "
                f"({composition!r}): it runs {', '.join(self.composition_kinds)} blocks only")

    @abstractmethod
    def activate_composition(self, model: torch.nn.Module, composition: Any) -> None:
        """Run only the adapters of ``composition``, combined as its blocks say, until deactivated.

        ``adapterkit.activate`` calls it after checking that every member is injected into ``model``
        under its name with this method, none is merged, and :meth:`composition_refusal` is None.
        """

    @abstractmethod
    def deactivate_composition(self, model: torch.nn.Module) -> None:
        """Undo :meth:`activate_composition`: the model runs as after injection again."""


class Quantizable(ABC):
    """``adapterkit train --quantize`` trains this method as another one on a quantised base."""

    #: the method id trained with ``--quantize`` (QLoRA for LoRA); the quantisation type goes to its config
    quantized_method: str = ""


class TraceExport(ABC):
    """Readies a model holding one of its adapters for ONNX tracing (default: merge it if it can, else trace as is)."""

    @abstractmethod
    def prepare_export(self, model: torch.nn.Module, mode: str = "merged",
                       adapter_name: str = "default") -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context manager yielding the module to trace; undone on exit."""


class TrainingHooks(ABC):
    """Takes part in training beyond the gradients of its parameters (``adapterkit train`` calls these).

    AdaLoRA adds an orthogonality penalty to the loss and prunes singular values to a rank budget
    after each optimizer step. Every hook has a working default, so a method overrides only what it
    needs; the hooks run on every rank of a distributed run with the same (synchronised) gradients.
    """

    def training_loss(self, model: torch.nn.Module, adapter_name: str) -> torch.Tensor | None:
        """A term added to the loss of each optimizer step (scaled as the method wants; a one-element tensor), or None.

        It counts once per step whatever ``grad_accum`` and the number of processes (``adapterkit train`` runs
        one extra backward of it per step, divided over the ranks).
        """
        return None

    def after_step(self, model: torch.nn.Module, adapter_name: str, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``, before the gradients are cleared."""

    def training_state(self, model: torch.nn.Module, adapter_name: str) -> dict[str, Any]:
        """What a checkpoint must keep of the hooks' own state to resume exactly (JSON-ready or numpy arrays)."""
        return {}

    def load_training_state(self, model: torch.nn.Module, adapter_name: str, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state` when a run resumes."""


CAPABILITIES: tuple[type, ...] = (LowRank, DeltaWeight, MergedWeight, MergedBias, QuantizedBase, FromFactors,
                                  Composable, RuntimeComposable, Quantizable, TraceExport, TrainingHooks)


def can_merge(method: Any) -> bool:
    """Whether adapters of ``method`` fold into base weights (a computable delta, additive or not)."""
    return isinstance(method, (DeltaWeight, MergedWeight, LowRank))


def module_delta(method: Any, module: str, target: Target, config: Mapping[str, Any],
                 tensors: Mapping[str, np.ndarray], weight: np.ndarray | None = None) -> np.ndarray | None:
    """The float32 update of one module's weight in its stored orientation, or None when it needs ``weight``.

    Additive methods (:class:`DeltaWeight`, :class:`LowRank`) need no base weight; a
    :class:`MergedWeight` method's update is ``merged_weight(weight) - weight``.
    """
    if isinstance(method, DeltaWeight):
        return np.asarray(method.delta_weight(module, target, config, tensors), dtype=np.float32)
    if isinstance(method, LowRank):
        return method.lora_factors(module, target, config, tensors).delta(target.get("kind", "linear"))
    if isinstance(method, MergedWeight):
        if weight is None:
            return None
        base = np.asarray(weight, dtype=np.float64)
        merged = np.asarray(method.merged_weight(module, target, config, tensors, base), dtype=np.float64)
        return (merged - base).astype(np.float32)
    return None


def composition_refusal(method: Any, composition: Any) -> str | None:
    """Why ``method`` cannot run ``composition`` (a block tree), or None: the one check for any method."""
    if isinstance(method, RuntimeComposable):
        return method.composition_refusal(composition)
    kinds = composition.kinds()
    return (f"method {getattr(method, 'name', '?')!r} cannot run a {kinds[0] if kinds else 'runtime'} composition "
            f"({composition!r}): it has no runtime composition")


def names(method: Any) -> list[str]:
    """The capabilities ``method`` opts into, by class name (``adapterkit plugins`` lists them)."""
    return [cap.__name__ for cap in CAPABILITIES if isinstance(method, cap)]


def summary(method: Any) -> dict[str, Any]:
    """What adapterkit can do with adapters of ``method`` (``adapterkit plugins``): the capabilities it has,
    ``merge``, the ``compose`` strategies, the ``runtime_composition`` blocks, and ``adapter_pool``."""
    if isinstance(method, LowRank):
        strategies: tuple[str, ...] = LOW_RANK_STRATEGIES
    elif isinstance(method, Composable):
        strategies = tuple(method.compose_strategies)
    else:
        strategies = ()
    return {"capabilities": names(method), "merge": can_merge(method), "compose": list(strategies),
            "runtime_composition": list(method.composition_kinds) if isinstance(method, RuntimeComposable) else [],
            "adapter_pool": isinstance(method, LowRank)}
