"""The plugin manager: loads plugins, calls hooks and strategies with failures contained.

Load order (later plugins win where they overlap, e.g. a strategy for the same type):

1. built-ins named in ``plugin.toml`` (``[load] strategies`` and ``hooks``), loaded by
   file path from the ``strategies/`` and ``hooks/`` folders beside the manifest (in a
   wheel: ``selfheal_plugin/strategies``, ``selfheal_plugin/hooks``);
2. installed distributions with entry points in the group ``selfheal``. When
   ``SELFHEAL_LOAD_PLUGINS`` is set (comma-separated; empty means none), only the entry
   points it names are loaded, by the name ``agent self-heal plugins`` shows (the entry
   point's name, e.g. ``test_strategy``); a name that matches no installed entry point is
   reported in one warning line;
3. ``*.py`` files in ``BINKS_HOME/selfheal/plugins/`` (alphabetical).

Containment (plugins are third-party code):

* Every call into plugin code — importing a plugin, each hook implementation, each
  strategy method — runs in a daemon worker thread with a deadline
  (``[self_heal] plugin_timeout_seconds``). Anything it raises, ``BaseException``
  included (``sys.exit(3)``, ``SystemExit`` at import, ``KeyboardInterrupt``), is caught
  in that thread and recorded; after the deadline the caller stops waiting, reports the
  plugin and goes on (the abandoned thread cannot be killed; being a daemon thread it
  never keeps the process alive). A plugin that missed a deadline is skipped for the rest
  of the process — every hook and strategy of it, without a thread or a wait — so it
  costs at most one deadline and leaves at most one thread behind per process, however
  often its hooks would fire (said once, in the timeout's own error record). The daemon
  does not try it again: a hang is rarely transient, each try would cost a full deadline
  and another stuck thread; restarting the daemon (after fixing the plugin) does. A stop request (:func:`add_stop_event`, used by the
  daemon on SIGTERM) ends the wait at once with :class:`Interrupted`. The hooks of the
  built-in plugins (``hooks/``) are part of selfheal: they run in the caller's thread
  (their own calls into plugins are bounded as above) with exceptions contained.
* Hooks are called through pluggy's own API, never by rewriting its ``HookImpl``
  objects: :func:`fire` takes ``pm.hook.<name>.get_hookimpls()`` and calls each
  implementation through ``pm.subset_hook_caller(name, remove_plugins=<all others>)``,
  so pluggy still matches arguments, runs the plugin's own wrappers and tracing
  (``SELFHEAL_TRACE_HOOKS=1``) — one plugin per call, which is what lets one plugin's
  failure or hang cost only that plugin. A plugin whose only implementation of a hook
  is a wrapper wraps each of the other plugins' calls. (A hookwrapper around the whole
  call cannot do this: pluggy stops calling implementations at the first exception;
  ``add_hookcall_monitoring`` only observes.)
* Failures are :class:`PluginError` records: logged with the plugin's name, kept for
  this process (:func:`errors`, :func:`errors_since`) and persisted in
  ``BINKS_HOME/selfheal/state/plugin-errors.json`` (:func:`recent_errors`), so
  ``agent self-heal plugins`` in a later process lists them. Repeats of one error are
  counted, not duplicated; a plugin that loads again clears its load errors; errors not
  seen for :data:`ERROR_RETENTION_DAYS` are dropped.
* When a plugin that declares a strategy for an error type fails to load, that type has
  no strategy (:func:`strategy_for` raises :class:`StrategyError` "strategy … failed to
  load") unless a plugin loaded after it answers for the type: a fallback strategy
  (``Unknown``, or the built-in it was meant to replace) must not store a proposal in
  its place.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import normalize_error_type
from selfheal_plugin.plugins.strategy import FAILURE_KINDS
from selfheal_plugin.history.settings import DEFAULTS
from selfheal_plugin.history.text import for_terminal
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.plugins import hookspecs
from selfheal_plugin.plugins.notification import PRIORITIES, Notification  # noqa: F401  (plugins.Notification)
from selfheal_plugin.plugins.strategy import StrategyError

log = logging.getLogger("selfheal.plugins")

ENTRY_POINT_GROUP = "selfheal"
ERROR_RETENTION_DAYS = 7
MAX_PERSISTED_ERRORS = 100
ERRORS_FILE = "plugin-errors.json"

pm = pluggy.PluginManager("selfheal")
pm.add_hookspecs(hookspecs)
if os.environ.get("SELFHEAL_TRACE_HOOKS"):
    pm.trace.root.setwriter(sys.stderr.write)
    pm.enable_tracing()


@dataclass
class PluginError:
    """A plugin that failed to load, raised or timed out in a hook or strategy method.

    ``phase`` is ``load``, ``register`` (a bad registration), ``hook`` or ``strategy``;
    ``hook`` names the hook or strategy method (``propose``, ``simulate``);
    ``strategy`` the strategy's name for strategy failures. ``first_seen``/``last_seen``
    and ``count`` come from the persisted log.
    """

    plugin: str
    phase: str
    error: str  # one line: "SyntaxError: invalid syntax (bad.py, line 3)"
    hook: str | None = None
    path: str | None = None
    strategy: str | None = None
    first_seen: str | None = None
    last_seen: str | None = None
    count: int = 1

    def key(self) -> tuple[str, str, str | None, str]:
        return (self.plugin, self.phase, self.hook, self.error)

    def line(self) -> str:
        """``plugin user:x (hook notify): RuntimeError: sink is down``, one line for a terminal:
        a plugin's text and the history's it quotes (a pattern id) with every control and
        bidi character escaped (``for_terminal``), so no newline in it forges a line."""
        where = f" {self.hook}" if self.hook else ""
        return for_terminal(f"plugin {self.plugin} ({self.phase}{where}): {self.error}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PluginError:
        return cls(**{k: data.get(k) for k in ("plugin", "phase", "error", "hook", "path", "strategy",
                                                "first_seen", "last_seen")},
                   count=int(data.get("count") or 1))


class Interrupted(Exception):
    """A stop was requested (see :func:`interruptible`) while waiting for a plugin."""


class PluginCallFailed(SelfHealError):
    """A call into a plugin raised or missed its deadline; ``record`` says which and how."""

    def __init__(self, record: PluginError):
        super().__init__(record.line())
        self.record = record


@dataclass
class _State:
    builtins_loaded: bool = False
    dirs_loaded: set[str] = field(default_factory=set)
    errors: list[PluginError] = field(default_factory=list)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # plugin name -> source, path, version, rank
    strategies: dict[str, tuple[Any, str]] | None = None  # error_type -> (strategy, plugin name)
    kind_strategies: dict[str, tuple[Any, str]] = field(default_factory=dict)  # failure kind -> (strategy, plugin)
    strategy_list: list[dict[str, Any]] = field(default_factory=list)
    strategies_key: tuple | None = None
    failed_types: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # type -> (plugin, rank, error)
    failed_kinds: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # failure kind -> the same
    orphans: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (plugin, error)
    kind_orphans: dict[str, tuple[str, str]] = field(default_factory=dict)  # failure kind -> (plugin, error)
    rank: int = 0  # load sequence: a later plugin wins
    state_dir: Path | None = None  # where errors are persisted (known once a home is)
    unpersisted: list[PluginError] = field(default_factory=list)
    timeout: float = float(DEFAULTS["plugin_timeout_seconds"])
    owners: dict[int, str] = field(default_factory=dict)  # id(strategy) -> plugin name
    timed_out: dict[str, PluginError] = field(default_factory=dict)  # plugin -> its missed deadline: skipped


_state = _State()
_stop_events: list[threading.Event] = []
_stop_lock = threading.Lock()


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


# ---------------------------------------------------------------- bounded calls


def add_stop_event(stop: threading.Event) -> None:
    """From now on a wait for a plugin ends with :class:`Interrupted` as soon as ``stop``
    is set (in any thread). The daemon adds its stop event while it runs, so SIGTERM
    stops it whatever a plugin does. Undo with :func:`remove_stop_event`."""
    with _stop_lock:
        _stop_events.append(stop)


def remove_stop_event(stop: threading.Event) -> None:
    with _stop_lock:
        if stop in _stop_events:
            _stop_events.remove(stop)


@contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """:func:`add_stop_event` for the duration of a ``with`` block."""
    add_stop_event(stop)
    try:
        yield
    finally:
        remove_stop_event(stop)


def _stop_requested() -> bool:
    return any(e.is_set() for e in list(_stop_events))


def _timeout_from(settings: Any) -> float:
    value = getattr(settings, "plugin_timeout_seconds", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        _state.timeout = float(value)
    return _state.timeout


def _one_line(exc: BaseException) -> str:
    detail = str(exc).strip()
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text.splitlines()[0]


def call_plugin(plugin: str, what: str, fn: Callable[..., Any], *args: Any, phase: str = "hook",
                timeout: float | None = None, strategy: str | None = None, path: str | None = None,
                **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` — plugin code — in a daemon worker thread and wait at
    most ``timeout`` seconds (default: the last ``plugin_timeout_seconds`` seen).

    Returns its result. Anything it raises (``BaseException`` included) or a missed
    deadline is recorded as a :class:`PluginError` for ``plugin`` and raised as
    :class:`PluginCallFailed`; a stop request raises :class:`Interrupted`. After a missed
    deadline every later call into the same plugin raises :class:`PluginCallFailed` at once,
    unrecorded (the plugin is skipped for the rest of the process). The caller's
    own ``KeyboardInterrupt`` (Ctrl-C arrives in the main thread) is not caught.
    """
    limit = _state.timeout if timeout is None else timeout
    hook = None if phase == "load" else what
    missed = _state.timed_out.get(plugin)
    if missed is not None:  # said once, when it timed out; no thread, no wait, no new record
        log.debug("plugin %s skipped in %s: it timed out in %s earlier in this process", plugin, what, missed.hook)
        raise PluginCallFailed(PluginError(plugin=plugin, phase=phase, hook=hook, strategy=strategy, path=path,
                                           error=f"skipped: it timed out earlier in this process ({missed.error})"))
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 — plugin code: contained whatever it raises
            box["error"] = exc
            box["trace"] = traceback.format_exc()
        finally:
            done.set()

    worker = threading.Thread(target=target, name=f"selfheal-plugin:{plugin}:{what}", daemon=True)
    worker.start()
    deadline = time.monotonic() + limit
    while not done.wait(max(0.0, min(0.05, deadline - time.monotonic()))):
        if _stop_requested():
            raise Interrupted(f"stopped while waiting for plugin {plugin} ({what})")
        if time.monotonic() >= deadline:
            skipped = "" if phase == "load" else "; skipped for the rest of this process"
            record = PluginError(plugin=plugin, phase=phase, hook=hook, strategy=strategy, path=path,
                                 error=f"timed out after {limit:g} s (plugin_timeout_seconds); call abandoned"
                                       + skipped)
            _state.timed_out[plugin] = record
            _record(record)
            raise PluginCallFailed(record)
    if "error" in box:
        log.debug("plugin %s raised in %s:\n%s", plugin, what, box.get("trace"))
        record = PluginError(plugin=plugin, phase=phase, hook=hook, strategy=strategy, path=path,
                             error=_one_line(box["error"]))
        _record(record)
        raise PluginCallFailed(record)
    return box.get("value")


