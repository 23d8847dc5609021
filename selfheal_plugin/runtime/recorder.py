"""``RunRecorder``: a Python agent runtime's writer of the run history.

It writes ``runs``, ``run_events`` and ``run_metrics`` exactly as the Rust runtime does
(spec/run-history-format.md), so everything selfheal reads works on a Python runtime's
history too::

    recorder = RunRecorder(home / "conversations.db", model="qwen3:14b")
    with recorder.run("planner", "summarise the logs") as run:
        with run.step(0):
            run.record_tool_call("list_dir", {"path": "/logs"}, result="a.log b.log", duration_ms=12)

Writes are short ``BEGIN IMMEDIATE`` transactions under the history's busy timeout, so a
reader in another process (selfheal's detection, the watcher) never blocks the runtime for
long and vice versa. Events are buffered per run and written at step boundaries, at the end
of the run and every ``max_buffer`` events (one commit per event would cost ~1 ms each);
:meth:`RecordedRun.flush` writes them at once.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from selfheal_plugin.history.clock import Clock, runtime_timestamp, wall_clock
from selfheal_plugin.history.connection import classify_error, connect, write_transaction
from selfheal_plugin.history.outcome import FINISHED

log = logging.getLogger("selfheal.recorder")

RUN_STATUSES = FINISHED  # the statuses a run can end with
_CLASSIFY = object()  # sentinel: classify a failed call's message with the runtime's labels

_current_run: contextvars.ContextVar["RecordedRun | None"] = contextvars.ContextVar("selfheal_current_run",
                                                                                     default=None)


def current_run() -> "RecordedRun | None":
    """The run opened by the innermost ``RunRecorder.run(...)`` block of this thread/task."""
    return _current_run.get()


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    content = getattr(result, "content", None)  # an MCP CallToolResult
    if isinstance(content, list):
        texts = [getattr(c, "text", None) for c in content]
        if all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError):
        return str(result)


@dataclass
class ToolCallRecord:
    """One finished call as the recorder saw it (kept for summaries; not written)."""
    name: str
    is_error: bool
    error_type: str | None
    duration_ms: int
    step_index: int


@dataclass
class RecordedRun:
    """One run being recorded. Events go to the current step (see :meth:`step_started`)."""

    recorder: "RunRecorder"
    id: str
    workflow_name: str
    task: str
    model: str
    started_at: datetime
    metadata: dict[str, Any] | None = None
    status: str = "running"
    step_index: int = 0
    error_message: str | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    files_read: int = 0
    files_modified: int = 0
    calls: list[ToolCallRecord] = field(default_factory=list)
    iterations: int = 0
    step_durations: list[int] = field(default_factory=list)
    _buffer: list[tuple[int, str, str, str]] = field(default_factory=list, repr=False)
    _step_started_at: dict[int, datetime] = field(default_factory=dict, repr=False)
    _step_failed: set[int] = field(default_factory=set, repr=False)

    # ------------------------------------------------------------ events

    @property
    def clock(self) -> Clock:
        return self.recorder.clock

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def emit(self, event_type: str, data: dict[str, Any] | None = None, *, step_index: int | None = None) -> None:
        """Append one event; ``data`` gets the ``type`` tag first, as the runtime writes it."""
        if self.finished:
            raise RuntimeError(f"run {self.id} is already {self.status}")
        payload = {"type": event_type, **(data or {})}
        step = self.step_index if step_index is None else step_index
        self._buffer.append((step, event_type, json.dumps(payload), runtime_timestamp(self.clock())))
        if len(self._buffer) >= self.recorder.max_buffer:
            self.flush()

    def processing_start(self) -> None:
        self.emit("processing_start")

    def step_started(self, step_index: int | None = None) -> None:
        if step_index is not None:
            self.step_index = step_index
        self._step_started_at[self.step_index] = self.clock()
        self.emit("step_started", {"step_index": self.step_index})

    def step_completed(self, step_index: int | None = None, success: bool | None = None,
                       duration_ms: int | None = None) -> None:
        """Close a step. ``success`` defaults to "no failed tool call in this step"; the
        duration to the time since :meth:`step_started` on the recorder's clock."""
        step = self.step_index if step_index is None else step_index
        if success is None:
            success = step not in self._step_failed
        if duration_ms is None:
            began = self._step_started_at.get(step)
            duration_ms = _ms(self.clock() - began) if began else 0
        self.step_durations.append(int(duration_ms))
        self.emit("step_completed", {"step_index": step, "success": bool(success), "duration_ms": int(duration_ms)},
                  step_index=step)
        self.flush()

    def tool_start(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        self.emit("tool_start", {"name": name, "arguments": arguments or {}})

    def tool_complete(self, name: str, result: Any, duration_ms: float, is_error: bool,
                      error_type: Any = _CLASSIFY) -> str | None:
        """Record a call's end. On failure ``error_type`` defaults to the runtime's label for
        the message (:func:`history.classify_error`); pass ``None`` to leave it absent as an
        unclassifying runtime would. It is always absent on success. Returns the label."""
        text = _result_text(result)
        data: dict[str, Any] = {"name": name, "result": text, "duration": int(round(duration_ms)),
                                "is_error": bool(is_error)}
        label: str | None = None
        if is_error:
            label = classify_error(text) if error_type is _CLASSIFY else error_type
            if label is not None:
                data["error_type"] = label
            self._step_failed.add(self.step_index)
        self.calls.append(ToolCallRecord(name, bool(is_error), label, int(round(duration_ms)), self.step_index))
        self.emit("tool_complete", data)
        return label

    def record_tool_call(self, name: str, arguments: dict[str, Any] | None, result: Any, duration_ms: float,
                         is_error: bool = False, error_type: Any = _CLASSIFY) -> str | None:
        """``tool_start`` and ``tool_complete`` of a call that already happened."""
        self.tool_start(name, arguments)
        return self.tool_complete(name, result, duration_ms, is_error, error_type)

    def tool_call(self, name: str, fn: Callable[..., Any], arguments: dict[str, Any] | None = None) -> Any:
        """Run a synchronous tool ``fn(**arguments)`` and record it; an exception is recorded
        as a failed call (its message classified) and re-raised. For timeouts, retries and
        the other config settings, call tools through ``ToolPolicy`` instead."""
        args = arguments or {}
        self.tool_start(name, args)
        t0 = time.perf_counter()
        try:
            result = fn(**args)
        except Exception as exc:
            self.tool_complete(name, str(exc) or type(exc).__name__, (time.perf_counter() - t0) * 1000, True)
            raise
        self.tool_complete(name, result, (time.perf_counter() - t0) * 1000, False)
        return result

    def token(self, content: str) -> None:
        self.emit("token", {"content": content})

    def thinking(self, content: str) -> None:
        self.emit("thinking", {"content": content})

    def iteration(self, number: int | None = None) -> None:
        self.iterations = number if number is not None else self.iterations + 1
        self.emit("iteration", {"iteration": self.iterations})

    def response_complete(self, content: str, iterations: int | None = None,
                          total_duration: int | None = None) -> None:
        if total_duration is None:
            total_duration = _ms(self.clock() - self.started_at)
        self.emit("response_complete", {"content": content,
                                        "iterations": self.iterations if iterations is None else iterations,
                                        "total_duration": int(total_duration)})

    def error(self, message: str) -> None:
        self.emit("error", {"message": message})

    def add_tokens(self, tokens_in: int = 0, tokens_out: int = 0) -> None:
        self.tokens_in = (self.tokens_in or 0) + tokens_in
        self.tokens_out = (self.tokens_out or 0) + tokens_out

    def update_metadata(self, **values: Any) -> None:
        """Merge keys into the run's ``metadata`` JSON and write it now (e.g. an experiment arm)."""
        self.metadata = {**(self.metadata or {}), **values}
        self.recorder._write(lambda conn: conn.execute(
            "UPDATE runs SET metadata = ? WHERE id = ?", (json.dumps(self.metadata), self.id)))

    def fail(self, message: str) -> None:
        """Mark the run as failed; the ``run()`` block then finishes it with this error."""
        self.error_message = message

    @contextmanager
    def step(self, index: int | None = None) -> Iterator["RecordedRun"]:
        """``step_started`` … ``step_completed``; an exception marks the step failed."""
        self.step_started(self.step_index + (1 if self._step_started_at else 0) if index is None else index)
        step = self.step_index
        try:
            yield self
        except BaseException:
            self._step_failed.add(step)
            if not self.finished:
                self.step_completed(step)
            raise
        else:
            self.step_completed(step)

    # ------------------------------------------------------------ writing

    def flush(self) -> None:
        if not self._buffer:
            return
        rows = [(self.id, *ev) for ev in self._buffer]
        self.recorder._write(lambda conn: conn.executemany(
            "INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)",
            rows))
        self._buffer.clear()

    def finish(self, status: str | None = None, error: str | None = None) -> None:
        """Write the run's end: remaining events, status, completed_at, duration_ms, error and
        its ``run_metrics`` row, in one transaction. ``status`` defaults to ``failed`` when an
        error is known (argument or :meth:`fail`), else ``completed``."""
        if self.finished:
            raise RuntimeError(f"run {self.id} is already {self.status}")
        error = error if error is not None else self.error_message
        status = status or ("failed" if error else "completed")
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        self.completed_at = self.clock()
        self.duration_ms = _ms(self.completed_at - self.started_at)
        events = [(self.id, *ev) for ev in self._buffer]
        tools_used: dict[str, int] = {}
        for c in self.calls:
            tools_used[c.name] = tools_used.get(c.name, 0) + 1
        ok = sum(1 for c in self.calls if not c.is_error)
        metrics = (self.id, len(self.calls), ok, len(self.calls) - ok, self.iterations, self.tokens_in,
                   self.tokens_out, self.files_read, self.files_modified, json.dumps(tools_used),
                   json.dumps(self.step_durations))

        def write(conn):
            if events:
                conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                                 "VALUES (?,?,?,?,?)", events)
            conn.execute("UPDATE runs SET status = ?, completed_at = ?, duration_ms = ?, error = ? WHERE id = ?",
                         (status, runtime_timestamp(self.completed_at), self.duration_ms, error, self.id))
            conn.execute("INSERT OR REPLACE INTO run_metrics(run_id, total_tool_calls, successful_tool_calls, "
                         "failed_tool_calls, total_iterations, total_tokens_in, total_tokens_out, files_read, "
                         "files_modified, tools_used, step_durations) VALUES (?,?,?,?,?,?,?,?,?,?,?)", metrics)

        self.recorder._write(write)
        self._buffer.clear()
        self.status = status
        self.error_message = error


