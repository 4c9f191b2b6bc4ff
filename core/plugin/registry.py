"""Plugin loading: a pluggy manager factory and the registry of methods and formats.

Built-in plugins and third-party ones load the same way, through the
``adapterkit`` entry-point group. A plugin that fails to import, has a
misspelled hook, raises inside a hook or registers something invalid is
recorded (name, distribution, error) and skipped; the rest keep working.

``ADAPTERKIT_PLUGINS`` (comma-separated entry-point names) limits which
plugins load; unset means all, an empty value means none.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from adapterkit.core.errors import PluginError
from adapterkit.core.plugin import capabilities as caps, hookspecs
from adapterkit.core.plugin.codecs import Codec
from adapterkit.core.plugin.formats import Format
from adapterkit.core.plugin.method import Method

ENTRY_POINT_GROUP = "adapterkit"
ENV_VAR = "ADAPTERKIT_PLUGINS"


@dataclass
class PluginInfo:
    """What ``adapterkit plugins`` reports about one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    codecs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "distribution": self.distribution, "version": self.version, "module": self.module,
            "hooks": self.hooks, "methods": self.methods, "formats": self.formats, "codecs": self.codecs,
            "errors": self.errors,
        }


def allowed_plugins(env: dict[str, str] | None = None) -> set[str] | None:
    value = (os.environ if env is None else env).get(ENV_VAR)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> tuple[list[metadata.EntryPoint], list[tuple[metadata.EntryPoint, str]]]:
    """Entry points to load (adapterkit's own first) and the ones refused for a name clash."""

    def dist_name(ep: metadata.EntryPoint) -> str:
        return ep.dist.name if ep.dist is not None else "?"

    found = sorted(
        metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (dist_name(ep) != "adapterkit", ep.name, dist_name(ep))
    )
    chosen: dict[str, metadata.EntryPoint] = {}
    clashes: list[tuple[metadata.EntryPoint, str]] = []
    for ep in found:
        first = chosen.get(ep.name)
        if first is None:
            chosen[ep.name] = ep
        elif (first.value, dist_name(first)) != (ep.value, dist_name(ep)):
            clashes.append((ep, f"plugin name {ep.name!r} is already taken by distribution {dist_name(first)!r}; "
                                "skipped (rename the entry point)"))
    return list(chosen.values()), clashes


