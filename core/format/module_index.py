"""Which module of a base model each adapter target lands on: one resolution for validate, merge and apply.

``validate --base`` and ``merge`` see a base through its checkpoint headers; ``apply`` sees a
live torch model. Both build a :class:`ModuleIndex` (module path -> stored weight shape) and
resolve the adapter's targets with :func:`resolve_targets`, so an adapter that validates
against a base is one that ``apply`` puts on the same modules, and a target naming a module
the base lacks is refused by both with the same message: the module, and the closest path
the base has (``model.model.layers.0.self_attn.q_proj``: closest ``model.layers.0.self_attn.q_proj``).

Matching is exact: a module path is the live model's (``model.named_modules()``), which is
what a checkpoint saved by that model class (``save_pretrained``) holds. The one name a
checkpoint may lack is an output head tied to the input embeddings (``tie_word_embeddings``):
the index holds it with the embedding's shape, and records which weight it shares.

Torch-free.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterkit.core.errors import BaseModelError

if TYPE_CHECKING:  # pragma: no cover
    from adapterkit.core.format.base_model import BaseModelInfo

#: last path components of input embeddings that an output head may be tied to
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
#: last path components of output heads that may be tied to the input embeddings
TIED_HEAD_NAMES = ("lm_head", "embed_out")
#: model classes with an output head (the ones whose head transformers ties to the input embeddings)
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
#: how many missing modules get a closest-path suggestion each (the rest share the first ones' hint)
_SUGGESTED = 64


def last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def is_tied_head(module: str) -> bool:
    """Whether ``module`` is an output head that may be tied (``lm_head``, ``embed_out``, a top-level ``output``)."""
    return last(module) in TIED_HEAD_NAMES or module == "output"


def may_tie(config: Mapping[str, Any]) -> bool:
    """Whether the base may tie its output head to its input embeddings (transformers' default is yes)."""
    flags = [config.get("tie_word_embeddings")]
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "tie_word_embeddings" in text_config:
        flags.append(text_config["tie_word_embeddings"])
    return any(flag is not False for flag in flags)


@dataclass(frozen=True)
class Landing:
    """Where one target lands: the module path, its stored weight shape and checkpoint key (when known)."""

    module: str
    shape: tuple[int, ...] | None
    key: str | None = None  # the checkpoint key of its weight (None for a live model, or a tied head)
    tied_to: str | None = None  # the checkpoint key a tied head shares


class ModuleIndex:
    """The module paths of a base model, each with its stored weight shape (None: no weight / unknown)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...] | None], where: str | None, *,
                 keys: Mapping[str, str] | None = None, tied: Mapping[str, str] | None = None):
        self.shapes = dict(shapes)
        self.where = where  # the base folder, for messages (None: a live model)
        self.keys = dict(keys or {})
        self.tied = dict(tied or {})
        self._by_leaf: dict[str, list[str]] | None = None

    @classmethod
    def from_base(cls, info: BaseModelInfo) -> ModuleIndex:
        """The modules a checkpoint holds (``<module>.weight`` keys), plus a tied output head it does not store."""
        shapes: dict[str, tuple[int, ...] | None] = {}
        keys: dict[str, str] = {}
        for key, weight in info.weights.items():
            module, _, param = key.rpartition(".")
            if not module:
                continue
            if param == "weight":
                shapes[module], keys[module] = tuple(weight.shape), key
            else:
                shapes.setdefault(module, None)
        tied: dict[str, str] = {}
        arch = info.architecture or ""
        if may_tie(info.config) and arch.endswith(LM_HEAD_CLASSES):
            embeddings = [m for m in keys if last(m) in EMBEDDING_NAMES]
            if len(embeddings) == 1 and not any(is_tied_head(m) for m in keys):
                head = "embed_out" if last(embeddings[0]) == "embed_in" else "lm_head"
                shapes[head], tied[head] = shapes[embeddings[0]], keys[embeddings[0]]
        return cls(shapes, str(info.path), keys=keys, tied=tied)

    @classmethod
    def from_modules(cls, modules: Iterable[tuple[str, tuple[int, ...] | None]], where: str | None = None) -> ModuleIndex:
        """An index of a live model: ``(path, weight shape or None)`` for every named module."""
        return cls({path: shape for path, shape in modules if path}, where)

    def __contains__(self, module: str) -> bool:
        return module in self.shapes

    def closest(self, module: str) -> str | None:
        """The existing path most like ``module`` (same last component first), or None."""
        if self._by_leaf is None:
            self._by_leaf = {}
            for path in self.shapes:
                self._by_leaf.setdefault(last(path), []).append(path)
        pool = self._by_leaf.get(last(module)) or list(self.shapes)
        found = difflib.get_close_matches(module, pool, n=1, cutoff=0.5)
        return found[0] if found else None

    def land(self, module: str) -> Landing | None:
        if module not in self.shapes:
            return None
        return Landing(module, self.shapes[module], self.keys.get(module), self.tied.get(module))


def resolve_targets(targets: Mapping[str, Mapping[str, Any]], index: ModuleIndex, *,
                    what: str = "adapter") -> tuple[dict[str, Landing], list[BaseModelError]]:
    """Each target's landing in ``index``, and one error per target that has none or whose shape differs.

    A missing module's error names the closest path the base has; when every missing module is
    the closest path with one prefix added or removed, the hint says so.
    """
    landings: dict[str, Landing] = {}
    errors: list[BaseModelError] = []
    missing: list[tuple[str, str | None]] = []
    for module, target in sorted(targets.items()):
        landing = index.land(module)
        if landing is None:
            missing.append((module, index.closest(module) if len(missing) < _SUGGESTED else None))
            continue
        want = target.get("shape")
        if landing.shape is not None and want is not None and list(landing.shape) != [int(d) for d in want]:
            errors.append(BaseModelError(
                "base weight shape differs from the adapter's target", file=index.where,
                location=f"{module}.weight", expected=list(want), found=list(landing.shape),
                hint="the adapter was made for another base model", code="wrong_base"))
            continue
        landings[module] = landing
    fix = _common_fix(missing)
    model = "the base model" if index.where else "the model"
    for module, near in missing:
        closest = f"; the closest module it has is {near}" if near else ""
        errors.append(BaseModelError(
            f"the {what} targets module {module}, which {model} does not have{closest}", file=index.where,
            location=module, hint=fix or "is this the right base model?", code="missing_module"))
    return landings, errors


def _common_fix(missing: list[tuple[str, str | None]]) -> str | None:
    """``"every missing module has one 'model.' too many ..."`` when one prefix change fixes them all."""
    if not missing or any(near is None for _, near in missing):
        return None
    changes = set()
    for module, near in missing:
        assert near is not None
        if module.endswith("." + near):
            changes.add(("extra", module[: -len(near)]))
        elif near.endswith("." + module):
            changes.add(("lacks", near[: -len(module)]))
        else:
            return None
    if len(changes) != 1:
        return None
    kind, prefix = changes.pop()
    if kind == "extra":
        return (f"every missing module has the prefix {prefix!r} too many: the adapter was saved with a wrong key "
                "prefix (a runtime matching modules by path would silently skip them); rename its modules, or pass "
                "the base it was made for")
    return (f"every missing module lacks the prefix {prefix!r}: the adapter was made for the model without its "
            "task head, or saved with a wrong key prefix; rename its modules, or pass the base it was made for")


__all__ = ["EMBEDDING_NAMES", "TIED_HEAD_NAMES", "Landing", "ModuleIndex", "is_tied_head", "last", "may_tie",
           "resolve_targets"]