def _ms(delta) -> int:
    return max(0, int(round(delta.total_seconds() * 1000)))


class RunRecorder:
    """Writes runs of a Python agent runtime into the run-history file at ``db_path``.

    :param db_path: the history (``BINKS_HOME/conversations.db``); created with the
        runtime's schema when absent.
    :param clock: a callable returning an aware ``datetime`` (default: the wall clock); a
        :class:`~selfheal_plugin.history.clock.SimulatedClock` makes a week pass in seconds.
    :param model: the model name written on each run unless ``start_run`` says otherwise.
    :param id_factory: makes run ids (default: random UUID v4 strings).
    :param max_buffer: events held per run before they are written.
    """

    def __init__(self, db_path: str | Path, *, clock: Clock | None = None, model: str = "unknown",
                 id_factory: Callable[[], str] | None = None, max_buffer: int = 64) -> None:
        self.db_path = Path(db_path)
        self.clock: Clock = clock or wall_clock
        self.model = model
        self.id_factory = id_factory or (lambda: str(uuid.uuid4()))
        self.max_buffer = max(1, max_buffer)
        self._conn = connect(self.db_path, create=True)
        self._lock = threading.Lock()

    def _write(self, fn: Callable[[Any], Any]) -> None:
        with self._lock, write_transaction(self._conn) as conn:
            fn(conn)

    def start_run(self, workflow_name: str, task: str, *, model: str | None = None,
                  metadata: dict[str, Any] | None = None, context: dict[str, Any] | None = None,
                  run_id: str | None = None) -> RecordedRun:
        """Insert the ``running`` row now (a reader sees the run at once) and return its handle."""
        run = RecordedRun(self, run_id or self.id_factory(), workflow_name, task, model or self.model,
                          self.clock(), dict(metadata) if metadata is not None else None)
        self._write(lambda conn: conn.execute(
            "INSERT INTO runs(id, workflow_name, task, status, model, started_at, completed_at, duration_ms, "
            "context, error, metadata) VALUES (?,?,?,?,?,?,NULL,NULL,?,NULL,?)",
            (run.id, workflow_name, task, "running", run.model, runtime_timestamp(run.started_at),
             json.dumps(context) if context is not None else None,
             json.dumps(run.metadata) if run.metadata is not None else None)))
        return run

    @contextmanager
    def run(self, workflow_name: str, task: str, **kwargs: Any) -> Iterator[RecordedRun]:
        """A run from ``processing_start`` to its end. Leaving the block finishes it:
        ``completed``, or ``failed`` after :meth:`RecordedRun.fail` or an exception (which is
        recorded as an ``error`` event and re-raised), or ``cancelled`` on cancellation or
        Ctrl-C. Inside the block, :func:`current_run` returns the run (ToolPolicy uses it)."""
        run = self.start_run(workflow_name, task, **kwargs)
        token = _current_run.set(run)
        try:
            run.processing_start()
            yield run
        except Exception as exc:
            if not run.finished:
                message = str(exc) or type(exc).__name__
                run.error(message)
                run.finish("failed", message)
            raise
        except BaseException:  # KeyboardInterrupt, asyncio.CancelledError
            if not run.finished:
                run.finish("cancelled", "cancelled")
            raise
        else:
            if not run.finished:
                if run.error_message:
                    run.error(run.error_message)
                run.finish()
        finally:
            _current_run.reset(token)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
