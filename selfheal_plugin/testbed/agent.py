"""A scripted agent that runs workflows of real MCP tool calls through ``ToolPolicy``,
recorded with ``RunRecorder`` — the closed loop's runtime.

``run_workload(home, runs=200, seed=1)`` starts the three testbed servers
(:mod:`.servers`) as subprocesses over stdio, one MCP client session each, and runs
``runs`` workflows spread over ``days`` of simulated time. Every tool call is a real MCP
request; the policy reads ``home/config.toml`` (so a fix selfheal applies is in force for
the next call) and the recorder writes ``home/conversations.db`` in the runtime's format.

Time: the workload's clock is a :class:`SimulatedClock`. The policy's ``time_scale``
(real seconds per simulated second) is also the servers' sleep scale, so a search whose
simulated latency exceeds the simulated timeout really times out; durations are recorded in
simulated milliseconds. With the defaults a week of 200 runs takes 10–15 seconds on 2 cores.
Servers start through a fork server (:mod:`.forkserver`), so a restart costs milliseconds.

Crashes: the ``flaky`` server exits mid-call. Calls then fail with "MCP server flaky
process exited unexpectedly"; with ``[servers."flaky"] auto_restart = true`` the policy's
restart hook starts a new server process and retries the call once, otherwise the dead
server is restarted only when the next run begins (a new runtime session).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from selfheal_plugin.history.clock import SimulatedClock, runtime_timestamp
from selfheal_plugin.runtime.policy import ToolPolicy
from selfheal_plugin.runtime.recorder import RecordedRun, RunRecorder
from selfheal_plugin.testbed.servers import DRAW_META
import selfheal_plugin.testbed.forkserver as forkserver  # the module, not the package (whose lazy names are ours)

log = logging.getLogger("selfheal.testbed")

SERVER_TOOLS = {"search": "web_search", "files": "list_dir", "flaky": "query_status"}
TREE = {
    "src": ("api", "core", "cli", "plugins"),
    "docs": ("guide", "reference"),
    "tests": ("unit", "integration"),
    "logs": ("2026-11", "2026-10"),
    "data": ("raw", "processed"),
}
# Paths an agent plausibly asks for that the tree does not have.
MISSING = ("src/legacy", "docs/archive", "reports/q3", "logs/2025-12", "data/exports", "build/output",
           "tests/e2e", "src/core/generated")
QUERIES = ("kubernetes pod eviction", "sqlite busy timeout", "python asyncio cancel", "mcp stdio transport",
           "git revert conflict", "lognormal latency model", "circuit breaker pattern", "toml comment keep")
SERVICES = ("billing", "auth", "search-index", "scheduler", "gateway")

# workflow → the (server, argument maker) of each step
WORKFLOWS: dict[str, tuple[str, ...]] = {
    "researcher": ("search", "files"),
    "planner": ("files", "files", "search"),
    "ops": ("flaky", "flaky", "files"),
}


def tool_name(server: str) -> str:
    """The runtime's name for a server's tool: ``mcp__search__web_search``."""
    return f"mcp__{server}__{SERVER_TOOLS[server]}"


@dataclass
class TestbedConfig:
    """Knobs of the testbed. Latencies and timeouts are simulated milliseconds."""
    time_scale: float = 0.004  # real seconds per simulated second
    search_median_ms: float = 12_000.0
    search_sigma: float = 0.5
    default_timeout_ms: int = 20_000  # the runtime's own timeout for every tool (config overrides)
    missing_path_rate: float = 0.25
    crash_probability: float = 0.08
    flaky_work_ms: float = 300.0
    workflow_weights: dict[str, float] = field(
        default_factory=lambda: {"researcher": 0.4, "planner": 0.35, "ops": 0.25})
    model: str = "qwen3:14b"
    think_ms: tuple[float, float] = (200.0, 2_000.0)  # simulated model time between steps
    fork_server: bool = True  # start servers by forking a process that has the SDK imported (POSIX)

    __test__ = False  # not a pytest class

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        unknown = set(self.workflow_weights) - set(WORKFLOWS)
        if unknown:
            raise ValueError(f"unknown workflows {sorted(unknown)} (known: {', '.join(WORKFLOWS)})")


@dataclass
class WorkloadSummary:
    runs: int
    completed: int
    failed: int
    success_rate: float
    started_at: str  # simulated, RFC 3339
    ended_at: str
    real_seconds: float
    calls: dict[str, int]  # tool → attempts
    errors: dict[str, int]  # pattern id (error_type:tool) → failed attempts
    error_rates: dict[str, float]  # pattern id → failed attempts / that tool's attempts
    server_starts: dict[str, int]
    crashes: int
    run_ids: list[str] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tree(root: Path) -> Path:
    """The real directory tree ``list_dir`` serves (idempotent)."""
    for top, subs in TREE.items():
        for sub in subs:
            d = root / top / sub
            d.mkdir(parents=True, exist_ok=True)
            for k in range(3):
                f = d / f"file{k}.txt"
                if not f.exists():
                    f.write_text(f"{top}/{sub}/file{k}\n")
    return root


@dataclass
class _Session:
    client: Any
    task: asyncio.Task
    stop: asyncio.Event
    ended: bool = False


class ServerConnection:
    """One testbed server process and its MCP client session.

    Each session is owned by its own task (anyio contexts must be entered and left in one
    task); calls are made from the agent's task on the shared session. With a fork server
    (``launcher``) a start takes milliseconds instead of a second of SDK imports.
    """

    def __init__(self, name: str, args: list[str], log_path: Path, seed: int | str = 0,
                 launcher: list[str] | None = None) -> None:
        self.name = name
        self.launcher = launcher
        self.args = args
        self.seed = str(seed)
        self.log_path = log_path
        self.starts = 0
        self.crashes = 0
        self._session: _Session | None = None
        self._generation = 0

    @property
    def client(self) -> Any:
        return self._session.client if self._session and not self._session.ended else None

    @property
    def alive(self) -> bool:
        return self.client is not None

    async def _spawn(self) -> _Session:
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        generation = self._generation
        self._generation += 1
        server_args = [self.name, *self.args, "--seed", f"{self.seed}-{generation}"]
        head = self.launcher or ["-m", "selfheal_plugin.testbed.servers"]
        params = StdioServerParameters(command=sys.executable, args=[*head, *server_args])
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        holder: dict[str, _Session] = {}

        async def own() -> None:
            errlog = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
            try:
                async with Client(stdio_client(params, errlog=errlog), cache=None) as client:
                    # A first probe, as a runtime does on connect; it also warms the
                    # server's call path (its first tools/call costs ~50 ms more), so no
                    # recorded call pays for the start.
                    await client.call_tool("health", {})
                    ready.set_result(client)
                    await stop.wait()
            except Exception as exc:  # noqa: BLE001 - reported through `ready` or the log
                if not ready.done():
                    ready.set_exception(RuntimeError(
                        f"testbed MCP server {self.name} did not start (see {self.log_path})"))
                else:
                    log.debug("server %s session ended: %s", self.name, exc)
            finally:
                if "s" in holder:
                    holder["s"].ended = True
                errlog.close()

        task = asyncio.create_task(own(), name=f"mcp-{self.name}-{generation}")
        try:
            client = await ready
        except asyncio.CancelledError:  # the workload was cancelled while this server started
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the SDK's shutdown has reaped the process
                pass
            raise
        holder["s"] = _Session(client, task, stop)
        return holder["s"]

    @staticmethod
    async def _close(session: _Session | None) -> None:
        if session is None:
            return
        session.stop.set()
        try:
            await asyncio.wait_for(session.task, 10)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
            log.debug("stopping a testbed server: %s", exc)
        session.ended = True

    async def start(self) -> None:
        self._session = await self._spawn()
        self.starts += 1

    async def stop(self) -> None:
        await self._close(self._session)
        self._session = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def healthy(self) -> bool:
        if not self.alive or self.client is None:
            return False
        try:
            result = await asyncio.wait_for(self.client.call_tool("health", {}), 5)
            return not result.is_error
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return False

    async def call(self, tool: str, *, draw: str | None = None, **arguments: Any) -> str:
        """One real ``tools/call``; a tool error or a closed connection raises with the
        message a runtime would show. ``draw``: the key of the call's own draws on the server
        (:data:`~selfheal_plugin.testbed.servers.DRAW_META`)."""
        from mcp import MCPError

        if not self.alive or self.client is None:
            raise ConnectionError(f"MCP server {self.name} is not running: its process exited earlier")
        try:
            result = await self.client.call_tool(tool, arguments, meta={DRAW_META: draw} if draw else None)
        except MCPError as exc:
            if "connection closed" in str(exc).lower():
                if self._session is not None:
                    self._session.ended = True
                self.crashes += 1
                raise ConnectionError(f"MCP server {self.name} process exited unexpectedly during {tool} "
                                      f"(connection closed)") from None
            raise RuntimeError(f"MCP error from {self.name}: {exc}") from None
        text = "\n".join(getattr(c, "text", "") for c in result.content)
        if result.is_error:
            raise RuntimeError(text or f"{tool} failed")
        return text


class ScriptedAgent:
    """Runs one workflow at a time through the policy, recorded by the recorder."""

    def __init__(self, home: Path, recorder: RunRecorder, clock: SimulatedClock, config: TestbedConfig,
                 tree: Path, seed: int) -> None:
        self.home = home
        self.recorder = recorder
        self.clock = clock
        self.config = config
        self.tree = tree
        self.seed = seed
        logs = home / "testbed" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        scale = ["--time-scale", repr(config.time_scale)]
        self.servers = {
            "search": ServerConnection("search", [*scale, "--median-ms", repr(config.search_median_ms),
                                                  "--sigma", repr(config.search_sigma)], logs / "search.log", seed),
            "files": ServerConnection("files", [*scale, "--root", str(tree)], logs / "files.log", seed),
            "flaky": ServerConnection("flaky", [*scale, "--crash-probability", repr(config.crash_probability),
                                                "--work-ms", repr(config.flaky_work_ms)], logs / "flaky.log", seed),
        }
        self.policy = ToolPolicy(home / "config.toml", recorder=recorder, clock=clock, time_scale=config.time_scale,
                                 defaults={"timeout_ms": config.default_timeout_ms},
                                 restart_server=self._restart, health_check=self._healthy)

    async def _restart(self, server: str) -> None:
        log.info("restarting MCP server %s", server)
        await self.servers[server].restart()

    async def _healthy(self, server: str) -> bool:
        return await self.servers[server].healthy()

    @property
    def needed(self) -> list[ServerConnection]:
        """The servers the configured workflows call."""
        names = {s for w, weight in self.config.workflow_weights.items() if weight > 0 for s in WORKFLOWS[w]}
        return [conn for name, conn in self.servers.items() if name in names]

    async def start(self) -> None:
        # Each session lives in its own task, so the processes can start side by side.
        if self.config.fork_server and forkserver.available():
            launcher = forkserver.shared().launcher()
            for conn in self.servers.values():
                conn.launcher = launcher
        await asyncio.gather(*(conn.start() for conn in self.needed))

    async def close(self) -> None:
        await self.policy.adrain()  # shadow observations still waiting on a server
        await asyncio.gather(*(conn.stop() for conn in self.servers.values()))
        self.policy.close()

    def _arguments(self, server: str, rng: random.Random) -> dict[str, Any]:
        if server == "search":
            return {"query": rng.choice(QUERIES), "limit": rng.randint(3, 8)}
        if server == "files":
            if rng.random() < self.config.missing_path_rate:
                rel = rng.choice(MISSING)
            else:
                top = rng.choice(list(TREE))
                rel = f"{top}/{rng.choice(TREE[top])}"
            return {"path": str(self.tree / rel)}
        return {"service": rng.choice(SERVICES)}

    async def run_one(self, workflow: str, index: int) -> RecordedRun:
        down = [conn.restart() for conn in self.needed if not conn.alive]
        if down:  # a new runtime session starts the servers that are down
            await asyncio.gather(*down)
        steps = WORKFLOWS[workflow]
        # Each run draws from its own stream, and so does each call on its server (keyed by
        # run, step and attempt). A call that a busy machine makes time out ends its run early,
        # so fewer draws are taken and later servers are not asked: with one stream for the
        # week, every later run's arguments and latencies, and so the week's course, depended
        # on the machine's load.
        rng = random.Random(f"agent:{self.seed}:{index}")
        task = f"{workflow} task #{index}"
        with self.recorder.run(workflow, task, metadata={"source": "testbed"},
                               context={"cwd": str(self.tree)}) as run:
            for step, server in enumerate(steps):
                with run.step(step):
                    run.iteration()
                    run.thinking(f"Step {step}: calling {tool_name(server)}")
                    conn = self.servers[server]
                    args = self._arguments(server, rng)
                    try:
                        text = await self.policy.acall(tool_name(server), self._caller(conn, f"{index}:{step}"), args)
                    except Exception as exc:  # noqa: BLE001 - a failed call fails the run
                        run.fail(f"Workflow failed at step {step}: {exc}")
                        break
                    for word in text.split()[:3]:
                        run.token(word + " ")
                    run.add_tokens(rng.randint(200, 1500), rng.randint(50, 400))
                self.clock.advance(rng.uniform(*self.config.think_ms) / 1000)
            if run.error_message is None:
                run.response_complete(f"{workflow} done")
        return run

    @staticmethod
    def _caller(conn: ServerConnection, key: str):
        attempts = itertools.count()  # a retry (the policy's, or after a restart) draws anew

        async def call(**arguments: Any) -> str:
            return await conn.call(SERVER_TOOLS[conn.name], draw=f"{key}:{next(attempts)}", **arguments)
        return call


def _choose(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


async def arun_workload(home: str | Path, runs: int = 100, seed: int = 0, *, clock: SimulatedClock | None = None,
                        start: datetime | None = None, days: float = 7.0, config: TestbedConfig | None = None,
                        db_path: str | Path | None = None) -> WorkloadSummary:
    """The async form of :func:`run_workload` (for callers already inside an event loop)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    if days <= 0:
        raise ValueError("days must be > 0")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config = config or TestbedConfig()
    if clock is None:
        clock = SimulatedClock(start or datetime.now(timezone.utc) - timedelta(days=days))
    elif start is not None:
        clock.set(start)
    begin = clock()
    tree = build_tree(home / "testbed" / "tree")
    recorder = RunRecorder(Path(db_path) if db_path else home / "conversations.db", clock=clock, model=config.model)
    agent = ScriptedAgent(home, recorder, clock, config, tree, seed)
    rng = random.Random(f"schedule:{seed}")
    t0 = time.perf_counter()
    finished: list[RecordedRun] = []
    try:
        await agent.start()
        span = days * 86400 / runs
        for i in range(runs):
            clock.set(begin + timedelta(seconds=(i + rng.random()) * span))
            finished.append(await agent.run_one(_choose(rng, config.workflow_weights), i))
    finally:
        await agent.close()
        recorder.close()
    return _summarise(finished, begin, clock(), time.perf_counter() - t0, agent)


