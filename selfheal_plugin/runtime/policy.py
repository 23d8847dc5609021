"""``ToolPolicy``: the runtime side of a fix. It wraps each tool call with the settings
``config.toml`` holds for that tool, so a change selfheal commits is actually in force::

    policy = ToolPolicy(home / "config.toml", recorder=recorder)
    with recorder.run("planner", task):
        text = policy.call("list_dir", list_dir, {"path": "/logs"})              # sync
        hits = await policy.acall("mcp__search__web_search", search, {"query": q})  # async

Keys it reads (all optional; a tool without any is called directly)::

    [tools."NAME"]
    timeout_ms = 90000          # the call fails with "Tool NAME timed out after 90s"
    retry_attempts = 3          # retries after the first failure
    retry_backoff_ms = 1000     # wait before retry k: backoff * 2**(k-1)
    preflight = ["path_exists"] # path-like arguments must exist, else fail fast
    [tools."NAME".circuit_breaker]
    failure_threshold = 3       # consecutive failures that open the breaker
    timeout_duration_sec = 300  # open this long, then half-open
    half_open_requests = 1      # trial calls allowed while half-open
    [servers."SERVER"]          # SERVER from mcp__SERVER__tool or the call's server=
    health_check = true         # ask the health_check hook before each call
    auto_restart = true         # on a crash/refused connection call the restart hook, retry once
    [canary."ID"] / [shadow."ID"] / [ab."ID"] # experiments selfheal writes: see selfheal_plugin.runtime.experiments

The policy reloads ``config.toml`` when it changes on disk: a watchdog observer on the
config's folder, and a cheap mtime/size check at most every ``check_interval`` seconds as a
fallback. A config that does not parse or holds a bad value raises :class:`ConfigError`
when the policy is created; on a later reload it is logged and the last good config stays.

``time_scale`` is real seconds per policy second: with 0.01 a ``timeout_ms = 30000`` fires
after 0.3 real seconds, a call is recorded as lasting its real time / 0.01, and a clock with
``advance`` (a :class:`~selfheal_plugin.history.clock.SimulatedClock`) is moved by that much — so a
testbed keeps timeouts real while a week of runs takes seconds.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from selfheal_plugin.history.clock import Clock, wall_clock
from selfheal_plugin.errors import ConfigError
from selfheal_plugin.runtime.experiments import (
    ARM_CANARY, Experiments, ShadowLog, ab_layers, canary_layers, parse_experiments, shadow_timeout,
)
from selfheal_plugin.history.connection import BREAKER_REFUSAL, PREFLIGHT_REFUSAL, classify_error, server_of
from selfheal_plugin.runtime.recorder import RecordedRun, RunRecorder, current_run
from selfheal_plugin.history.settings import read_config
from selfheal_plugin.runtime.toolconfig import (
    CircuitBreakerSettings, _where, validate_server_table,
    validate_tool_table,
)

log = logging.getLogger("selfheal.policy")
_monotonic = time.monotonic

# Failure labels after which a server restart can help.
RESTARTABLE = ("server_crashed", "connection_refused")
_PATH_KEYS = {"path", "file", "file_path", "filepath", "filename", "dir", "directory", "dirpath", "cwd", "root"}


# ---------------------------------------------------------------- failures the policy raises


class ToolPolicyError(Exception):
    """A call the policy failed itself (timeout, preflight, open breaker, unhealthy server)."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool


class ToolTimeout(ToolPolicyError, TimeoutError):
    pass


class PreflightFailed(ToolPolicyError):
    pass


class CircuitOpen(ToolPolicyError):
    pass