# ---------------------------------------------------------------- errors: recorded and persisted


_record_lock = threading.RLock()  # the watcher thread records too


def _record(err: PluginError) -> None:
    now = format_timestamp(utcnow())
    err.first_seen = err.first_seen or now
    err.last_seen = now
    where = f" in hook {err.hook}" if err.phase == "hook" and err.hook else (
        f" in {err.hook}" if err.hook else "")
    log.warning("plugin %s failed%s (%s): %s", err.plugin, where, err.phase, err.error)
    with _record_lock:
        _state.errors.append(err)
        _state.unpersisted.append(err)
        _flush()


def _errors_path() -> Path | None:
    return _state.state_dir / ERRORS_FILE if _state.state_dir is not None else None


def _set_state_dir(plugins_dir: Path) -> None:
    """Errors are persisted in ``plugins_dir/../state`` (``BINKS_HOME/selfheal/state``)."""
    folder = Path(plugins_dir).expanduser().parent / "state"
    if _state.state_dir == folder:
        return
    _state.state_dir = folder
    _flush()


def _read_log(path: Path) -> list[PluginError]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [PluginError.from_dict(d) for d in data.get("errors", []) if isinstance(d, dict)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable plugin error log %s: %s", path, exc)
        return []


def _update_log(change: Callable[[list[PluginError]], list[PluginError]]) -> None:
    path = _errors_path()
    if path is None:
        return
    from filelock import FileLock, Timeout  # only when a plugin failed: a command with none does not import it

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        gitignore = path.parent / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# selfheal state, never versioned\n*\n", encoding="utf-8")
        with FileLock(str(path) + ".lock", timeout=5):
            entries = change(_read_log(path))
            horizon = utcnow() - timedelta(days=ERROR_RETENTION_DAYS)
            kept = [e for e in entries if _seen_after(e, horizon)]
            kept.sort(key=lambda e: e.last_seen or "")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"errors": [e.to_dict() for e in kept[-MAX_PERSISTED_ERRORS:]]},
                                      indent=1), encoding="utf-8")
            os.replace(tmp, path)
    except (OSError, Timeout) as exc:
        log.warning("cannot persist plugin errors in %s: %s", path, exc)


