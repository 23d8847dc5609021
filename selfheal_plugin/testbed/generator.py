"""A synthetic run history in the runtime's exact format, with known ground truth.

Used by tests, benchmarks and anyone trying the tool: ``python -m selfheal_plugin.testbed.generator
OUT.db --runs 500``. Injected failure patterns have a known size; noise errors are spread
over other (type, tool) signatures with unrelated messages; a few malformed rows, absent
``error_type`` values, both spellings of each type and non-UTC offsets are mixed in. The
same seed gives the same file, byte for byte apart from SQLite's page layout, and the
ground truth is written beside it as ``OUT.db.truth.json``.

``--append --from INSTANT`` extends an existing history instead: runs between INSTANT
(``applied``: the newest applied improvement's ``applied_at``; ``-2h``; an ISO instant) and ``--until`` (default now),
each run ended by then (squeezed into the window when it is shorter than a run), with the injected patterns scaled to the number of
runs and the effect of the config in force modelled (:func:`fixed_by_config`), so a user
working by hand can apply a fix, add the runs that followed it, and see ``verify`` judge it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import sqlite3
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import SELFHEAL_TABLES, connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.times import parse_since, parse_timestamp

WORKFLOWS = ("planner", "coder", "researcher", "k8s-ops")
TOOLS: dict[str, tuple[tuple[str, ...], float]] = {
    # name: (argument keys, median duration ms)
    "read_file": (("path",), 40.0),
    "write_file": (("path", "content"), 60.0),
    "list_dir": (("path", "recursive"), 30.0),
    "execute_command": (("command", "cwd"), 900.0),
    "mcp__kubernetes__pods_list": (("namespace", "label_selector"), 20000.0),
    "mcp__search__web_search": (("query", "limit"), 1500.0),
    "mcp__github__create_issue": (("repo", "title", "body"), 700.0),
    "grep": (("pattern", "path"), 120.0),
}
NOISE_TYPES = ("tool_error", "timeout", "transport_error", "server_crashed", "permission_denied")
VOCAB = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basalt cobalt dune ember "
         "fjord garnet harbor iris jasper kelp lagoon marble nectar onyx pebble quartz ridge slate tundra "
         "umber violet willow yarrow zephyr").split()


@dataclass
class InjectedPattern:
    error_type: str  # canonical type; the file gets every spelling in `spellings`
    tool_name: str
    occurrences: int
    templates: tuple[str, ...]  # "{n}", "{path}" and "{id}" are filled per occurrence
    workflows: tuple[str, ...]
    step_index: int = 1
    spellings: tuple[Any, ...] = ()  # raw error_type values; None means absent
    duration_ms: int | None = None
    fail_run: float = 0.7  # chance that the run fails because of this error

    @property
    def id(self) -> str:
        return f"{self.error_type}:{self.tool_name}"


DEFAULT_PATTERNS: tuple[InjectedPattern, ...] = (
    InjectedPattern("timeout", "mcp__kubernetes__pods_list", 24,
                    ("Tool mcp__kubernetes__pods_list timed out after {n}s",),
                    ("k8s-ops",), 1, ("timeout", "Timeout"), 60003),
    InjectedPattern("tool_error", "list_dir", 15,
                    ("Path not found: {path}", "Directory {path} does not exist"),
                    ("planner", "coder"), 0, ("tool_error", "ToolError")),
    InjectedPattern("connection_refused", "mcp__github__create_issue", 10,
                    ("Failed to connect to MCP server github: connection refused (os error {n})",),
                    ("planner",), 2, ("connection_refused", "ConnectionRefused")),
    InjectedPattern("Unknown", "execute_command", 8,
                    ("Command exited with status {n}: command not found",),
                    ("coder",), 1, (None, "Unknown", "null")),
    InjectedPattern("server_crashed", "mcp__search__web_search", 6,
                    ("MCP server process exited unexpectedly (code {n})",),
                    ("researcher",), 0, ("server_crashed", "ServerCrashed")),
)


@dataclass
class GeneratorConfig:
    seed: int = 0
    runs: int = 400
    days: float = 7.0
    end: datetime | None = None
    patterns: tuple[InjectedPattern, ...] = DEFAULT_PATTERNS
    noise_rate: float = 0.01
    bad_rows: int = 6
    steps: int = 3
    tokens_per_step: int = 3
    running_runs: int = 2
    metrics_missing: float = 0.1
    # Let noise errors fall on the injected signatures too (they then count in the truth's
    # occurrences); off by default so the default histories stay as they are.
    noise_on_patterns: bool = False
    # Extra chance that a finished run fails (no tool error, a failed step), ramping linearly
    # from the first value at the history's start to the second at its end; None: off.
    failure_ramp: tuple[float, float] | None = None
    # More tools than the built-in eight (``mcp__svcK__call``), each called like the others.
    extra_tools: int = 0
    # Noise errors with one message template per signature (a real recurring failure each)
    # instead of unrelated words.
    recurring_noise: bool = False
    # Append to an existing file instead of replacing it; runs start at or after ``start``.
    append: bool = False
    start: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


PROFILES = ("default", "failure-heavy")


def profile_config(profile: str = "default", **overrides: Any) -> GeneratorConfig:
    """A named shape of history. ``failure-heavy``: 10 % of tool calls fail, spread over
    40 tools x 5 error types (200 recurring signatures, each with its own message template)
    on top of the injected patterns."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use {', '.join(PROFILES)}")
    cfg = GeneratorConfig()
    if profile == "failure-heavy":
        cfg.noise_rate, cfg.extra_tools, cfg.noise_on_patterns, cfg.recurring_noise = 0.10, 32, True, True
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# The default patterns' sizes are for this many runs; appended runs scale them.
BASE_RUNS = 400