class ServerUnavailable(ToolPolicyError):
    pass


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class ToolSettings:
    """The effective settings of one tool for one call."""
    tool: str
    server: str | None = None
    timeout_ms: int | None = None
    retry_attempts: int = 0
    retry_backoff_ms: int = 0
    preflight: tuple[str, ...] = ()
    circuit_breaker: CircuitBreakerSettings | None = None
    health_check: bool = False
    auto_restart: bool = False
    sources: tuple[str, ...] = ()  # which config tables these came from, lowest first
    shadow_timeout_ms: int | None = None  # observed only ([shadow."ID"]), never enforced
    shadow_of: str | None = None  # the improvement id of that shadow section
    plain: bool = field(init=False, default=True)  # nothing to enforce: call straight through

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", (
            self.timeout_ms is None and self.retry_attempts == 0 and not self.preflight
            and self.circuit_breaker is None and not self.health_check and not self.auto_restart
            and self.shadow_timeout_ms is None))


@dataclass(frozen=True)
class PolicyConfig:
    """The parts of ``config.toml`` the policy reads, validated."""
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    servers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)  # the whole file, for later sections
    experiments: Experiments = field(default_factory=Experiments)  # [canary.*] and [shadow.*]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path) -> "PolicyConfig":
        tools_raw = data.get("tools", {})
        servers_raw = data.get("servers", {})
        if not isinstance(tools_raw, dict):
            raise ConfigError(f"{path}: [tools] must be a table")
        if not isinstance(servers_raw, dict):
            raise ConfigError(f"{path}: [servers] must be a table")
        tools = {name: validate_tool_table(t, _where(path, f'tools."{name}"')) for name, t in tools_raw.items()}
        servers = {name: validate_server_table(s, _where(path, f'servers."{name}"'))
                   for name, s in servers_raw.items()}
        return cls(tools, servers, dict(data), parse_experiments(data, path))

    @classmethod
    def load(cls, path: Path) -> "PolicyConfig":
        return cls.from_dict(read_config(path), path)


def resolve_tool_settings(config: PolicyConfig, tool: str, *, server: str | None = None,
                          defaults: Mapping[str, Any] | None = None,
                          run: RecordedRun | None = None) -> ToolSettings:
    """The effective settings for ``tool`` in ``run``: the one place layers are merged.

    Layers, lowest first: the runtime's ``defaults`` (e.g. its built-in timeout),
    ``[tools."NAME"]``, then ``[servers."SERVER"]`` for the server keys. A section that
    depends on the run (a canary or shadow arm) belongs here, after ``[tools]``; ``run`` is
    passed for that purpose and results that depend on it must not be cached per tool.
    """
    merged: dict[str, Any] = {}
    sources: list[str] = []
    if defaults:
        merged.update(defaults)
        sources.append("defaults")
    table = config.tools.get(tool)
    if table:
        merged.update(table)
        sources.append(f'tools."{tool}"')
    server = server or server_of(tool)
    if server and server in config.servers and config.servers[server]:
        merged.update(config.servers[server])
        sources.append(f'servers."{server}"')
    for canary, arm in canary_layers(config.experiments, run.id if run is not None else None):
        if arm != ARM_CANARY:
            continue
        if canary.tools.get(tool):
            merged.update(canary.tools[tool])
            sources.append(f'canary."{canary.improvement_id}".tools."{tool}"')
        if server and canary.servers.get(server):
            merged.update(canary.servers[server])
            sources.append(f'canary."{canary.improvement_id}".servers."{server}"')
    for ab, arm in ab_layers(config.experiments, run.id if run is not None else None):
        if arm is None:
            continue
        if arm.tools.get(tool):
            merged.update(arm.tools[tool])
            sources.append(f'ab."{ab.experiment_id}".arms."{arm.improvement_id}".tools."{tool}"')
        if server and arm.servers.get(server):
            merged.update(arm.servers[server])
            sources.append(f'ab."{ab.experiment_id}".arms."{arm.improvement_id}".servers."{server}"')
    shadow = shadow_timeout(config.experiments, tool)
    return ToolSettings(
        tool=tool, server=server,
        timeout_ms=merged.get("timeout_ms"),
        retry_attempts=merged.get("retry_attempts", 0),
        retry_backoff_ms=merged.get("retry_backoff_ms", 0),
        preflight=tuple(merged.get("preflight", ())),
        circuit_breaker=merged.get("circuit_breaker"),
        health_check=merged.get("health_check", False),
        auto_restart=merged.get("auto_restart", False),
        sources=tuple(sources),
        shadow_timeout_ms=shadow[1] if shadow else None,
        shadow_of=shadow[0] if shadow else None,
    )