def _seen_after(err: PluginError, horizon: datetime) -> bool:
    try:
        return parse_timestamp(err.last_seen or "") >= horizon
    except ValueError:
        return False


def _flush() -> None:
    """Merge the errors recorded since the last flush into the persisted log."""
    with _record_lock:
        if _errors_path() is None or not _state.unpersisted:
            return
        fresh, _state.unpersisted = _state.unpersisted, []
        _merge_into_log(fresh)


def _merge_into_log(fresh: list[PluginError]) -> None:
    def merge(entries: list[PluginError]) -> list[PluginError]:
        by_key = {e.key(): e for e in entries}
        for err in fresh:
            old = by_key.get(err.key())
            if old is None:
                by_key[err.key()] = PluginError.from_dict(err.to_dict())
            else:
                old.count += 1
                old.last_seen = err.last_seen
        return list(by_key.values())

    _update_log(merge)


def _forget_load_errors(plugin: str) -> None:
    """A plugin that loads again no longer has the load errors of earlier processes."""
    path = _errors_path()
    if path is None or not path.exists():
        return
    if any(e.plugin == plugin and e.phase == "load" for e in _read_log(path)):
        _update_log(lambda entries: [e for e in entries if not (e.plugin == plugin and e.phase == "load")])


def errors() -> list[PluginError]:
    """Load, hook and strategy failures recorded in this process, oldest first."""
    return list(_state.errors)