def _error_text(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {frame[0].filename}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def get_plugin_manager(
    plugins: Iterable[tuple[str, object]] = (),
    load_entrypoints: bool = True,
    only: set[str] | None = None,
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """A fresh plugin manager with the specs added and plugins registered.

    :param plugins: extra ``(name, plugin object)`` pairs, registered after entry points
        (tests use this for throwaway plugins).
    :param load_entrypoints: load the ``adapterkit`` entry-point group.
    :param only: plugin names to load; defaults to ``ADAPTERKIT_PLUGINS``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    only = allowed_plugins() if only is None else only
    infos: dict[str, PluginInfo] = {}
    candidates: list[tuple[str, Callable[[], object], PluginInfo]] = []
    if load_entrypoints:
        chosen, clashes = _entry_points()
        for ep in chosen:
            dist = ep.dist
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, ep.value)
            candidates.append((ep.name, ep.load, info))
        for ep, problem in clashes:
            dist = ep.dist
            key = f"{ep.name} ({dist.name if dist else '?'})"
            infos[key] = PluginInfo(key, dist.name if dist else None, dist.version if dist else None, ep.value, errors=[problem])
    for name, obj in plugins:
        candidates.append((name, lambda obj=obj: obj, PluginInfo(name, module=getattr(obj, "__name__", repr(obj)))))
    for name, load, info in candidates:
        if only is not None and name not in only:
            continue
        try:
            plugin = load()
        except Exception as exc:  # a broken plugin must not break the others
            info.errors.append(f"failed to import: {_error_text(exc)}")
            infos[_free_key(infos, name)] = info
            continue
        if pm.get_plugin(name) is plugin:
            continue  # the same plugin offered twice (entry point and explicit): load it once
        if pm.has_plugin(name) or pm.is_registered(plugin):
            info.errors.append(f"plugin name {name!r} (or this plugin object) is already registered; skipped")
            infos[_free_key(infos, name)] = info
            continue
        infos[name] = info
        api = getattr(plugin, "ADAPTERKIT_PLUGIN_API", hookspecs.PLUGIN_API_VERSION)
        if str(api) != hookspecs.PLUGIN_API_VERSION:
            info.errors.append(f"targets plugin API {api}, this adapterkit provides {hookspecs.PLUGIN_API_VERSION}; "
                               + _upgrade_hint(str(api)))
            continue
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
        except Exception as exc:
            if pm.get_plugin(name) is plugin:
                pm.unregister(name=name)
            info.errors.append(f"invalid hooks: {exc}")
            continue
        info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        unmarked = sorted(
            attr for attr in dir(plugin)
            if attr.startswith("adapterkit_") and callable(getattr(plugin, attr)) and attr not in info.hooks
        )
        for attr in unmarked:
            info.errors.append(f"{attr} is not marked with @adapterkit.hookimpl, so it is never called; add the decorator")
    return pm, infos


def _free_key(infos: dict[str, PluginInfo], name: str) -> str:
    key, n = name, 1
    while key in infos:
        n += 1
        key = f"{name} ({n})"
    return key


class Registry:
    """The methods and formats the loaded plugins registered."""

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]):
        self.pm = pm
        self.plugins = infos
        self.methods: dict[str, Method] = {}
        self.formats: dict[str, Format] = {}
        self.codecs: dict[str, Codec] = {}  # "<format>:<key>" -> codec
        self._owner: dict[tuple[str, str], str] = {}
        self._collect("adapterkit_register_methods", Method, self.methods, "methods")
        self._collect("adapterkit_register_formats", Format, self.formats, "formats")
        self._collect("adapterkit_register_codecs", Codec, self.codecs, "codecs")

    def _collect(self, hook_name: str, kind: type, table: dict[str, Any], attr: str) -> None:
        label = kind.__name__
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # registration order: first wins
            plugin = impl.plugin_name
            info = self.plugins.setdefault(plugin, PluginInfo(plugin))
            received: list[Any] = []

            def register(obj: Any, _received: list[Any] = received) -> None:
                _received.append(obj)

            try:
                _call(impl, register=register)
            except Exception as exc:
                info.errors.append(f"{hook_name} raised {_error_text(exc)}")
                continue
            for obj in received:
                problem = self._check(obj, kind, label, table)
                if problem:
                    info.errors.append(problem)
                    continue
                table[obj.name] = obj
                self._owner[(attr, obj.name)] = plugin
                getattr(info, attr).append(obj.name)

    def _check(self, obj: Any, kind: type, label: str, table: dict[str, Any]) -> str | None:
        if not isinstance(obj, kind):
            return f"registered {type(obj).__name__}, expected an adapterkit.{label} instance"
        if not isinstance(obj.name, str) or not obj.name:
            return f"registered a {label} without a name"
        if str(obj.api_version) != hookspecs.PLUGIN_API_VERSION:
            return (f"{label} {obj.name!r} targets plugin API {obj.api_version}, this adapterkit provides "
                    f"{hookspecs.PLUGIN_API_VERSION}; " + _upgrade_hint(str(obj.api_version)))
        if kind is Method:
            old = old_contract(obj)
            if old:
                return (f"method {obj.name!r} is written for plugin API 1 ({old}); " + _upgrade_hint("1"))
        if kind is Codec and (not obj.format or not obj.key or not obj.methods):
            return f"codec {type(obj).__name__} must set format, key and methods"
        if obj.name in table:
            attr = {Method: "methods", Format: "formats"}.get(kind, "codecs")
            return f"{label} {obj.name!r} is already registered by plugin {self._owner[(attr, obj.name)]!r}; skipped"
        return None

    @property
    def failures(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if not info.ok]

    def method(self, name: str) -> Method:
        try:
            return self.methods[name]
        except KeyError:
            raise PluginError(
                f"unknown method {name!r}", expected=sorted(self.methods), found=name,
                hint="install the plugin that provides it (adapterkit plugins lists what is loaded)",
                code="unknown_method",
            ) from None

    def format(self, name: str) -> Format:
        try:
            return self.formats[name]
        except KeyError:
            raise PluginError(
                f"unknown format {name!r}", expected=sorted(self.formats), found=name,
                hint="adapterkit plugins lists the formats of the loaded plugins", code="unknown_format",
            ) from None

    def codec(self, format: str, key: str) -> Codec | None:
        """The codec of ``format`` for the layout ``key`` (a PEFT ``peft_type``), or None."""
        return self.codecs.get(f"{format}:{key}")

    def codec_for(self, format: str, method: str) -> Codec | None:
        """The codec that writes ``method`` adapters in ``format`` (first registered wins), or None."""
        return next((c for c in self.codecs.values() if c.format == format and method in c.methods), None)

    def codecs_of(self, format: str) -> dict[str, Codec]:
        """key -> codec of every codec registered for ``format``."""
        return {c.key: c for c in self.codecs.values() if c.format == format}

    def register_commands(self, cli: Any) -> None:
        """Let plugins add CLI commands; a plugin that fails is recorded and skipped."""
        for impl in self.pm.hook.adapterkit_register_commands.get_hookimpls():
            try:
                _call(impl, cli=cli)
            except Exception as exc:
                self.plugins.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name)).errors.append(
                    f"adapterkit_register_commands raised {_error_text(exc)}"
                )


#: attributes of plugin API 1's Method that API 2 replaced by capabilities (attribute -> what to do instead)
_API1_ATTRIBUTES = {
    "mergeable": "drop mergeable: merging follows from DeltaWeight, MergedWeight or LowRank",
    "export_factors": "replace export_factors by subclassing adapterkit.LowRank (lora_factors)",
}
#: API 1 hooks that are now a capability's method: (attribute, capability it belongs to)
_API1_HOOKS = (("delta_weight", caps.DeltaWeight), ("merged_weight", caps.MergedWeight),
               ("merged_bias", caps.MergedBias), ("compose", caps.Composable),
               ("activate_composition", caps.RuntimeComposable), ("prepare_export", caps.TraceExport),
               ("quantized_modules", caps.QuantizedBase))


def old_contract(method: Any) -> str | None:
    """What makes ``method`` a plugin API 1 method, in words (None when it follows API 2)."""
    cls = type(method)
    for attr, fix in _API1_ATTRIBUTES.items():
        if any(attr in vars(klass) for klass in cls.__mro__ if klass is not Method and klass is not object):
            return fix
    for attr, capability in _API1_HOOKS:
        if callable(getattr(method, attr, None)) and not isinstance(method, capability):
            return f"{attr} is defined but the class does not subclass adapterkit.{capability.__name__}"
    return None


def _upgrade_hint(api: str) -> str:
    if api == "1":
        return ("upgrade the plugin: subclass the capabilities the method has (adapterkit.LowRank, DeltaWeight, "
                "MergedWeight, Composable, RuntimeComposable, ...) and register multi-method format layouts as "
                "codecs (docs/plugins.md, 'From plugin API 1 to 2')")
    return "upgrade the plugin or adapterkit"


def _call(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it asks for (pluggy's rule)."""
    return impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry of installed plugins (built once, on first use)."""
    return Registry(*get_plugin_manager())
