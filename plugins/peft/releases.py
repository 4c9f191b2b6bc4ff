"""What each PEFT release's adapter configs know, for ``convert --to peft --peft-version X``.

``releases.json`` is data read from the releases themselves (``tools/peft_releases.py`` parses
every PEFT wheel from 0.3.0 on; tests/test_peft_versions.py compares it with the installed PEFT
and with real old releases): per release, the fields (and their defaults) of the config class of
each ``peft_type`` adapterkit writes, the ``init_lora_weights`` strings, the ``task_type`` values,
and how ``rank_pattern`` / ``alpha_pattern`` keys are matched.

A config for release X keeps the fields X knows. A field X does not know is left out when its
value is the default of the release that added it (PEFT X then behaves as the adapter says: the
feature is off); any other value is refused, naming the field and the release that added it,
because PEFT X would either fail on the key (before 0.14) or ignore it and load another adapter.
``auto_mapping`` and ``revision`` describe the base, not the adapter: left out where X lacks them.
What changed beyond the fields (a layout, a scale) is each codec's to handle, with
:meth:`PeftRelease.before`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit.core.errors import LossyConversionError, UsageError

TABLE = Path(__file__).with_name("releases.json")
#: fields that say which PEFT wrote the file (PEFT >= 0.18 fills ``peft_version`` itself): the release asked for
_VERSION_FIELD = "peft_version"
#: fields that describe the adapter's surroundings, not the adapter (the base's revision, the model class
#: ``AutoPeftModel`` builds): left out for a release that lacks them (0.3.0), whatever their value
_CONTEXT_FIELDS = ("auto_mapping", "revision")
#: what a field turns on, for messages (the field name alone is clear for the others)
FEATURES = {
    "use_dora": "DoRA (use_dora)", "use_rslora": "rsLoRA (use_rslora)", "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)", "target_parameters": "LoRA on parameters (target_parameters)",
    "lora_bias": "a bias on lora_B (lora_bias)", "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    data = json.loads(TABLE.read_text("utf-8"))
    return data["releases"]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def parse(text: Any) -> tuple[int, int, int]:
    """``"0.14.0"``, ``"0.14"``, ``"v0.9.0"`` -> (0, 14, 0); anything else is a usage error."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip()) if isinstance(text, str) else None
    if match is None:
        hint = ("quote it: -O peft_version='\"0.10.0\"' keeps it a string" if isinstance(text, (int, float))
                and not isinstance(text, bool) else "give a PEFT release such as 0.14.0")
        raise UsageError("peft_version must be a PEFT release number (MAJOR.MINOR[.PATCH])", location="peft_version",
                         expected="e.g. 0.14.0", found=text, hint=hint, code="bad_option")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def release(text: Any) -> PeftRelease:
    """The table entry for PEFT ``text``: the newest release in the table at or below it."""
    wanted = parse(text)
    versions = sorted(table(), key=_key)
    below = [v for v in versions if _key(v) <= wanted]
    if not below:
        raise UsageError(f"PEFT {'.'.join(map(str, wanted))} is older than every release adapterkit knows the "
                         f"config fields of (the oldest is {versions[0]})", location="peft_version",
                         expected=f">= {versions[0]}", found=text, code="bad_option")
    return PeftRelease(".".join(map(str, wanted)), below[-1])