def errors_mark() -> int:
    """A position in this process's error list, for :func:`errors_since`."""
    return len(_state.errors)


def errors_since(mark: int) -> list[PluginError]:
    """Errors recorded in this process after ``errors_mark()`` returned ``mark``."""
    return list(_state.errors[mark:])


def recent_errors(settings: Any = None) -> list[PluginError]:
    """Errors of this process and, when the home is known, those persisted by earlier
    processes (last :data:`ERROR_RETENTION_DAYS` days), most recent last."""
    if settings is not None:
        _set_state_dir(settings.plugins_dir)
    path = _errors_path()
    if path is None:
        return errors()
    _flush()
    return sorted(_read_log(path), key=lambda e: e.last_seen or "")


# ---------------------------------------------------------------- loading


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
        _state.rank += 1
        _state.info[name] = {"source": source, "path": path, "version": version, "rank": _state.rank}
        _state.strategies = None
        _forget_load_errors(name)
    return name


def unregister(plugin: Any = None, name: str | None = None) -> None:
    name = name or (pm.get_name(plugin) if plugin is not None else None)
    pm.unregister(plugin, name)
    _state.info.pop(name or "", None)
    _state.strategies = None


def _declared(path: Path | str, attribute: str) -> list[str]:
    """The names a plugin file assigns to ``attribute`` (``error_types = ("timeout", ...)``
    in a class body), read without running it. A file that does not parse is scanned with a
    regular expression."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found: list[str] = []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        for m in re.finditer(rf"\b{attribute}\s*(?::[^=\n]*)?=\s*[\(\[]?([^\n\)\]]*)", text):
            found += re.findall(r"[\"']([^\"']+)[\"']", m.group(1))
    else:
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            if not any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
                continue
            value = getattr(node, "value", None)
            items = value.elts if isinstance(value, (ast.Tuple, ast.List, ast.Set)) else [value]
            found += [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    return [t for t in found if t]


def declared_error_types(path: Path | str) -> list[str]:
    """The error types a plugin file declares (``error_types = ("timeout", ...)``), read
    without running it: what a plugin that failed to load would have answered for."""
    return sorted({normalize_error_type(t) for t in _declared(path, "error_types")})


def declared_kinds(path: Path | str) -> list[str]:
    """The failure kinds a plugin file declares (``kinds = ("slow_tail", ...)``), read
    without running it; only names of :data:`FAILURE_KINDS` other than ``unknown``."""
    return sorted({k for k in _declared(path, "kinds") if k in FAILURE_KINDS and k != "unknown"})


def _load_failed(plugin_name: str, exc_record: PluginError, types: list[str], kinds: list[str]) -> None:
    """A plugin that failed to load answers for nothing: the error types and failure kinds its
    source declares (:func:`declared_error_types`, :func:`declared_kinds`) are failed, and
    nothing answers for them unless a plugin loaded after it does."""
    _state.rank += 1
    for t in types:
        _state.failed_types[t] = (plugin_name, _state.rank, exc_record.error)
    for k in kinds:
        _state.failed_kinds[k] = (plugin_name, _state.rank, exc_record.error)
    _state.strategies = None


def _load_file(module_name: str, plugin_name: str, path: Path, source: str,
               default_types: tuple[str, ...] = ()) -> None:
    if source == "builtin":
        try:
            module = _load_module_from_path(module_name, path)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 — a broken built-in must not stop the others
            record = PluginError(plugin=plugin_name, phase="load", error=_one_line(exc), path=str(path))
            _record(record)
            _load_failed(plugin_name, record, sorted({*declared_error_types(path), *default_types}),
                         declared_kinds(path))
            return
    else:
        try:
            module = call_plugin(plugin_name, "import", _load_module_from_path, module_name, path,
                                 phase="load", path=str(path))
        except PluginCallFailed as exc:
            _load_failed(plugin_name, exc.record, declared_error_types(path), declared_kinds(path))
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
            owns = (normalize_error_type(name),) if kind == "strategies" else ()
            _load_file(f"selfheal_plugin.{kind}.{name}", f"selfheal.{kind}.{name}", path, "builtin", owns)


def _wanted_entry_points() -> set[str] | None:
    allow = os.environ.get("SELFHEAL_LOAD_PLUGINS")
    if allow is None:
        return None
    return {a.strip() for a in allow.split(",") if a.strip()}


def _entry_point_source(ep: metadata.EntryPoint) -> list[Path]:
    """The files of an entry point's module, found without importing it (for
    :func:`declared_error_types` when it fails to load)."""
    try:
        spec = importlib.util.find_spec(ep.module.split(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    origin = Path(spec.origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def _load_entry_points() -> None:
    wanted = _wanted_entry_points()
    found: dict[str, str | None] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        name = ep.name
        found.setdefault(name, dist_name)
        if wanted is not None and name not in wanted:
            continue
        if pm.get_plugin(name) is not None or pm.has_plugin(name):
            continue
        try:
            plugin = call_plugin(name, "import", ep.load, phase="load", path=ep.value)
        except PluginCallFailed as exc:
            sources = _entry_point_source(ep)
            _load_failed(name, exc.record, sorted({t for f in sources for t in declared_error_types(f)}),
                         sorted({k for f in sources for k in declared_kinds(f)}))
            continue
        register(plugin, name, source="entrypoint", path=ep.value,
                 version=dist.version if dist is not None else None)
        if name in _state.info and dist_name:
            _state.info[name]["distribution"] = dist_name
    unknown = sorted((wanted or set()) - set(found))
    if unknown:
        hint = {n: sorted(e for e, d in found.items() if d and d.lower().replace("_", "-") ==
                          n.lower().replace("_", "-")) for n in unknown}
        names = ", ".join(f"{n!r}" + (f" (a distribution; its plugins: {', '.join(hint[n])})" if hint[n] else "")
                          for n in unknown)
        log.warning("SELFHEAL_LOAD_PLUGINS names no installed plugin %s; installed: %s", names,
                    ", ".join(sorted(found)) or "none")


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
    """Load built-ins and entry points once, and the user folder ``plugins_dir`` once.

    ``plugins_dir`` (``Settings.plugins_dir``) also says where errors are persisted."""
    if plugins_dir is not None:
        _set_state_dir(Path(plugins_dir))
    if not _state.builtins_loaded:
        _state.builtins_loaded = True
        _load_builtins()
        _load_entry_points()
    if plugins_dir is not None:
        load_user_plugins(Path(plugins_dir))


def _ensure_loaded(settings: Any = None) -> None:
    _timeout_from(settings)
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


# ---------------------------------------------------------------- calling hooks


def hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "selfheal_spec", None) is not None)


def _is_wrapper(impl: Any) -> bool:
    return bool(impl.hookwrapper or impl.wrapper)


def _call_each(hook_name: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    """Call each plugin's implementation of ``hook_name`` in pluggy's order (last
    registered first, ``tryfirst``/``trylast`` honoured), each through
    ``pm.subset_hook_caller`` restricted to that plugin (plus plugins that only wrap the
    hook); yields (plugin name, its results). Failures are recorded and yield nothing."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    wrapping = {id(i.plugin) for i in impls if _is_wrapper(i)} - {id(i.plugin) for i in impls if not _is_wrapper(i)}
    for impl in reversed([i for i in impls if not _is_wrapper(i)]):
        others = [p for p in pm.get_plugins() if p is not impl.plugin and id(p) not in wrapping]
        caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
        name = impl.plugin_name
        if _state.info.get(name, {}).get("source") == "builtin":
            try:
                results = caller(**kwargs)
            except Interrupted:
                raise
            except (Exception, SystemExit) as exc:  # noqa: BLE001 — one failing hook must not stop the loop
                log.debug("plugin %s raised in %s:\n%s", name, hook_name, traceback.format_exc())
                _record(PluginError(plugin=name, phase="hook", hook=hook_name, error=_one_line(exc)))
                continue
        else:
            try:
                results = call_plugin(name, hook_name, caller, **kwargs)
            except PluginCallFailed:
                continue
        yield name, list(results or [])


