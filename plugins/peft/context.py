"""What the ``peft`` format hands a codec: the parsed folder and PEFT's rules, so that a codec never imports
this plugin (docs/plugins.md, "The PEFT codec context", is the reference: these are public API).

:class:`PeftReadContext` goes to ``Codec.read``, :class:`PeftWriteContext` to ``Codec.write``; both
share the fields and helpers of :class:`PeftContext`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from adapterkit import (
    Adapter, BaseModelError, LossyConversionError, Manifest, base_fields, pattern_value, targets_fingerprint,
)
from adapterkit.core.format.base_model import BaseModelInfo, read_base_model

from . import files, rules, selection

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.core.plugin.registry import Registry

    from .releases import PeftRelease


class BaseModule(NamedTuple):
    """A module of the base model, as :meth:`PeftContext.base_module` gives it."""

    #: ``"linear"``, ``"conv1d"`` (transformers' Conv1D), another module's class name (``"Embedding"``), or None
    #: when the base is a folder (its checkpoint does not say)
    kind: str | None
    #: the stored weight shape (a Conv1D's is ``[in, out]``)
    shape: list[int]
    #: whether the module has a bias
    bias: bool


@dataclass
class PeftContext:
    """The helpers every codec gets (PEFT's key and module-matching rules)."""

    #: the adapter folder (reading: the source; writing: the folder being written)
    folder: Path
    #: the layout being read or written (the codec's key, e.g. ``"LORA"``)
    peft_type: str
    #: the registry in use (methods, other codecs)
    registry: Registry
    #: the ``base`` option: a local Hugging Face model folder, a ``BaseModelInfo``, a live torch model, or None
    base: Any = None

    #: how PEFT prefixes every tensor key
    KEY_PREFIX = rules.KEY_PREFIX

    def key(self, module: str, leaf: str) -> str:
        """The file key of ``leaf`` (e.g. ``"lora_A.weight"``) of ``module``: ``base_model.model.<module>.<leaf>``."""
        return f"{rules.KEY_PREFIX}{module}.{leaf}"

    def module_of(self, key: str, leaf: str) -> str | None:
        """The module of a file key ending in ``.<leaf>`` (``base_model.model.`` and the leaf stripped), else None."""
        if not key.startswith(rules.KEY_PREFIX) or not key.endswith(f".{leaf}"):
            return None
        module = key[len(rules.KEY_PREFIX): -len(leaf) - 1]
        return module or None

    def pattern_value(self, module: str, patterns: Mapping[str, Any] | None, default: Any) -> Any:
        """The value PEFT gives ``module`` from a ``rank_pattern``-style map (first key ``k`` with
        ``re.match(rf"(.*\\.)?({k})$", module)``), else ``default``."""
        return pattern_value(module, patterns or {}, default)

    def selects(self, config: Mapping[str, Any], module: str) -> bool:
        """Whether PEFT adapts ``module`` under ``config``'s target_modules, exclude_modules,
        layers_to_transform and layers_pattern."""
        return rules.selects(config, module)

    def layer_index(self, module: str, layers_pattern: Any = None) -> int | None:
        """The layer number PEFT reads from ``module`` for ``layers_to_transform``."""
        return rules.layer_index(module, layers_pattern)

    def task(self, task_type: Any) -> str | None:
        """The manifest task of a PEFT ``task_type`` (``"CAUSAL_LM"`` -> ``"causal-lm"``), None when unknown."""
        return rules.task_of(task_type)

    def base_module(self, module: str, kinds: Iterable[str] = ("linear", "conv1d")) -> BaseModule:
        """``module`` in the base (``--base``): its kind, weight shape and whether it has a bias.

        Refuses (:class:`adapterkit.BaseModelError`) without a base (code ``needs_base``) and a module the base
        lacks (``wrong_base``); refuses (:class:`adapterkit.LossyConversionError`, ``unsupported``) a module whose
        weight is not 2-d or whose kind is not one of ``kinds``. A live model gives every kind; a folder's
        checkpoint does not say it (``kind`` None: only the weight is checked)."""
        found = self._base_layout.get(module)
        info = self._base_source if isinstance(self._base_source, BaseModelInfo) else None
        if found is None and info is not None:
            key = info.resolve(f"{module}.weight")
            if key is not None:
                found = BaseModule(None, [int(n) for n in info.weights[key].shape],
                                   info.resolve(f"{module}.bias") is not None)
        if found is None:
            raise BaseModelError("adapted module does not exist in the base model", file=str(self.folder),
                                 location=module, hint="is this the right base model?", code="wrong_base")
        kinds = tuple(kinds)
        if len(found.shape) != 2 or (found.kind is not None and found.kind not in kinds):
            what = f"a {found.kind} module" if found.kind else f"a module with a {len(found.shape)}-d weight"
            raise LossyConversionError(f"{module} is {what} in the base; the {self.peft_type} codec reads "
                                       f"{' and '.join(kinds)} modules (2-d weights)", file=str(self.folder),
                                       location=module, found=found.shape, code="unsupported")
        return found

    def base_fields(self) -> dict[str, str]:
        """The manifest's ``base_model`` fields the base gives (``model_type``, ``architecture``); ``{}`` without
        a base."""
        return {} if self._base_source is None else base_fields(self._base_source)

    @functools.cached_property
    def _base_source(self) -> Any:
        """The base as a live torch model or a :class:`BaseModelInfo` (a folder is read once); None without one."""
        base = self.base
        if base is None or hasattr(base, "named_modules") or isinstance(base, BaseModelInfo):
            return base
        if isinstance(base, (str, Path)):
            return read_base_model(base)
        raise BaseModelError(f"the base option is a {type(base).__name__}", file=str(self.folder), found=repr(base),
                             hint="pass a local model folder, a BaseModelInfo or a torch model", code="bad_base")

    @functools.cached_property
    def _base_layout(self) -> dict[str, BaseModule]:
        """A live model's modules with a weight tensor (a BaseModelInfo is asked per module)."""
        source = self._base_source
        if source is None:
            raise BaseModelError("reading this adapter needs the base model", file=str(self.folder),
                                 hint="pass --base with the base model's local folder", code="needs_base")
        if not hasattr(source, "named_modules"):
            return {}
        import torch

        from adapterkit import module_kind

        layout = {}
        for path, module in source.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                kind = module_kind(module) or type(module).__name__
                layout[path] = BaseModule(kind, [int(n) for n in weight.shape],
                                          isinstance(getattr(module, "bias", None), torch.Tensor))
        return layout


@dataclass
class PeftReadContext(PeftContext):
    """A PEFT folder being read: its config and tensors, untouched."""

    #: the parsed adapter_config.json (strict JSON; the selection fields already checked)
    config: dict[str, Any] = field(default_factory=dict)
    #: paths for messages
    config_file: str = ""
    tensors_file: str = ""

    #: the fields of PEFT's ``PeftConfig`` that every peft_type has
    COMMON_FIELDS = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                               "revision", "inference_mode"})

    @functools.cached_property
    def _loaded(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return files.read_tensors(Path(self.tensors_file))

    def refuse_unknown_fields(self, known: Iterable[str], method: str) -> None:
        """Refuse (:class:`adapterkit.LossyConversionError`, code ``unsupported``, at ``$.<field>``) a config field
        outside ``known`` and :attr:`COMMON_FIELDS` whose value is set (not None, false or empty): a field of another
        PEFT release that changes the adapter would otherwise be dropped without a word."""
        allowed = {*known, *self.COMMON_FIELDS}
        for name in sorted(self.config):
            value = self.config[name]
            if name in allowed or value is None or value is False or (isinstance(value, (list, dict, str)) and not value):
                continue
            raise LossyConversionError(f"the PEFT {self.peft_type} config field {name!r} has no place in a {method} "
                                       "adapter and would be lost", file=self.config_file, location=f"$.{name}",
                                       found=value, hint="remove it if it does not matter, or read the folder with "
                                       "the PEFT release that wrote it", code="unsupported")

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the file under its own key, as numpy arrays (loaded on first use). Empty tensors
        are not refused here: call ``adapterkit.check_tensor_dims(tensors, ctx.tensors_file)`` on what must
        not be empty."""
        return self._loaded[0]

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (``{}`` for ``adapter_model.bin``)."""
        return self._loaded[1]

    def adapter(self, method: str, config: dict[str, Any], targets: dict[str, dict[str, Any]],
                tensors: dict[str, np.ndarray], dtype: str, *, base_model: Mapping[str, Any] | None = None,
                warnings: Iterable[str] = ()) -> Adapter:
        """An :class:`adapterkit.Adapter` with the fields every PEFT reader fills (:func:`finish`)."""
        manifest = Manifest(method=method, config=config, targets=targets, dtype=dtype, base_model=dict(base_model or {}))
        return finish(Adapter(manifest, tensors, warnings=list(warnings)), self)


@dataclass
class PeftWriteContext(PeftContext):
    """A PEFT folder being written."""

    #: the PEFT config the adapter was read from, when it has this peft_type (else ``{}``): keep its values
    original: dict[str, Any] = field(default_factory=dict)
    #: safetensors metadata for the codec to fill (PEFT's ``{"format": "pt"}`` is added)
    metadata: dict[str, str] = field(default_factory=dict)
    #: the PEFT release written for (the ``peft_version`` option), or None for the newest: its config
    #: fields, ``init_lora_weights`` strings and pattern matching (:class:`.releases.PeftRelease`)
    release: PeftRelease | None = None

    def selection(self, modules: Iterable[str], wanted: Any = None, layers: Any = None,
                  layered: bool = True) -> dict[str, Any]:
        """``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` that select
        exactly ``modules``: the original's when they do, else ``wanted`` (the method config's names or
        regex) with ``layers``, else last names, else an exact regex; checked against every module of the
        base when the ``base`` option is given. ``layered=False`` for a peft_type whose config has no
        ``layers_to_transform`` / ``layers_pattern`` (IA3): then only the other two are returned. With a
        :attr:`release`, only forms every PEFT release reads alike: ``target_modules`` names or an exact
        regex (the others ``None``)."""
        universe = selection.module_universe(self.base)
        return selection.selection(modules, self.original, wanted, layers, universe, layered,
                                   portable=self.release is not None)

    def patterns(self, values: Mapping[str, Any], keep: tuple[Any, Mapping[str, Any] | None] | None = None
                 ) -> tuple[Any, dict[str, Any]]:
        """``(default, pattern map)`` under which PEFT gives each module of ``values`` its value: ``keep``
        (e.g. ``(original["r"], original["rank_pattern"])``) when it still does, else the most common value
        and one entry per other module."""
        return selection.patterns(values, keep)

    def pattern_values(self, module: str, maps: Mapping[str, tuple[Any, Mapping[str, Any] | None]]) -> dict[str, Any]:
        """The value PEFT gives ``module`` for each ``name: (default, pattern map)`` (e.g. ``{"r": (r,
        rank_pattern), "lora_alpha": (lora_alpha, alpha_pattern)}``), under the :attr:`release`'s matching
        (before 0.14 one key, found over all the maps, serves every map) or, without one, the newest."""
        if self.release is not None:
            return self.release.pattern_values(module, maps)
        return {name: pattern_value(module, pattern or {}, default) for name, (default, pattern) in maps.items()}


def finish(adapter: Adapter, context: PeftReadContext) -> Adapter:
    """The fields every PEFT reader fills, where the codec left them empty: ``base_model.fingerprint``
    (of the targets), ``name`` / ``revision`` (base_model_name_or_path, revision), ``task`` (task_type),
    ``provenance.converted_from = {"format": "peft", "config": <the config>}``, source and source format."""
    manifest, config = adapter.manifest, context.config
    manifest.base_model.setdefault("fingerprint", targets_fingerprint(manifest.targets))
    for name, key in (("name", "base_model_name_or_path"), ("revision", "revision")):
        if isinstance(config.get(key), str) and config[key]:
            manifest.base_model.setdefault(name, config[key])
    if manifest.task is None:
        manifest.task = rules.task_of(config.get("task_type"))
    manifest.provenance["converted_from"] = {"format": "peft", "config": config}
    adapter.source, adapter.source_format = context.folder, "peft"
    return adapter