@dataclass(frozen=True)
class PeftRelease:
    """One PEFT release as far as its adapter configs go."""

    #: the release asked for, e.g. ``"0.14.0"``
    version: str
    #: the table entry that applies (the newest release in the table at or below ``version``)
    entry: str

    @property
    def _data(self) -> dict[str, Any]:
        return table()[self.entry]

    @property
    def label(self) -> str:
        return f"PEFT {self.version}"

    def before(self, version: str) -> bool:
        """Whether this release is older than ``version`` (e.g. ``"0.14.0"``): for a codec whose layout or math
        changed in ``version``."""
        return parse(self.version) < parse(version)

    def fields(self, peft_type: str) -> dict[str, Any] | None:
        """Field -> default of ``peft_type``'s config class in this release (None: no such config here)."""
        return self._data["configs"].get(peft_type)

    def knows(self, peft_type: str, field: str) -> bool:
        return field in (self.fields(peft_type) or {})

    def added(self, peft_type: str, field: str | None = None) -> tuple[str, Any] | None:
        """(the first release whose ``peft_type`` config has ``field``, its default there); None when no release
        in the table has it. ``field=None``: the first release that has the peft_type at all."""
        for version in sorted(table(), key=_key):
            fields = table()[version]["configs"].get(peft_type)
            if fields is not None and (field is None or field in fields):
                return version, (fields[field] if field is not None else None)
        return None

    # ---- values --------------------------------------------------------------------

    def knows_init(self, value: str) -> bool:
        """Whether this release's LoRA takes ``init_lora_weights = value`` (a string)."""
        value = value.lower()
        data = self._data
        return value in data["init_lora_weights"] or any(value.startswith(p) for p in data["init_lora_weights_prefixes"])

    def init_added(self, value: str) -> str | None:
        """The first release whose LoRA takes ``init_lora_weights = value``."""
        return next((v for v in sorted(table(), key=_key) if PeftRelease(v, v).knows_init(value)), None)

    def knows_task(self, task_type: str) -> bool:
        return task_type in self._data["task_types"]

    def pattern_values(self, module: str, maps: Mapping[str, tuple[Any, Mapping[str, Any] | None]]) -> dict[str, Any]:
        """The value this release gives ``module`` for each ``name: (default, pattern map)`` (``rank_pattern``
        style, keys in file order). Before 0.14 one lookup over all maps' keys picks the key used for every map
        (``joint``); from 0.14 each map is looked up alone. A key matches under the release's ``re.match``
        template; no match falls back to the module path itself."""
        data = self._data
        template = data.get("pattern_regex")
        if template is None:  # a release without patterns: only the defaults
            return {name: default for name, (default, _) in maps.items()}

        def find(keys: list[str]) -> str:
            return next((k for k in keys if re.match(template.replace("{key}", k), module)), module)

        if data["pattern_lookup"] == "joint":
            key = find([k for _, pattern in maps.values() for k in (pattern or {})])
            return {name: (pattern or {}).get(key, default) for name, (default, pattern) in maps.items()}
        return {name: (pattern or {}).get(find(list(pattern or {})), default) for name, (default, pattern) in maps.items()}

    # ---- a whole config ------------------------------------------------------------

    def check_type(self, peft_type: str) -> dict[str, Any]:
        """The fields of ``peft_type``'s config in this release; a LossyConversionError when the release has no
        such adapters (or adapterkit no table of them)."""
        known = self.fields(peft_type)
        if known is not None:
            return known
        first = self.added(peft_type)
        reason = (f"{peft_type} adapters came with PEFT {first[0]}" if first is not None else
                  f"adapterkit has no table of the {peft_type} config fields of PEFT releases (it has "
                  f"{', '.join(sorted(table()[max(table(), key=_key)]['configs']))})")
        raise LossyConversionError(f"{self.label} cannot hold this adapter: {reason}", location="$.peft_type",
                                   found=peft_type, hint="convert without --peft-version" if first is None
                                   else f"write for PEFT {first[0]} or later (--peft-version {first[0]})",
                                   code="peft_version")

    def config(self, peft_type: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` as this release holds it: unknown default-valued fields left out, ``peft_version`` set to
        this release where it has the field; a LossyConversionError for a value it cannot hold."""
        known = self.check_type(peft_type)
        out: dict[str, Any] = {}
        for field, value in config.items():
            if field == _VERSION_FIELD:
                continue
            if field in known:
                out[field] = value
                continue
            if field in _CONTEXT_FIELDS:
                continue
            added = self.added(peft_type, field)
            if added is not None and _noop(value, added[1]):
                continue
            if added is None and _empty(value):
                continue
            raise self.refusal(field, value, added[0] if added else None)
        if _VERSION_FIELD in known:
            out[_VERSION_FIELD] = self.version
        task_type = out.get("task_type")
        if isinstance(task_type, str) and not self.knows_task(task_type):
            first = next((v for v in sorted(table(), key=_key) if task_type in table()[v]["task_types"]), None)
            raise self.refusal("task_type", task_type, first)
        return out

    def refusal(self, field: str, value: Any, added: str | None, what: str | None = None) -> LossyConversionError:
        """The one-line refusal of ``field = value``, which came with PEFT ``added`` (None: in no release known)."""
        what = what or FEATURES.get(field, f"{field} = {_shown(value)}")
        if added is None:
            return LossyConversionError(
                f"{self.label} cannot hold this adapter: {what} is in no PEFT release adapterkit knows the config of "
                f"(up to {max(table(), key=_key)})", location=f"$.{field}", found=_shown(value),
                hint="convert without --peft-version", code="peft_version")
        return LossyConversionError(
            f"{self.label} cannot hold this adapter: {what} came with PEFT {added}", location=f"$.{field}",
            found=_shown(value), hint=f"write for PEFT {added} or later (--peft-version {added})", code="peft_version")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def _noop(value: Any, default: Any) -> bool:
    """Whether a field at ``value`` is what the release that added it does by default (the feature off): the
    default itself, or an empty value (None, [], {}) where the default is empty too."""
    if isinstance(default, dict) and "expr" in default:  # a default that is no literal: only "unset" is safe
        return value is None
    if value == default and isinstance(value, bool) == isinstance(default, bool):
        return True
    return _empty(value) and _empty(default)


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