def fire(hook_name: str, **kwargs: Any) -> list[Any]:
    """Call a hook on every plugin; returns the non-None results.

    Loads plugins first (the user folder of ``kwargs["settings"]`` too). A plugin that
    raises (anything, ``SystemExit`` included) or misses the deadline is recorded in
    :func:`errors`, persisted and logged with its name; the others' results still come back.
    """
    if hook_name not in hook_names():
        raise ValueError(f"unknown hook {hook_name!r}; hooks: {', '.join(hook_names())}")
    _ensure_loaded(kwargs.get("settings"))
    out: list[Any] = []
    for _name, results in _call_each(hook_name, kwargs):
        out.extend(results)
    return out


def notify(notification: Notification, settings: Any) -> list[Any]:
    """Send one notification through every ``notify`` implementation."""
    return fire("notify", notification=notification, settings=settings)


# ---------------------------------------------------------------- strategies


def _collect_strategies() -> None:
    key = tuple(id(p) for p in pm.get_plugins())
    if _state.strategies is not None and _state.strategies_key == key:
        return
    table: dict[str, tuple[Any, str]] = {}
    kind_table: dict[str, tuple[Any, str]] = {}
    listing: list[dict[str, Any]] = []
    owners: dict[int, str] = {}
    # get_hookimpls() lists implementations lowest priority first (pluggy calls them in
    # reverse): registering in this order lets a later plugin replace an earlier one.
    impls = [i for i in pm.hook.register_strategies.get_hookimpls() if not _is_wrapper(i)]
    # types and kinds whose plugin's register_strategies failed: like a plugin that failed to
    # load, it answers for nothing, and neither does what it would have replaced (_register_failed)
    failed = dict(_state.failed_types)
    failed_kinds = dict(_state.failed_kinds)
    for impl in impls:
        found: list[Any] = []  # a fresh list: a timed-out plugin may still append to its own
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        caller = pm.subset_hook_caller("register_strategies", remove_plugins=others)
        name = impl.plugin_name
        if _state.info.get(name, {}).get("source") == "builtin":
            try:
                caller(register=found.append)
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                record = PluginError(plugin=name, phase="hook", hook="register_strategies", error=_one_line(exc))
                _record(record)
                _register_failed(failed, failed_kinds, name, impl.plugin, list(found), record)
                continue
        else:
            try:
                call_plugin(name, "register_strategies", caller, register=found.append)
            except PluginCallFailed as exc:
                _register_failed(failed, failed_kinds, name, impl.plugin, list(found), exc.record)
                continue
        for strategy in found:
            problem = _strategy_problem(strategy)
            if problem:
                _record(PluginError(plugin=name, phase="register", hook="register_strategies", error=problem))
                continue
            types = [normalize_error_type(t) for t in strategy.error_types or ()]
            for t in types:
                previous = table.get(t)
                table[t] = (strategy, name)
                if previous is not None:
                    log.info("strategy %s (%s) replaces %s for %s", strategy.name, name, previous[0].name, t)
            kinds = [k for k in getattr(strategy, "kinds", ()) or () if k != "unknown"]
            for k in kinds:
                kind_table[k] = (strategy, name)
            owners[id(strategy)] = name
            listing.append({"name": strategy.name, "plugin": name, "error_types": types, "kinds": kinds,
                            "summary": getattr(strategy, "summary", "")})
    _state.strategies, _state.strategy_list, _state.strategies_key = table, listing, key
    _state.kind_strategies = kind_table
    _state.orphans, _state.owners = _orphans(failed, table), owners
    _state.kind_orphans = _orphans(failed_kinds, kind_table)