def _tool_table(config: dict[str, Any], tool: str) -> dict[str, Any]:
    table = (config.get("tools") or {}).get(tool)
    return table if isinstance(table, dict) else {}


def _server_table(config: dict[str, Any], tool: str) -> dict[str, Any]:
    parts = tool.split("__")
    if len(parts) < 3 or parts[0] != "mcp":
        return {}
    table = (config.get("servers") or {}).get(parts[1])
    return table if isinstance(table, dict) else {}


def fixed_by_config(pattern: InjectedPattern, config: dict[str, Any]) -> bool:
    """Whether the config in force fixes ``pattern``'s failures: a timeout pattern when
    ``tools."T".timeout_ms`` is above the duration its calls ran for; any other pattern when
    the config sets anything for its tool (``[tools."T"]``) or its MCP server (``[servers."S"]``)."""
    tool = _tool_table(config, pattern.tool_name)
    if pattern.error_type == "timeout":
        limit = tool.get("timeout_ms")
        return isinstance(limit, (int, float)) and limit > (pattern.duration_ms or 0)
    return bool(tool) or bool(_server_table(config, pattern.tool_name))


def scaled_patterns(patterns: tuple[InjectedPattern, ...], runs: int, config: dict[str, Any] | None,
                    residual: float) -> tuple[tuple[InjectedPattern, ...], list[str]]:
    """The patterns for ``runs`` appended runs (their sizes are per :data:`BASE_RUNS` runs),
    those the config fixes cut to ``residual`` of their rate; returns them and the fixed ids."""
    out, fixed = [], []
    for pat in patterns:
        rate = runs / BASE_RUNS
        if config is not None and fixed_by_config(pat, config):
            rate *= residual
            fixed.append(pat.id)
        out.append(dataclasses.replace(pat, occurrences=int(round(pat.occurrences * rate))))
    return tuple(out), fixed