# ---------------------------------------------------------------- circuit breaker


class CircuitBreaker:
    """closed → open after ``failure_threshold`` consecutive failures; open fails fast for
    ``timeout_duration_sec``; then half-open lets ``half_open_requests`` trial calls through:
    a failed trial opens it again, that many successful trials close it."""

    def __init__(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.opened_at: datetime | None = None
        self.trials_in_flight = 0
        self.trial_successes = 0
        self._lock = threading.Lock()

    def admit(self, cfg: CircuitBreakerSettings, now: datetime) -> str | None:
        """None when the call may go ahead, else the reason it may not."""
        with self._lock:
            if self.state == "open":
                waited = (now - self.opened_at).total_seconds() if self.opened_at else 0.0
                if waited < cfg.timeout_duration_sec:
                    return (f"{self.failures} consecutive failures; "
                            f"next trial in {cfg.timeout_duration_sec - waited:.0f}s")
                self.state, self.trials_in_flight, self.trial_successes = "half_open", 0, 0
            if self.state == "half_open":
                if self.trials_in_flight + self.trial_successes >= cfg.half_open_requests:
                    return f"half-open, {cfg.half_open_requests} trial request(s) already under way"
                self.trials_in_flight += 1
            return None

    def record(self, cfg: CircuitBreakerSettings, success: bool, now: datetime) -> None:
        with self._lock:
            if self.state == "half_open":
                self.trials_in_flight = max(0, self.trials_in_flight - 1)
                if not success:
                    self.state, self.opened_at = "open", now
                    return
                self.trial_successes += 1
                if self.trial_successes >= cfg.half_open_requests:
                    self.state, self.failures = "closed", 0
                return
            if success:
                self.failures = 0
                return
            self.failures += 1
            if self.failures >= cfg.failure_threshold:
                self.state, self.opened_at = "open", now


# ---------------------------------------------------------------- config watching


class _ConfigWatcher:
    """A watchdog observer on the config's folder that tells the policy to reload."""

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        target = os.path.abspath(path)

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001
                paths = (getattr(event, "src_path", ""), getattr(event, "dest_path", ""))
                if any(p and os.path.abspath(os.fsdecode(p)) == target for p in paths):
                    on_change()

        self.observer = Observer()
        self.observer.daemon = True
        self.observer.schedule(Handler(), os.path.dirname(target), recursive=False)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=2)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _fmt_seconds(ms: int) -> str:
    s = ms / 1000
    return f"{s:g}s"


def _maybe_await(value: Any) -> Awaitable[Any]:
    async def done() -> Any:
        return value
    return value if inspect.isawaitable(value) else done()


# ---------------------------------------------------------------- the policy