def _orphans(failed: dict[str, tuple[str, int, str]], table: dict[str, tuple[Any, str]]
             ) -> dict[str, tuple[str, str]]:
    """The failed types (or kinds) no plugin loaded after the failed one answers for."""
    out = {}
    for t, (plugin, rank, error) in failed.items():
        answering = table.get(t)
        if answering is None or _state.info.get(answering[1], {}).get("rank", 0) < rank:
            out[t] = (plugin, error)
    return out


def _register_failed(failed: dict[str, tuple[str, int, str]], failed_kinds: dict[str, tuple[str, int, str]],
                     name: str, plugin: Any, found: list[Any], record: PluginError) -> None:
    """A plugin's ``register_strategies`` raised or timed out: what it registered before is
    dropped, and the error types and failure kinds it answers for — those of the strategies
    it registered, and those its source declares (:func:`declared_error_types`,
    :func:`declared_kinds`) — are its failed types and kinds, as for a plugin that failed to
    load: nothing answers for them unless a later plugin does."""
    types: set[str] = set()
    kinds: set[str] = set()
    for strategy in found:
        declared = getattr(strategy, "error_types", None)
        if isinstance(declared, (tuple, list)):
            types |= {normalize_error_type(t) for t in declared if isinstance(t, str) and t}
        declared = getattr(strategy, "kinds", None)
        if isinstance(declared, (tuple, list)):
            kinds |= {k for k in declared if k in FAILURE_KINDS and k != "unknown"}
    for path in _source_files(name, plugin):
        types |= set(declared_error_types(path))
        kinds |= set(declared_kinds(path))
    rank = _state.info.get(name, {}).get("rank", _state.rank)
    for t in types:
        failed[t] = (name, rank, record.error)
    for k in kinds:
        failed_kinds[k] = (name, rank, record.error)