def _stamp(rng: random.Random, dt: datetime, not_before: datetime | None = None) -> str:
    """An RFC 3339 string for ``dt`` in one of the shapes the runtime writes. A shape with
    fewer fractional digits cuts ``dt`` down; where that would fall before ``not_before``
    (an appended run just after an apply), the fraction is written whole instead."""
    offset = rng.choice((timedelta(0), timedelta(0), timedelta(0), timedelta(hours=2), timedelta(hours=-5)))
    local = dt.astimezone(timezone(offset))
    digits = rng.choice((0, 3, 6, 9, 9))
    if not_before is not None and digits < 6:
        unit = 10 ** (6 - digits)
        if dt.replace(microsecond=dt.microsecond // unit * unit) < not_before:
            digits = 6
    base = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        frac = f"{local.microsecond:06d}{rng.randrange(1000):03d}"[:digits]
        base += "." + frac
    if offset == timedelta(0) and rng.random() < 0.5:
        return base + "Z"
    return base + local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]


Event = tuple[int, str, dict[str, Any], datetime]


def _end_by(first: datetime, last: datetime, evs: list[Event], start: datetime,
            end: datetime) -> tuple[datetime, datetime, list[Event]]:
    """A run's start, end and events moved earlier so that it ends at ``end``; a run longer
    than the window ``[start, end]`` (an append seconds after an apply) is squeezed into it
    instead, its events in order (the calls' ``duration`` fields keep what they measured)."""
    if last - first <= end - start:
        shift = last - end
        return first - shift, end, [(step, kind, data, when - shift) for step, kind, data, when in evs]
    scale = (end - start) / (last - first)
    return start, end, [(step, kind, data, start + (when - first) * scale) for step, kind, data, when in evs]


def _fill(rng: random.Random, template: str) -> str:
    return template.format(
        n=rng.choice((30, 60, 111, 127, 2, 1)),
        path=f"/home/dev/project/{rng.choice(VOCAB)}/{rng.choice(VOCAB)}",
        id=str(uuid.UUID(int=rng.getrandbits(128))),
    )