def run_workload(home: str | Path, runs: int = 100, seed: int = 0, *, clock: SimulatedClock | None = None,
                 start: datetime | None = None, days: float = 7.0, config: TestbedConfig | None = None,
                 db_path: str | Path | None = None) -> WorkloadSummary:
    """Run ``runs`` scripted workflows against the real testbed servers.

    :param home: BINKS_HOME: ``config.toml`` is read (and reloaded) from here, the history
        goes to ``conversations.db`` (or ``db_path``), the tree and server logs to ``testbed/``.
    :param seed: seeds workflow choice, arguments, latencies and crashes (each run's
        arguments, and each call's draws on its server, from a stream of their own, so a
        call that times out on a busy machine changes that run only). Use a different seed
        for a second workload on the same home, or the servers replay the same draws.
    :param clock: the simulated clock (shared with a caller that keeps time across
        workloads); default starts ``days`` before now, or at ``start``.
    :param days: runs are spread evenly (with jitter) over this many simulated days.
    """
    return asyncio.run(arun_workload(home, runs, seed, clock=clock, start=start, days=days, config=config,
                                     db_path=db_path))


def _summarise(runs: list[RecordedRun], begin: datetime, end: datetime, real: float,
               agent: ScriptedAgent) -> WorkloadSummary:
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for run in runs:
        for c in run.calls:
            calls[c.name] += 1
            if c.is_error:
                errors[f"{c.error_type or 'Unknown'}:{c.name}"] += 1
    completed = sum(1 for r in runs if r.status == "completed")
    failed = sum(1 for r in runs if r.status == "failed")
    rates = {pid: round(n / calls[pid.split(":", 1)[1]], 4) for pid, n in errors.items()}
    return WorkloadSummary(
        runs=len(runs), completed=completed, failed=failed,
        success_rate=round(completed / len(runs), 4) if runs else math.nan,
        started_at=runtime_timestamp(begin), ended_at=runtime_timestamp(end), real_seconds=round(real, 2),
        calls=dict(sorted(calls.items())), errors=dict(errors.most_common()), error_rates=rates,
        server_starts={n: c.starts for n, c in agent.servers.items()},
        crashes=sum(c.crashes for c in agent.servers.values()),
        run_ids=[r.id for r in runs],
    )