def _source_files(name: str, plugin: Any) -> list[Path]:
    """The files a loaded plugin came from (a user plugin's file; an entry point's module, or
    its package's modules); none for one registered through the API (a test's class)."""
    info = _state.info.get(name, {})
    if info.get("source") in ("builtin", "user") and info.get("path"):
        return [Path(info["path"])]
    if info.get("source") == "entrypoint" and isinstance(plugin, ModuleType):
        origin = getattr(plugin, "__file__", None)
        if isinstance(origin, str) and origin.endswith(".py"):
            here = Path(origin)
            return sorted(here.parent.rglob("*.py")) if here.name == "__init__.py" else [here]
    return []


def _strategy_problem(strategy: Any) -> str | None:
    if not isinstance(getattr(strategy, "name", None), str) or not strategy.name:
        return f"registered strategy {strategy!r} has no name"
    types = getattr(strategy, "error_types", None) or ()
    kinds = getattr(strategy, "kinds", None) or ()
    for what, names in (("error_types", types), ("kinds", kinds)):
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(t, str) for t in names):
            return f"strategy {strategy.name!r}: {what} must be a sequence of names"
    if not types and not kinds:
        return f"strategy {strategy.name!r}: error_types (or kinds) must name at least one"
    unknown_kinds = sorted(set(kinds) - set(FAILURE_KINDS))
    if unknown_kinds:
        return f"strategy {strategy.name!r}: unknown failure kind(s) {', '.join(unknown_kinds)}"
    for method in ("propose", "simulate"):
        if not callable(getattr(strategy, method, None)):
            return f"strategy {strategy.name!r} has no {method}() method"
    return None


def strategies(settings: Any = None) -> dict[str, tuple[Any, str]]:
    """Error type → (strategy, plugin name) after every plugin had its say."""
    _ensure_loaded(settings)
    _collect_strategies()
    return dict(_state.strategies or {})


def failed_to_load(settings: Any = None) -> dict[str, tuple[str, str]]:
    """Error type → (plugin, its load error) for types whose strategy failed to load."""
    strategies(settings)
    return dict(_state.orphans)


def kinds_failed_to_load(settings: Any = None) -> dict[str, tuple[str, str]]:
    """Failure kind → (plugin, its error) for kinds whose strategy failed to register."""
    strategies(settings)
    return dict(_state.kind_orphans)


def _is_builtin(plugin: str) -> bool:
    return _state.info.get(plugin, {}).get("source") == "builtin"