def generate_history(path: str | Path, config: GeneratorConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Write a history to ``path`` (replacing it) and return the ground truth."""
    cfg = config or GeneratorConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    end = (cfg.end or datetime.now(timezone.utc)).astimezone(timezone.utc)
    path = Path(path)
    if cfg.append:
        if cfg.start is None:
            raise ValueError("appending needs a start instant")
        # Just after the start, not a second later (an apply a moment ago leaves a window of
        # under a second): on a whole millisecond at least 1 ms past it, as SQLite's
        # julianday(), which verification compares instants with, rounds them to the
        # millisecond; and no timestamp is written cut to before it (_stamp's not_before).
        at = cfg.start.astimezone(timezone.utc)
        start = at.replace(microsecond=at.microsecond // 1000 * 1000) + timedelta(milliseconds=2)
        if start >= end:
            raise ValueError(f"nothing to add: the start {start.isoformat()} is not before the end {end.isoformat()}")
        cfg.days = (end - start).total_seconds() / 86400
        # Another seed per start, so appended run ids never repeat the file's own.
        rng = random.Random(f"{cfg.seed}:{start.isoformat()}")
        conn = connect(path)
    else:
        rng = random.Random(cfg.seed)
        start = end - timedelta(days=cfg.days)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        conn = connect(path, create=True)
    span = cfg.days * 86400
    # Runs start early enough to finish in the window (an hour's margin, or half a short window).
    latest_start = span - 3600 if span > 7200 else span / 2

    # Decide which runs carry which injected occurrence (a run may carry several).
    run_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(cfg.runs)]
    run_starts = sorted(start + timedelta(seconds=rng.uniform(0, latest_start)) for _ in run_ids)
    workflows = [rng.choice(WORKFLOWS) for _ in run_ids]
    injected: dict[int, list[InjectedPattern]] = {}
    truth_patterns = []
    for pat in cfg.patterns:
        eligible = [i for i, w in enumerate(workflows) if w in pat.workflows and i >= cfg.running_runs]
        if not eligible and pat.occurrences:
            raise ValueError(f"no run of workflows {pat.workflows} to carry {pat.id}")
        chosen = [rng.choice(eligible) for _ in range(pat.occurrences)]
        for i in chosen:
            injected.setdefault(i, []).append(pat)
        truth_patterns.append({"id": pat.id, "error_type": pat.error_type, "tool_name": pat.tool_name,
                               "occurrences": pat.occurrences,
                               "affected_runs": sorted({run_ids[i] for i in chosen})})
    tools = dict(TOOLS)
    for k in range(cfg.extra_tools):
        tools[f"mcp__svc{k}__call"] = (("target", "payload"), 200.0 + 50 * (k % 7))
    tool_names = list(tools)
    injected_sigs = {(p.error_type, p.tool_name) for p in cfg.patterns}
    # A tool that times out at a limit never succeeds after it: successes stay below it.
    limits = {p.tool_name: p.duration_ms for p in cfg.patterns if p.error_type == "timeout" and p.duration_ms}
    noise_sigs = [(t, tool) for t in NOISE_TYPES for tool in tools
                  if cfg.noise_on_patterns or (t, tool) not in injected_sigs]
    sigs_by_tool: dict[str, list[tuple[str, str]]] = {}
    for sig in noise_sigs:
        sigs_by_tool.setdefault(sig[1], []).append(sig)
    noise_on_patterns: dict[str, list[str]] = {}

    runs_rows, events, metrics_rows = [], [], []
    noise_errors = 0
    stamp = functools.partial(_stamp, not_before=start if cfg.append else None)
    pattern_spelling_idx: dict[str, int] = {}
    for i, run_id in enumerate(run_ids):
        wf = workflows[i]
        t = run_starts[i]
        running = i < cfg.running_runs  # the earliest runs never finished (crashed runtime)
        carried = list(injected.get(i, []))
        run_failed = False
        calls = ok_calls = 0
        tools_used: dict[str, int] = {}
        step_durations = []
        evs: list[Event] = []
        evs.append((0, "processing_start", {"type": "processing_start"}, t))
        iterations = 0
        for step in range(cfg.steps):
            step_t0 = t
            evs.append((step, "step_started", {"type": "step_started", "step_index": step}, t))
            step_ok = True
            planned = [rng.choice(tool_names) for _ in range(rng.randint(1, 3))]
            here = [p for p in carried if p.step_index == step]
            for p in here:
                carried.remove(p)
            calls_this_step = [(tool, None) for tool in planned] + [(p.tool_name, p) for p in here]
            rng.shuffle(calls_this_step)
            for tool, pat in calls_this_step:
                iterations += 1
                t += timedelta(milliseconds=rng.randint(50, 400))
                evs.append((step, "iteration", {"type": "iteration", "iteration": iterations}, t))
                evs.append((step, "thinking", {"type": "thinking", "content": f"Calling {tool}"}, t))
                keys, median = tools[tool]
                args = {k: f"{rng.choice(VOCAB)}" for k in keys}
                evs.append((step, "tool_start", {"type": "tool_start", "name": tool, "arguments": args}, t))
                complete: dict[str, Any] = {"type": "tool_complete", "name": tool}
                if pat is not None:
                    template = rng.choice(pat.templates)
                    message = _fill(rng, template)
                    duration = pat.duration_ms or int(rng.lognormvariate(5, 0.5))
                    k = pattern_spelling_idx.get(pat.id, 0)
                    pattern_spelling_idx[pat.id] = k + 1
                    spelling = pat.spellings[k % len(pat.spellings)] if pat.spellings else pat.error_type
                    complete.update({"result": message, "duration": duration, "is_error": True})
                    if spelling is not None:
                        complete["error_type"] = None if spelling == "null" else spelling
                    if rng.random() < pat.fail_run:
                        run_failed = True
                    step_ok = False
                elif rng.random() < cfg.noise_rate:
                    etype, ntool = rng.choice(sigs_by_tool.get(tool) or noise_sigs)
                    if cfg.recurring_noise:
                        message = _fill(rng, f"{etype} in {tool}: request {{n}} failed for {{path}}")
                    else:
                        message = " ".join(rng.sample(VOCAB, 4)) + " failed"
                    duration = int(rng.lognormvariate(6, 1))
                    complete.update({"result": message, "duration": duration, "is_error": True,
                                     "error_type": rng.choice((etype, _camel(etype)))})
                    noise_errors += 1
                    if (etype, tool) in injected_sigs:
                        noise_on_patterns.setdefault(f"{etype}:{tool}", []).append(run_id)
                else:
                    duration = max(1, int(rng.lognormvariate(0, 0.5) * median))
                    if tool in limits:
                        duration = min(duration, limits[tool] - 1)
                    complete.update({"result": f"ok: {rng.randint(1, 500)} items", "duration": duration,
                                     "is_error": False})
                    ok_calls += 1
                calls += 1
                tools_used[tool] = tools_used.get(tool, 0) + 1
                t += timedelta(milliseconds=duration)
                evs.append((step, "tool_complete", complete, t))
                for _ in range(cfg.tokens_per_step):
                    t += timedelta(milliseconds=rng.randint(5, 40))
                    evs.append((step, "token", {"type": "token", "content": rng.choice(VOCAB) + " "}, t))
            t += timedelta(milliseconds=rng.randint(10, 100))
            step_ms = int((t - step_t0).total_seconds() * 1000)
            step_durations.append(step_ms)
            evs.append((step, "step_completed", {"type": "step_completed", "step_index": step,
                                                 "success": step_ok, "duration_ms": step_ms}, t))
            if running and step == 0:
                break
        if t > end:  # a run ends by the window's end (for --append: now, never in the future)
            run_starts[i], t, evs = _end_by(run_starts[i], t, evs, start, end)
        total_ms = int((t - run_starts[i]).total_seconds() * 1000)
        if running:
            status, completed_at, duration_ms, error = "running", None, None, None
        else:
            error = "Workflow failed: tool call error"
            if cfg.failure_ramp is not None and not run_failed:
                lo, hi = cfg.failure_ramp
                if rng.random() < lo + (hi - lo) * ((run_starts[i] - start) / (end - start)):
                    run_failed, error = True, "Workflow failed: step did not complete"
            if run_failed:
                status = "failed"
                evs.append((cfg.steps - 1, "error", {"type": "error", "message": error}, t))
            else:
                status = "cancelled" if rng.random() < 0.01 else "completed"
                error = None
                evs.append((cfg.steps - 1, "response_complete", {
                    "type": "response_complete", "content": "done", "iterations": iterations,
                    "total_duration": total_ms}, t))
            completed_at, duration_ms = stamp(rng, t), total_ms
        metadata = json.dumps({"source": "generator"}) if rng.random() < 0.5 else None
        runs_rows.append((run_id, wf, f"task {i} for {wf}", status, "qwen3:14b", stamp(rng, run_starts[i]),
                          completed_at, duration_ms, json.dumps({"cwd": "/home/dev/project"}), error, metadata))
        for step, etype, data, when in evs:
            events.append((run_id, step, etype, json.dumps(data), stamp(rng, when)))
        if not running and rng.random() >= cfg.metrics_missing:
            tokens_in = rng.randint(500, 5000) if rng.random() < 0.9 else None
            metrics_rows.append((run_id, calls, ok_calls, calls - ok_calls, iterations, tokens_in,
                                 rng.randint(100, 2000) if tokens_in else None, rng.randint(0, 5),
                                 rng.randint(0, 3), json.dumps(tools_used), json.dumps(step_durations)))

    # Malformed rows: invalid JSON, a failed call with no tool name, an unparsable timestamp.
    bad = []
    for k in range(cfg.bad_rows):
        rid = run_ids[rng.randrange(cfg.running_runs, len(run_ids))]
        kind = k % 3
        if kind == 0:
            bad.append((rid, 0, "tool_complete", '{"type": "tool_complete", "name": "read_fi', _stamp(rng, end)))
        elif kind == 1:
            bad.append((rid, 0, "tool_complete", json.dumps({"type": "tool_complete", "is_error": True,
                                                              "result": "boom", "duration": 3}), _stamp(rng, end)))
        else:
            bad.append((rid, 0, "tool_complete", json.dumps({"type": "tool_complete", "name": "read_file",
                        "is_error": True, "result": "boom", "duration": 3, "error_type": "tool_error"}),
                        "yesterday at noon"))
    # Bad rows go in among the good ones, not at the end.
    for row in bad:
        events.insert(rng.randrange(len(events) + 1), row)

    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", runs_rows)
        conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                         "VALUES (?,?,?,?,?)", events)
        conn.executemany("INSERT INTO run_metrics VALUES (?,?,?,?,?,?,?,?,?,?,?)", metrics_rows)
        conn.execute("COMMIT")
    if not cfg.append:
        # The generator's own index tables would not exist in a runtime's file: drop them.
        for table in SELFHEAL_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()

    for entry in truth_patterns:
        extra_runs = noise_on_patterns.get(entry["id"], [])
        entry["noise_occurrences"] = len(extra_runs)
        entry["occurrences"] += len(extra_runs)
        entry["affected_runs"] = sorted(set(entry["affected_runs"]) | set(extra_runs))
    truth = {
        "seed": cfg.seed, "runs": cfg.runs, "events": len(events), "days": cfg.days,
        "window_start": start.isoformat(), "end": end.isoformat(),
        "patterns": truth_patterns, "noise_errors": noise_errors, "bad_rows": len(bad),
        "running_runs": cfg.running_runs,
    }
    if not cfg.append:  # the file's truth stays that of the history as first generated
        Path(str(path) + ".truth.json").write_text(json.dumps(truth, indent=2))
    return truth


def _camel(label: str) -> str:
    return "".join(p.capitalize() for p in label.split("_"))


def add_runtime_improvements(path: str | Path, rows: int = 3) -> list[str]:
    """Give a history the runtime's older ``improvements`` rows (for migration tests)."""
    conn = sqlite3.connect(str(path))
    cols = [r[1] for r in conn.execute("PRAGMA table_info(improvements)")]
    ids = []
    with conn:
        for k in range(rows):
            rid = f"legacy-{k}"
            values = {"id": rid, "category": "tool", "description": f"legacy improvement {k}",
                      "related_runs": json.dumps([]), "changes_made": None, "impact": json.dumps({"score": k}),
                      "created_at": "2026-01-30T12:00:00+00:00", "status": "proposed"}
            present = {c: v for c, v in values.items() if c in cols}
            conn.execute(f"INSERT INTO improvements ({','.join(present)}) VALUES ({','.join('?' * len(present))})",
                         list(present.values()))
            ids.append(rid)
    conn.close()
    return ids


def newest_applied_at(path: str | Path) -> datetime:
    """When the newest applied (or since verified) improvement in the history was applied."""
    conn = connect(path)
    try:
        found = [parse_timestamp(r.applied_at) for r in ImprovementStore(conn).list(limit=None)
                 if r.applied_at and r.status in ("applied", "verified")]
    finally:
        conn.close()
    if not found:
        raise click.UsageError("--from applied: no applied improvement in this history "
                               "(apply one first, or give an instant)")
    return max(found)


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"{path} does not parse: {exc}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True,
              help="Random seed: the same seed and options give the same history.")
