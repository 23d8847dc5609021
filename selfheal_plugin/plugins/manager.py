"""The plugin manager: loads plugins, calls hooks with failures isolated, finds strategies.

Load order (later plugins win where they overlap, e.g. a strategy for the same type):

1. built-ins named in ``plugin.toml`` (``[load] strategies`` and ``hooks``), loaded by
   file path from the ``strategies/`` and ``hooks/`` folders beside the manifest (in a
   wheel: ``selfheal_plugin/strategies``, ``selfheal_plugin/hooks``);
2. installed distributions with entry points in the group ``selfheal`` (only those named
   in ``SELFHEAL_LOAD_PLUGINS`` when it is set, comma-separated; empty means none);
3. ``*.py`` files in ``BINKS_HOME/selfheal/plugins/`` (alphabetical).

A plugin that fails to import, or raises in a hook, is logged and recorded in
:func:`errors` with its name; the other plugins keep working. ``SELFHEAL_TRACE_HOOKS=1``
prints every hook call to stderr.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tomllib
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pluggy

from selfheal_plugin.plugins import hookspecs
from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import normalize_error_type

log = logging.getLogger("selfheal.plugins")

ENTRY_POINT_GROUP = "selfheal"
PRIORITIES = ("urgent", "high", "normal", "low")

pm = pluggy.PluginManager("selfheal")
pm.add_hookspecs(hookspecs)
if os.environ.get("SELFHEAL_TRACE_HOOKS"):
    pm.trace.root.setwriter(sys.stderr.write)
    pm.enable_tracing()


@dataclass
class Notification:
    """A message for the user; every ``notify`` implementation receives it."""

    title: str
    body: str
    source: str = "self-heal"
    tags: list[str] = field(default_factory=list)
    priority: str = "normal"  # urgent | high | normal | low
    created_at: datetime | None = None  # aware; None means now

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat() if self.created_at else None
        return d


@dataclass
class PluginError:
    """A plugin that failed to load or raised in a hook."""

    plugin: str
    phase: str  # "load" | "hook" | "register"
    error: str  # one line: "SyntaxError: invalid syntax (bad.py, line 3)"
    hook: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    builtins_loaded: bool = False
    dirs_loaded: set[str] = field(default_factory=set)
    errors: list[PluginError] = field(default_factory=list)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # plugin name -> source, path, version
    strategies: dict[str, tuple[Any, str]] | None = None  # error_type -> (strategy, plugin name)
    strategy_list: list[dict[str, Any]] = field(default_factory=list)
    strategies_key: tuple | None = None


_state = _State()


# ---------------------------------------------------------------- locating built-ins


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def manifest_path() -> Path:
    """``plugin.toml``: inside the package in a wheel, at the source root otherwise."""
    inside = _package_dir() / "plugin.toml"
    return inside if inside.exists() else _package_dir().parent / "plugin.toml"


def read_manifest() -> dict[str, Any]:
    with open(manifest_path(), "rb") as f:
        return tomllib.load(f)


def builtin_folder(kind: str) -> Path:
    """``strategies`` or ``hooks``, beside the manifest."""
    return manifest_path().parent / kind


# ---------------------------------------------------------------- loading


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _record(err: PluginError) -> None:
    _state.errors.append(err)
    where = f" in hook {err.hook}" if err.hook else ""
    log.warning("plugin %s failed%s (%s): %s", err.plugin, where, err.phase, err.error)


def _load_module_from_path(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def register(plugin: Any, name: str | None = None, *, source: str = "api", path: str | None = None,
             version: str | None = None) -> str | None:
    """Register a plugin object (module, class instance) under ``name``; returns its name.

    Tests use this with a small class and :func:`unregister` in ``finally``.
    """
    try:
        name = pm.register(plugin, name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        _record(PluginError(plugin=name or repr(plugin), phase="register", error=_one_line(exc), path=path))
        return None
    if name is not None:
        _state.info[name] = {"source": source, "path": path, "version": version}
        _state.strategies = None
    return name


def unregister(plugin: Any = None, name: str | None = None) -> None:
    name = name or (pm.get_name(plugin) if plugin is not None else None)
    pm.unregister(plugin, name)
    _state.info.pop(name or "", None)
    _state.strategies = None


def _load_file(module_name: str, plugin_name: str, path: Path, source: str) -> None:
    try:
        module = _load_module_from_path(module_name, path)
    except Exception as exc:  # noqa: BLE001 — a broken plugin must not stop the others
        _record(PluginError(plugin=plugin_name, phase="load", error=_one_line(exc), path=str(path)))
        return
    register(module, plugin_name, source=source, path=str(path))


def _load_builtins() -> None:
    try:
        load = read_manifest().get("load", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _record(PluginError(plugin="plugin.toml", phase="load", error=_one_line(exc), path=str(manifest_path())))
        return
    for kind in ("strategies", "hooks"):
        for name in load.get(kind, []):
            path = builtin_folder(kind) / f"{name}.py"
            _load_file(f"selfheal_plugin.{kind}.{name}", f"selfheal.{kind}.{name}", path, "builtin")


def _entry_point_allowed(dist_name: str | None) -> bool:
    allow = os.environ.get("SELFHEAL_LOAD_PLUGINS")
    if allow is None:
        return True
    wanted = {a.strip().lower().replace("_", "-") for a in allow.split(",") if a.strip()}
    return (dist_name or "").lower().replace("_", "-") in wanted


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        if not _entry_point_allowed(dist_name):
            continue
        name = ep.name
        if pm.get_plugin(name) is not None or pm.has_plugin(name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001
            _record(PluginError(plugin=name, phase="load", error=_one_line(exc), path=ep.value))
            continue
        register(plugin, name, source="entrypoint", path=ep.value,
                 version=dist.version if dist is not None else None)
        if name in _state.info and dist_name:
            _state.info[name]["distribution"] = dist_name


def load_user_plugins(plugins_dir: Path) -> None:
    """Load ``*.py`` from a user plugin folder (once per folder per process)."""
    key = str(Path(plugins_dir).expanduser().resolve())
    if key in _state.dirs_loaded:
        return
    _state.dirs_loaded.add(key)
    folder = Path(key)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        _load_file(f"selfheal_user_plugins.{path.stem}", f"user:{path.stem}", path, "user")


def load_plugins(plugins_dir: Path | str | None = None) -> None:
    """Load built-ins and entry points once, and the user folder ``plugins_dir`` once."""
    if not _state.builtins_loaded:
        _state.builtins_loaded = True
        _load_builtins()
        _load_entry_points()
    if plugins_dir is not None:
        load_user_plugins(Path(plugins_dir))


def _ensure_loaded(settings: Any = None) -> None:
    load_plugins(getattr(settings, "plugins_dir", None))


def reset() -> None:
    """Unregister every plugin and forget load state and errors (tests)."""
    for plugin in list(pm.get_plugins()):
        pm.unregister(plugin)
    for name in [n for n in sys.modules if n.startswith(("selfheal_user_plugins.", "selfheal_plugin.strategies.",
                                                           "selfheal_plugin.hooks."))]:
        sys.modules.pop(name, None)
    global _state
    _state = _State()


def errors() -> list[PluginError]:
    """Load and hook failures recorded in this process, oldest first."""
    return list(_state.errors)


# ---------------------------------------------------------------- calling hooks


def _isolated(function: Callable, plugin_name: str, hook_name: str) -> Callable:
    def call(*args: Any) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # noqa: BLE001 — one failing plugin must not stop the loop
            log.debug("plugin %s raised in %s:\n%s", plugin_name, hook_name, traceback.format_exc())
            _record(PluginError(plugin=plugin_name, phase="hook", hook=hook_name, error=_one_line(exc)))
            return None
    call._selfheal_isolated = True  # type: ignore[attr-defined]
    call.__wrapped__ = function  # type: ignore[attr-defined]
    return call


def _isolate(caller: Any) -> None:
    """Wrap every plain implementation of a hook so that its exceptions are recorded and
    turned into None (pluggy then drops them) instead of aborting the whole call."""
    for impl in caller.get_hookimpls():
        if impl.hookwrapper or impl.wrapper or getattr(impl.function, "_selfheal_isolated", False):
            continue
        impl.function = _isolated(impl.function, impl.plugin_name, caller.name)


def hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "selfheal_spec", None) is not None)


def fire(hook_name: str, **kwargs: Any) -> list[Any]:
    """Call a hook on every plugin; returns the non-None results.

    Loads plugins first (the user folder of ``kwargs["settings"]`` too). A plugin that
    raises is recorded in :func:`errors` and logged with its name; the others' results
    still come back.
    """
    if hook_name not in hook_names():
        raise ValueError(f"unknown hook {hook_name!r}; hooks: {', '.join(hook_names())}")
    _ensure_loaded(kwargs.get("settings"))
    caller = getattr(pm.hook, hook_name)
    _isolate(caller)
    try:
        return caller(**kwargs)
    except Exception as exc:  # noqa: BLE001 — raised by a hook wrapper
        _record(PluginError(plugin="(hook wrapper)", phase="hook", hook=hook_name, error=_one_line(exc)))
        return []


def notify(notification: Notification, settings: Any) -> list[Any]:
    """Send one notification through every ``notify`` implementation."""
    return fire("notify", notification=notification, settings=settings)


# ---------------------------------------------------------------- strategies


def _collect_strategies() -> None:
    key = tuple(id(p) for p in pm.get_plugins())
    if _state.strategies is not None and _state.strategies_key == key:
        return
    caller = pm.hook.register_strategies
    _isolate(caller)
    table: dict[str, tuple[Any, str]] = {}
    listing: list[dict[str, Any]] = []
    # get_hookimpls() lists implementations lowest priority first (pluggy calls them in
    # reverse): registering in this order lets a later plugin replace an earlier one.
    for impl in caller.get_hookimpls():
        found: list[Any] = []
        impl.function(*[{"register": found.append}.get(a) for a in impl.argnames])
        for strategy in found:
            problem = _strategy_problem(strategy)
            if problem:
                _record(PluginError(plugin=impl.plugin_name, phase="register", hook="register_strategies",
                                    error=problem))
                continue
            types = [normalize_error_type(t) for t in strategy.error_types]
            for t in types:
                previous = table.get(t)
                table[t] = (strategy, impl.plugin_name)
                if previous is not None:
                    log.info("strategy %s (%s) replaces %s for %s", strategy.name, impl.plugin_name,
                             previous[0].name, t)
            listing.append({"name": strategy.name, "plugin": impl.plugin_name, "error_types": types,
                            "summary": getattr(strategy, "summary", "")})
    _state.strategies, _state.strategy_list, _state.strategies_key = table, listing, key


def _strategy_problem(strategy: Any) -> str | None:
    if not isinstance(getattr(strategy, "name", None), str) or not strategy.name:
        return f"registered strategy {strategy!r} has no name"
    types = getattr(strategy, "error_types", None)
    if not types or isinstance(types, str) or not all(isinstance(t, str) for t in types):
        return f"strategy {strategy.name!r}: error_types must be a non-empty sequence of names"
    for method in ("propose", "simulate", "suggest"):
        if not callable(getattr(strategy, method, None)):
            return f"strategy {strategy.name!r} has no {method}() method"
    return None


def strategies(settings: Any = None) -> dict[str, tuple[Any, str]]:
    """Error type → (strategy, plugin name) after every plugin had its say."""
    _ensure_loaded(settings)
    _collect_strategies()
    return dict(_state.strategies or {})


def strategy_for(error_type: str | None, settings: Any = None) -> Any:
    """The strategy answering for ``error_type`` (any spelling); types without one get
    the ``Unknown`` strategy. Raises :class:`SelfHealError` when there is none at all."""
    table = strategies(settings)
    etype = normalize_error_type(error_type)
    if etype in table:
        return table[etype][0]
    if "Unknown" in table:
        return table["Unknown"][0]
    raise SelfHealError(f"no strategy answers for error type {etype!r} (see: agent self-heal plugins)")


# ---------------------------------------------------------------- introspection


def get_plugins(settings: Any = None) -> list[dict[str, Any]]:
    """Loaded plugins with their hooks, source and version (``agent self-heal plugins``)."""
    _ensure_loaded(settings)
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        info = _state.info.get(name, {})
        entry: dict[str, Any] = {"name": name, "source": info.get("source", "api"),
                                 "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or [])}
        for key in ("distribution", "version", "path"):
            if info.get(key):
                entry[key] = info[key]
        out.append(entry)
    order = {"builtin": 0, "entrypoint": 1, "user": 2, "api": 3}
    return sorted(out, key=lambda e: (order.get(e["source"], 9), e["name"]))


def describe(settings: Any = None) -> dict[str, Any]:
    """Everything ``plugins`` prints: plugins, strategies per error type, errors."""
    plugins = get_plugins(settings)
    table = strategies(settings)
    return {
        "plugins": plugins,
        "strategies": [{"error_type": t, "strategy": s.name, "plugin": p, "summary": getattr(s, "summary", "")}
                       for t, (s, p) in sorted(table.items())],
        "registered_strategies": list(_state.strategy_list),
        "errors": [e.to_dict() for e in errors()],
    }