def resolve_strategy(error_type: str | None, settings: Any = None, kind: str | None = None) -> tuple[Any, str]:
    """(strategy, plugin name) answering for a pattern of ``error_type`` (any spelling)
    whose failure kind (:mod:`selfheal_plugin.analysis.evidence`) is ``kind``.

    Precedence, first that applies:

    1. a strategy registered for the kind by a plugin that is not built-in (the last loaded);
    2. a strategy registered for the error type by a plugin that is not built-in (an
       existing third-party replacement of a built-in keeps answering for its type);
    3. the error type's strategy when it also lists the kind (the label was right), and
       the ``Unknown`` strategy for patterns without a label (it delegates by kind itself,
       and asks for the errors to be labelled at the source);
    4. a built-in strategy registered for the kind (the label was wrong: an ``ENOENT``
       labelled ``connection_refused`` goes to the strategy for ``missing_resource``);
    5. the strategy registered for the error type;
    6. the ``Unknown`` strategy.

    A kind of ``unknown`` (or None) skips the kind steps: the runtime's label decides.
    Raises :class:`StrategyError` when the plugin meant to answer for the kind or the type
    failed to load (no fallback may answer in its place), or when no strategy answers at all."""
    table = strategies(settings)
    etype = normalize_error_type(error_type)
    if kind and kind in _state.kind_orphans:
        plugin, error = _state.kind_orphans[kind]
        raise StrategyError(f"strategy for failure kind {kind} failed to load (plugin {plugin}: {error}); "
                            "nothing proposed (see: agent self-heal plugins)")
    by_kind = _state.kind_strategies.get(kind) if kind and kind != "unknown" else None
    if by_kind is not None and not _is_builtin(by_kind[1]):
        return by_kind
    if etype in _state.orphans:
        plugin, error = _state.orphans[etype]
        raise StrategyError(f"strategy for {etype} failed to load (plugin {plugin}: {error}); nothing proposed "
                            "(see: agent self-heal plugins)")
    if etype in table and not _is_builtin(table[etype][1]):
        return table[etype]
    if by_kind is not None and etype in table and (kind in (getattr(table[etype][0], "kinds", ()) or ())
                                                   or etype == "Unknown"):
        return table[etype]
    if by_kind is not None:
        return by_kind
    if etype in table:
        return table[etype]
    if "Unknown" in table:
        return table["Unknown"]
    raise StrategyError(f"no strategy answers for error type {etype!r} (see: agent self-heal plugins)")


def strategy_for(error_type: str | None, settings: Any = None, kind: str | None = None) -> Any:
    """The strategy of :func:`resolve_strategy`."""
    return resolve_strategy(error_type, settings, kind)[0]


def plugin_of(strategy: Any) -> str:
    """The name of the plugin that registered ``strategy`` (``?`` when unknown)."""
    return _state.owners.get(id(strategy), "?")


def call_strategy(strategy: Any, method: str, *args: Any, settings: Any = None) -> Any:
    """``strategy.<method>(*args)`` bounded and contained like every plugin call; a
    failure raises :class:`StrategyError` naming the strategy and its plugin."""
    _timeout_from(settings)
    name = getattr(strategy, "name", repr(strategy))
    plugin = plugin_of(strategy)
    try:
        return call_plugin(plugin, method, getattr(strategy, method), *args, phase="strategy", strategy=name)
    except PluginCallFailed as exc:
        raise StrategyError(f"strategy {name!r} (plugin {plugin}) failed in {method}(): "
                            f"{exc.record.error}") from None


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
    """Everything ``plugins`` prints: plugins, strategies per error type, error types
    whose strategy failed to load, and plugin errors (this process's and those persisted
    by earlier ones, :func:`recent_errors`)."""
    plugins = get_plugins(settings)
    table = strategies(settings)
    return {
        "plugins": plugins,
        "strategies": [{"error_type": t, "strategy": s.name, "plugin": p, "summary": getattr(s, "summary", "")}
                       for t, (s, p) in sorted(table.items())],
        "kind_strategies": [{"kind": k, "strategy": s.name, "plugin": p}
                            for k, (s, p) in sorted(_state.kind_strategies.items())],
        "registered_strategies": list(_state.strategy_list),
        "failed_strategies": [{"error_type": t, "plugin": p, "error": e} for t, (p, e) in sorted(_state.orphans.items())],
        "failed_kind_strategies": [{"kind": k, "plugin": p, "error": e}
                                   for k, (p, e) in sorted(_state.kind_orphans.items())],
        "errors": [e.to_dict() for e in recent_errors(settings)],
    }