@click.option("--runs", default=400, show_default=True, type=click.IntRange(min=1),
              help="Number of runs to write.")
@click.option("--days", default=7.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Length of the history in days, ending at --until (ignored with --append, "
                   "which fills --from to --until).")
@click.option("--tokens-per-step", default=3, show_default=True, type=click.IntRange(min=0),
              help="Token events per step: scales the number of events per run.")
@click.option("--noise-rate", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Chance that a tool call fails at random on a signature that is not an injected pattern.")
@click.option("--append", is_flag=True,
              help="Add runs to the existing history OUT instead of replacing it (no truth file is written).")
@click.option("--from", "from_", metavar="INSTANT",
              help="With --append: where the new runs start. 'applied' (the newest applied improvement's "
                   "applied_at), a relative time such as -2h or -1d, or an ISO date/datetime.")
@click.option("--until", metavar="INSTANT", default="now", show_default=True,
              help="Where the history ends: 'now', a relative time (-1d) or an ISO date/datetime.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="With --append: the config.toml whose fixes are modelled (default: config.toml beside OUT).")
@click.option("--residual", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="With --append: the share of a pattern's failures left once the config fixes it.")
@click.option("--profile", type=click.Choice(PROFILES), default="default", show_default=True,
              help="The mix of a new history: failure-heavy makes 10% of calls fail over 40 tools x 5 error "
                   "types (200 recurring signatures) on top of the injected patterns.")
@click.option("--healthy", is_flag=True,
              help="With --append: no injected pattern at all (only the random noise), whatever the config.")
def main(out: str, seed: int, runs: int, days: float, tokens_per_step: int, noise_rate: float, append: bool,
         from_: str | None, until: str, config_path: str | None, residual: float, profile: str,
         healthy: bool) -> None:
    """Write a synthetic run history to OUT and its ground truth to OUT.truth.json.

    With --append, extend the history OUT past --from instead: runs in the runtime's format
    whose injected failures are scaled to --runs, and cut to --residual for the patterns the
    config in force fixes (a timeout_ms above the calls' durations; any setting of the tool or
    its MCP server). After `agent self-heal apply`, `--append --from applied --runs 200` adds
    the runs that followed the apply, so `agent self-heal verify ID --early` can judge it.
    """
    try:
        end = _instant(until)
        if not append:
            if from_ is not None:
                raise click.UsageError("--from needs --append")
            cfg = profile_config(profile, seed=seed, runs=runs, days=days, tokens_per_step=tokens_per_step,
                                 end=end)
            if profile == "default" or noise_rate != 0.01:  # an explicit --noise-rate wins over the profile's
                cfg.noise_rate = noise_rate
            truth = generate_history(out, cfg)
            click.echo(f"wrote {out}: {truth['runs']} runs, {truth['events']} events, "
                       f"{len(truth['patterns'])} injected patterns, {truth['bad_rows']} malformed rows")
            return
        if from_ is None:
            raise click.UsageError("--append needs --from (for example --from applied)")
        if not Path(out).exists():
            raise click.UsageError(f"--append: {out} does not exist (generate it first, without --append)")
        if from_ == "now":
            raise click.UsageError("--from now leaves no time before --until to add runs in: use --from applied, "
                                   "-2h or an ISO instant")
        start = newest_applied_at(out) if from_ == "applied" else _instant(from_)
        config = read_config(Path(config_path) if config_path else Path(out).parent / "config.toml")
        patterns, fixed = scaled_patterns(DEFAULT_PATTERNS, runs, None if healthy else config, residual)
        if healthy:
            patterns = tuple(dataclasses.replace(p, occurrences=0) for p in patterns)
        truth = generate_history(out, seed=seed, runs=runs, tokens_per_step=tokens_per_step, noise_rate=noise_rate,
                                 append=True, start=start, end=end, patterns=patterns, bad_rows=0,
                                 running_runs=0)
    except ValueError as exc:
        raise click.UsageError(f"{exc} (try more --runs)" if "no run of" in str(exc) else str(exc)) from None
    except SelfHealError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {truth['runs']} runs to {out} from {truth['window_start']} to {truth['end']}: "
               f"{truth['events']} events; "
               + ("no injected patterns (--healthy)" if healthy else
                  f"fixed by the config: {', '.join(fixed) if fixed else 'none'}"))


def _instant(text: str) -> datetime:
    if text == "now":
        return datetime.now(timezone.utc)
    try:
        return parse_since(text)
    except SelfHealError as exc:
        raise click.UsageError(str(exc)) from None


if __name__ == "__main__":
    main()