class ToolPolicy:
    """Wraps tool calls with the settings ``config.toml`` holds for each tool.

    :param config_path: ``BINKS_HOME/config.toml`` (may not exist yet).
    :param recorder: record every attempt (``tool_start``/``tool_complete``) in the run of
        the enclosing ``recorder.run(...)`` block, unless a call passes ``run=``.
    :param clock: times the circuit breaker (default: wall clock); advanced by call
        durations and backoffs when it has ``advance``.
    :param time_scale: real seconds per policy second (see the module docs).
    :param defaults: the runtime's own settings for every tool (e.g. ``{"timeout_ms":
        60000}``); ``[tools."NAME"]`` overrides them.
    :param restart_server: hook ``(server) -> None | awaitable``: restart a crashed server.
    :param health_check: hook ``(server) -> bool | awaitable[bool]``.
    :param watch: start a watchdog observer (else only the mtime/size check reloads).
    :param check_interval: seconds between fallback mtime/size checks (0: every call).
    :param base_dir: relative paths in ``path_exists`` preflight resolve against it.
    """

    def __init__(self, config_path: str | Path, *, recorder: RunRecorder | None = None,
                 clock: Clock | None = None, time_scale: float = 1.0,
                 defaults: Mapping[str, Any] | None = None,
                 restart_server: Callable[[str], Any] | None = None,
                 health_check: Callable[[str], Any] | None = None,
                 watch: bool = True, check_interval: float = 1.0,
                 base_dir: str | Path | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.config_path = Path(config_path)
        self.recorder = recorder
        self.clock: Clock = clock or wall_clock
        self.time_scale = float(time_scale)
        self.defaults = validate_tool_table(dict(defaults or {}), "ToolPolicy defaults") if defaults else {}
        self.restart_server = restart_server
        self.health_check = health_check
        self.check_interval = check_interval
        self.base_dir = Path(base_dir) if base_dir else None
        self.config_version = 0
        self.last_error: str | None = None
        self._reload_lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._cache: dict[tuple[str, str | None], ToolSettings] = {}
        self._config = PolicyConfig()
        self._sig: tuple[int, int, int] | None = None
        self._dirty = False
        self._next_check = 0.0
        self._shadow_log = ShadowLog()
        self._per_run = False
        self._tagged: dict[str, int] = {}  # run id -> config version its arms were recorded at
        self._observers: set[Any] = set()  # shadow observations still running (tasks, threads)
        self._load(initial=True)
        self._watcher = None
        if watch:
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            self._watcher = _ConfigWatcher(self.config_path, self._on_change)

    # ------------------------------------------------------------ config

    @property
    def config(self) -> PolicyConfig:
        return self._config

    def _on_change(self) -> None:
        self._dirty = True
        self.reload()

    def _load(self, initial: bool = False) -> bool:
        sig = _signature(self.config_path)
        try:
            cfg = PolicyConfig.load(self.config_path)
        except ConfigError as exc:
            if initial:
                raise
            if self.last_error != str(exc):
                log.warning("config not reloaded, keeping the last good one: %s", exc)
            self.last_error = str(exc)
            self._sig = sig  # do not re-parse the same broken file on every call
            return False
        self._config, self._cache, self._sig = cfg, {}, sig
        self._per_run = bool(cfg.experiments.canaries or cfg.experiments.abs)  # settings depend on the run: no cache
        self.last_error = None
        self.config_version += 1
        return True

    def reload(self, force: bool = False) -> bool:
        """Re-read ``config.toml`` if it changed since the last read (always with ``force``).
        Returns True when new settings are in force."""
        with self._reload_lock:
            self._dirty = False
            self._next_check = time.monotonic() + self.check_interval
            if not force and _signature(self.config_path) == self._sig:
                return False
            changed = self._load()
            if changed:
                log.info("reloaded %s (version %d)", self.config_path, self.config_version)
            return changed

    def effective_settings(self, tool: str, *, server: str | None = None,
                           run: RecordedRun | None = None) -> ToolSettings:
        """What the policy enforces for ``tool`` now (see :func:`resolve_tool_settings`).
        With canary sections the answer depends on the run, so it is not cached."""
        if self._config.experiments.canaries or self._config.experiments.abs:
            return resolve_tool_settings(self._config, tool, server=server, defaults=self.defaults, run=run)
        key = (tool, server)
        hit = self._cache.get(key)
        if hit is None:
            hit = resolve_tool_settings(self._config, tool, server=server, defaults=self.defaults, run=run)
            self._cache[key] = hit
        return hit

    def _settings_for_call(self, tool: str, server: str | None, run: RecordedRun | None) -> ToolSettings:
        """Settings with canary sections in force: the run's arm is recorded first."""
        if run is not None and self._tagged.get(run.id) != self.config_version:
            self._tag_run(run)
        return self.effective_settings(tool, server=server, run=run)

    def _tag_run(self, run: RecordedRun) -> None:
        """Record the run's canary arm in its ``metadata`` (once per run and config)."""
        self._tagged[run.id] = self.config_version
        if len(self._tagged) > 10_000:  # runs end; keep the memo small
            self._tagged = {run.id: self.config_version}
        layers = canary_layers(self._config.experiments, run.id)
        abs_ = ab_layers(self._config.experiments, run.id)
        if not layers and not abs_:
            return
        values: dict[str, Any] = {}
        if layers:
            canary, arm = layers[0]
            values = {"selfheal_arm": arm, "selfheal_improvement": canary.improvement_id}
            if len(layers) > 1:
                values["selfheal_arms"] = {c.improvement_id: a for c, a in layers}
        if abs_:  # A/B experiments: see runtime.experiments (a canary keeps selfheal_arm for itself)
            chosen = {sec.experiment_id: arm.improvement_id if arm else "control" for sec, arm in abs_}
            values["selfheal_ab_arms"] = chosen
            if not layers:
                first = abs_[0][0].experiment_id
                values.update(selfheal_experiment=first, selfheal_arm=chosen[first])
        if all((run.metadata or {}).get(k) == v for k, v in values.items()):
            return
        try:
            run.update_metadata(**values)
        except Exception as exc:  # noqa: BLE001 - the call goes ahead; the arm is then unrecorded
            log.warning("could not record the canary arm of run %s: %s", run.id, exc)

    def breaker_state(self, tool: str) -> str:
        b = self._breakers.get(tool)
        return b.state if b else "closed"

    def close(self) -> None:
        if self._watcher:
            self._watcher.stop()
            self._watcher = None

    def __enter__(self) -> "ToolPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def call(self, tool: str, fn: Callable[..., Any], arguments: Mapping[str, Any] | None = None, *,
             server: str | None = None, run: RecordedRun | None = None) -> Any:
        """Call a synchronous ``fn(**arguments)`` under the tool's settings. A timeout runs
        it in a worker thread that is abandoned (not killed) when it fires."""
        if self._dirty or _monotonic() >= self._next_check:
            self.reload()
        if run is None and self.recorder is not None:
            run = current_run()
        s = self._settings_for_call(tool, server, run) if self._per_run else (
            self._cache.get((tool, server)) or self.effective_settings(tool, server=server, run=run))
        if s.plain and run is None:  # the fast path of every unconfigured tool
            return fn(**arguments) if arguments else fn()
        return self._run_sync(s, fn, dict(arguments) if arguments else {}, run)

    async def acall(self, tool: str, fn: Callable[..., Awaitable[Any]], arguments: Mapping[str, Any] | None = None,
                    *, server: str | None = None, run: RecordedRun | None = None) -> Any:
        """Await ``fn(**arguments)`` under the tool's settings (timeout via ``asyncio.timeout``)."""
        if self._dirty or _monotonic() >= self._next_check:
            self.reload()
        if run is None and self.recorder is not None:
            run = current_run()
        s = self._settings_for_call(tool, server, run) if self._per_run else (
            self._cache.get((tool, server)) or self.effective_settings(tool, server=server, run=run))
        if s.plain and run is None:
            return await (fn(**arguments) if arguments else fn())
        return await self._run_async(s, fn, dict(arguments) if arguments else {}, run)

    def wrap(self, tool: str, fn: Callable[..., Any], *, server: str | None = None) -> Callable[..., Any]:
        """``fn`` with the policy applied, called with keyword arguments (sync or async)."""
        if inspect.iscoroutinefunction(fn):
            async def awrapped(**kwargs: Any) -> Any:
                return await self.acall(tool, fn, kwargs, server=server)
            return awrapped

        def wrapped(**kwargs: Any) -> Any:
            return self.call(tool, fn, kwargs, server=server)
        return wrapped

    # ------------------------------------------------------------ the common steps

    def _elapse(self, real_seconds: float) -> float:
        """Policy seconds for a real duration; moves a simulated clock on by them."""
        seconds = real_seconds / self.time_scale
        advance = getattr(self.clock, "advance", None)
        if advance is not None:
            advance(seconds)
        return seconds

    def _fail_fast(self, s: ToolSettings, run: RecordedRun | None, args: dict, exc: ToolPolicyError) -> None:
        if run is not None:
            run.record_tool_call(s.tool, args, str(exc), 0, True)
        raise exc

    def _gate(self, s: ToolSettings, args: dict, run: RecordedRun | None) -> None:
        """Preflight and breaker checks before an attempt; raises when the call may not go.
        Preflight comes first: a call it rejects never reaches the tool, so it is neither a
        failure nor a half-open trial for the breaker."""
        if "path_exists" in s.preflight:
            missing = self._missing_path(args)
            if missing is not None:
                self._fail_fast(s, run, args, PreflightFailed(
                    s.tool, f"{PREFLIGHT_REFUSAL}path_exists failed for {s.tool}: path not found: {missing}"))
        if s.circuit_breaker is not None:
            breaker = self._breakers.setdefault(s.tool, CircuitBreaker())
            reason = breaker.admit(s.circuit_breaker, self.clock())
            if reason:
                self._fail_fast(s, run, args, CircuitOpen(s.tool, f"{BREAKER_REFUSAL}{s.tool}: {reason}"))

    def _missing_path(self, args: Mapping[str, Any]) -> str | None:
        for key, value in args.items():
            k = key.lower()
            if not isinstance(value, str) or not value:
                continue
            if k in _PATH_KEYS or k.endswith("_path") or k.endswith("_dir"):
                p = Path(value).expanduser()
                if not p.is_absolute() and self.base_dir is not None:
                    p = self.base_dir / p
                if not p.exists():
                    return value
        return None

    def _after(self, s: ToolSettings, run: RecordedRun | None, args: dict, result: Any,
               exc: BaseException | None, real_seconds: float) -> str | None:
        """Record one attempt and feed the breaker; returns the failure label (None on success)."""
        seconds = self._elapse(real_seconds)
        label = None
        if exc is not None:
            message = str(exc) or type(exc).__name__
            label = classify_error(message)
            if run is not None:
                run.tool_complete(s.tool, message, seconds * 1000, True)
        elif run is not None:
            run.tool_complete(s.tool, result, seconds * 1000, False)
        if s.circuit_breaker is not None:
            self._breakers.setdefault(s.tool, CircuitBreaker()).record(s.circuit_breaker, exc is None, self.clock())
        return label

    def _timeout(self, s: ToolSettings) -> ToolTimeout:
        return ToolTimeout(s.tool, f"Tool {s.tool} timed out after {_fmt_seconds(s.timeout_ms or 0)}")

    def _backoff_ms(self, s: ToolSettings, retry: int) -> float:
        return s.retry_backoff_ms * (2 ** (retry - 1))

    # ------------------------------------------------------------ sync

    def _run_sync(self, s: ToolSettings, fn: Callable[..., Any], args: dict, run: RecordedRun | None) -> Any:
        if s.health_check and self.health_check is not None and s.server:
            healthy = self.health_check(s.server)
            if not healthy:
                if s.auto_restart and self.restart_server is not None:
                    self.restart_server(s.server)
                else:
                    self._fail_fast(s, run, args, ServerUnavailable(
                        s.tool, f"MCP server {s.server} failed its health check: process exited or not responding"))
        retries, restarted = 0, False
        while True:
            self._gate(s, args, run)
            if run is not None:
                run.tool_start(s.tool, args)
            t0 = time.perf_counter()
            result, exc = None, None
            try:
                if s.shadow_timeout_ms is not None:
                    result = self._call_shadowed_sync(s, fn, args, run)
                elif s.timeout_ms is None:
                    result = fn(**args)
                else:
                    result = self._call_in_thread(s, fn, args)
            except Exception as e:  # noqa: BLE001 - every tool failure is data for the policy
                exc = e
            label = self._after(s, run, args, result, exc, time.perf_counter() - t0)
            if exc is None:
                return result
            if (label in RESTARTABLE and s.auto_restart and self.restart_server is not None and s.server
                    and not restarted):
                restarted = True
                self.restart_server(s.server)
                continue
            if retries < s.retry_attempts:
                retries += 1
                wait = self._backoff_ms(s, retries) / 1000
                time.sleep(wait * self.time_scale)
                self._elapse(wait * self.time_scale)
                continue
            raise exc

    def _call_in_thread(self, s: ToolSettings, fn: Callable[..., Any], args: dict) -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn(**args)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=target, name=f"tool-{s.tool}", daemon=True)
        worker.start()
        worker.join((s.timeout_ms or 0) / 1000 * self.time_scale)
        if worker.is_alive():
            raise self._timeout(s)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ------------------------------------------------------------ async

    async def _run_async(self, s: ToolSettings, fn: Callable[..., Awaitable[Any]], args: dict,
                         run: RecordedRun | None) -> Any:
        if s.health_check and self.health_check is not None and s.server:
            healthy = await _maybe_await(self.health_check(s.server))
            if not healthy:
                if s.auto_restart and self.restart_server is not None:
                    await _maybe_await(self.restart_server(s.server))
                else:
                    self._fail_fast(s, run, args, ServerUnavailable(
                        s.tool, f"MCP server {s.server} failed its health check: process exited or not responding"))
        retries, restarted = 0, False
        while True:
            self._gate(s, args, run)
            if run is not None:
                run.tool_start(s.tool, args)
            t0 = time.perf_counter()
            result, exc = None, None
            try:
                if s.shadow_timeout_ms is not None:
                    result = await self._call_shadowed_async(s, fn, args, run)
                elif s.timeout_ms is None:
                    result = await fn(**args)
                else:
                    async with asyncio.timeout(s.timeout_ms / 1000 * self.time_scale) as deadline:
                        result = await fn(**args)
            except ToolTimeout as e:
                exc = e
            except TimeoutError as e:
                exc = self._timeout(s) if s.timeout_ms is not None and deadline.expired() else e
            except Exception as e:  # noqa: BLE001 - every tool failure is data for the policy
                exc = e
            label = self._after(s, run, args, result, exc, time.perf_counter() - t0)
            if exc is None:
                return result
            if (label in RESTARTABLE and s.auto_restart and self.restart_server is not None and s.server
                    and not restarted):
                restarted = True
                await _maybe_await(self.restart_server(s.server))
                continue
            if retries < s.retry_attempts:
                retries += 1
                wait = self._backoff_ms(s, retries) / 1000
                await asyncio.sleep(wait * self.time_scale)
                self._elapse(wait * self.time_scale)
                continue
            raise exc

    # ------------------------------------------------------------ shadow observation

    def _observe(self, s: ToolSettings, run: RecordedRun | None, actual_ok: bool, shadow_ok: bool,
                 real_seconds: float | None) -> None:
        """Note what the shadow timeout would have made of one attempt (see :mod:`.experiments`)."""
        if run is None or s.shadow_of is None:
            return
        self._shadow_log.record(run, s.shadow_of, {
            "tool": s.tool, "actual": "success" if actual_ok else "failure",
            "shadow": "success" if shadow_ok else "failure",
            "duration_ms": None if real_seconds is None else int(round(real_seconds / self.time_scale * 1000)),
            "timeout_ms": s.timeout_ms, "shadow_timeout_ms": s.shadow_timeout_ms})

    def _shadow_verdict(self, s: ToolSettings, ok: bool, real_seconds: float, within_limit: bool = False) -> bool:
        """Would an attempt that ended (``ok``) after ``real_seconds`` succeed under the shadow limit?

        ``within_limit``: it ended before the enforced limit's deadline. Then a shadow limit
        at least as long lets it through too, however late this thread got to measure it (on
        a busy machine the measured time can pass the limit after the call has finished)."""
        if ok and within_limit and s.timeout_ms is not None and (s.shadow_timeout_ms or 0) >= s.timeout_ms:
            return True
        return ok and real_seconds <= (s.shadow_timeout_ms or 0) / 1000 * self.time_scale

    def _call_shadowed_sync(self, s: ToolSettings, fn: Callable[..., Any], args: dict,
                            run: RecordedRun | None) -> Any:
        """The call under its real settings; a timed-out call is watched on up to the shadow
        limit in another thread, its result discarded."""
        box: dict[str, Any] = {}
        done = threading.Event()
        t0 = time.perf_counter()

        def target() -> None:
            try:
                box["result"] = fn(**args)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
                box["error"] = e
            box["seconds"] = time.perf_counter() - t0
            done.set()

        threading.Thread(target=target, name=f"tool-{s.tool}", daemon=True).start()
        limit = s.timeout_ms
        if done.wait(None if limit is None else limit / 1000 * self.time_scale):
            ok = "error" not in box
            self._observe(s, run, ok, self._shadow_verdict(s, ok, box["seconds"], within_limit=True), box["seconds"])
            if not ok:
                raise box["error"]
            return box.get("result")
        extra = (s.shadow_timeout_ms or 0) - (limit or 0)
        if extra > 0:
            def watch() -> None:
                finished = done.wait(extra / 1000 * self.time_scale)
                ok = finished and "error" not in box
                self._observe(s, run, False, ok and self._shadow_verdict(s, True, box["seconds"]),
                              box.get("seconds"))
                self._observers.discard(threading.current_thread())

            watcher = threading.Thread(target=watch, name=f"shadow-{s.tool}", daemon=True)
            self._observers.add(watcher)
            watcher.start()
        else:
            self._observe(s, run, False, False, None)
        raise self._timeout(s)

    async def _call_shadowed_async(self, s: ToolSettings, fn: Callable[..., Awaitable[Any]], args: dict,
                                   run: RecordedRun | None) -> Any:
        t0 = time.perf_counter()
        task = asyncio.ensure_future(fn(**args))
        limit = s.timeout_ms
        try:
            done, _ = await asyncio.wait({task}, timeout=None if limit is None else limit / 1000 * self.time_scale)
        except BaseException:
            task.cancel()
            raise
        if done:
            seconds = time.perf_counter() - t0
            error = task.exception()
            ok = error is None
            self._observe(s, run, ok, self._shadow_verdict(s, ok, seconds, within_limit=True), seconds)
            if error is not None:
                raise error
            return task.result()
        extra = (s.shadow_timeout_ms or 0) - (limit or 0)
        if extra > 0:
            async def watch() -> None:
                finished, _ = await asyncio.wait({task}, timeout=extra / 1000 * self.time_scale)
                seconds = time.perf_counter() - t0
                if not finished:
                    task.cancel()
                ok = bool(finished) and not task.cancelled() and task.exception() is None
                self._observe(s, run, False, ok and self._shadow_verdict(s, True, seconds),
                              seconds if finished else None)

            observer = asyncio.ensure_future(watch())
            self._observers.add(observer)
            observer.add_done_callback(self._observers.discard)
        else:
            task.cancel()
            self._observe(s, run, False, False, None)
        raise self._timeout(s)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for shadow observations still running in threads (sync calls)."""
        for t in [o for o in list(self._observers) if isinstance(o, threading.Thread)]:
            t.join(timeout)

    async def adrain(self) -> None:
        """Wait for shadow observations still running as tasks (async calls); call it
        before closing the tool sessions they are waiting on."""
        tasks = [o for o in list(self._observers) if isinstance(o, asyncio.Future)]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.drain()
