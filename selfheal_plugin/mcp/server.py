"""``self-healing-mcp``: the design document's nine tools, and those of A/B testing, learning
and fix packs, over MCP (stdio or streamable HTTP).

A thin facade: every tool resolves settings exactly as the CLI does
(:func:`settings.load_settings` with the server's ``--home``/``--db`` and the call's
arguments as overrides, so ``[self_heal]`` in ``config.toml`` supplies what a call leaves
out), opens its own short-lived connection, calls the same library function the
``agent self-heal`` command calls, and returns its JSON-ready result as structured
content. Nothing here decides anything the CLI does not.

Errors a user can act on (:class:`~selfheal_plugin.errors.SelfHealError`: unknown id,
bad ``since``, missing database, busy database, ...) and invalid arguments come back as
tool errors with one line; the server keeps serving. Logs go to stderr only (level from
``SELFHEAL_LOG`` or ``RUST_LOG``): on stdio, stdout belongs to the protocol.
"""
from __future__ import annotations

import inspect
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
import anyio.abc
import anyio.from_thread
import click
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError

from selfheal_plugin import __version__
from selfheal_plugin.errors import SelfHealError
from selfheal_plugin import results
from selfheal_plugin.history import schema
from selfheal_plugin.history.connection import BUSY_MESSAGE, is_busy_error, is_readonly_error, readonly_message
from selfheal_plugin.helptext import WholeWordsContext
from selfheal_plugin.history.settings import configure_logging, db_path_for, resolve_home
from selfheal_plugin.service import EARLY_HELP, SelfHeal
from selfheal_plugin.steps import for_agent
from selfheal_plugin.mcp.access import (
    MIN_TOKEN_LENGTH, TOKEN_ENV, BearerTokenMiddleware, check_bind, load_token, restrict_to_read_only,
    transport_security,
)

log = logging.getLogger("selfheal.mcp")

SERVER_NAME = "self-healing"
INSTRUCTIONS = (
    "Self-healing for an agent runtime. Read-only analysis: detect_failure_patterns, analyze_run_health, "
    "compute_agent_metrics, compute_tool_reliability, get_health_dashboard. Lifecycle: propose_improvement "
    "(for a pattern id) -> test_improvement (replay history) -> apply_improvement (edits config.toml as a git "
    "commit) -> verify_improvement (before vs after); a canary or shadow (test_improvement mode) ends with "
    "canary_promote or canary_drop. Time windows (`since`) are -30m, -24h, -7d, -1w, an ISO "
    "date or datetime; omitted values come from [self_heal] in the runtime's config.toml."
)



def annotations(title: str, *, read_only: bool = False, destructive: bool = False,
                idempotent: bool | None = None) -> ToolAnnotations:
    """Hints for clients: analysis tools are read-only, apply is destructive (it edits and
    commits config.toml); propose/test/verify only write their own improvement rows."""
    return ToolAnnotations(title=title, readOnlyHint=read_only, destructiveHint=destructive,
                           idempotentHint=idempotent, openWorldHint=False)


# ------------------------------------------------------------------ plumbing


def one_line(text: str) -> str:
    """Collapse a message onto one line (a tool error is one line)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "error"


def describe_validation_error(exc: ValidationError) -> str:
    """``mode: Input should be 'simulation', 'canary' or 'shadow'``: one line per problem, joined."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    return one_line("; ".join(parts))


class SelfHealingServer(MCPServer):
    """:class:`MCPServer` whose argument-validation errors are one readable line."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        known = {t.name: t for t in await self.list_tools()}
        if name in known and arguments:  # an argument the tool does not take is a mistake, not ignored
            extra = sorted(set(arguments) - set((known[name].input_schema or {}).get("properties", {})))
            if extra:
                raise ToolError(f"invalid arguments for {name}: unknown argument(s) {', '.join(extra)}")
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(f"invalid arguments for {name}: {describe_validation_error(cause)}") from cause
            raise


@contextmanager
def _session(home: str | os.PathLike | None, db: str | os.PathLike | None, **overrides: Any) -> Iterator[SelfHeal]:
    """The service for one call (recovery runs as it opens; its warnings go to the log),
    closed afterwards; domain errors → one-line ToolError. What it says to do next names tools."""
    service: SelfHeal | None = None
    try:
        with for_agent():  # its messages name the MCP tools to call next
            service = SelfHeal(home, db, warn=log.warning, **{k: v for k, v in overrides.items() if v is not None})
            yield service
    except SelfHealError as exc:
        raise ToolError(one_line(str(exc))) from None
    except sqlite3.OperationalError as exc:
        if is_busy_error(exc):
            raise ToolError(BUSY_MESSAGE) from None
        if is_readonly_error(exc):
            raise ToolError(readonly_message(db_path_for(home, db))) from None
        raise
    finally:
        if service is not None:
            service.close()


def _progress(ctx: Context) -> Callable[[int, int], None]:
    """The service's scan progress (events read of the history's new ones) as MCP progress
    notifications, for a client that asked for them (a ``progressToken``; a no-op otherwise):
    a first call on a large history builds the index for seconds to minutes, and a client
    can show it and keep waiting. Called from the tool's worker thread; a notification that
    cannot be sent (the client went away) does not stop the build."""
    def report(done: int, total: int) -> None:
        try:
            anyio.from_thread.run(ctx.report_progress, done, total, "Indexing run history")
        except Exception as exc:  # noqa: BLE001 — the wire, not the work, failed
            log.debug("progress not sent: %s", exc)
    return report


def _sdk_log_level() -> Any:
    """The SDK's level name for ours (it only configures logging when nothing else has)."""
    name = logging.getLevelName(logging.getLogger("selfheal").getEffectiveLevel())
    return name if name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "WARNING"


# ------------------------------------------------------------------ the server


def build_server(home: str | os.PathLike | None = None, db: str | os.PathLike | None = None) -> SelfHealingServer:
    """The MCP server over the runtime home ``home`` (default ``$BINKS_HOME`` or ``~/.binks``)
    and database ``db`` (default ``HOME/conversations.db``), both resolved on every call."""
    server = SelfHealingServer(SERVER_NAME, title="Self-healing", version=__version__, instructions=INSTRUCTIONS,
                               log_level=_sdk_log_level())

    warned: dict[str, int] = {}

    def warn_bad_rows(kind: str, count: int) -> None:
        """Malformed rows go to the log (never stdout): a warning when the count changes, then debug."""
        if count and warned.get(kind) != count:
            warned[kind] = count
            log.warning("skipped %d malformed %s row(s) (invalid JSON, missing tool name or unparsable "
                        "timestamp)", count, kind)
        elif count:
            log.debug("skipped %d malformed %s row(s), as before", count, kind)

    def tool(title: str, *, read_only: bool = False, destructive: bool = False, idempotent: bool | None = None):
        def register(fn: Any) -> Any:  # the docstring, dedented, is what a client shows
            return server.tool(title=title, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations(
                title, read_only=read_only, destructive=destructive,
                idempotent=True if read_only else idempotent))(fn)
        return register

    # -------------------------------------------------------------- analysis

    @tool("Detect failure patterns", read_only=True)
    def detect_failure_patterns(
        ctx: Context,  # given by the SDK (not an argument of the tool): its progress notifications
        since: Annotated[str | None, Field(**schema.field_kwargs("lookback"))] = None,
        min_occurrences: Annotated[int | None, Field(**schema.field_kwargs("min_occurrences"))] = None,
        confidence_threshold: Annotated[float | None, Field(**schema.field_kwargs("confidence_threshold"))] = None,
        limit: Annotated[int | None, Field(**schema.field_kwargs(
            "limit", "Affected runs listed per pattern, the latest kept; affected_run_count is the total"))] = None,
    ) -> results.DetectResult:
        """Find recurring tool failures: (error_type, tool_name) signatures of failed tool calls,
        most frequent first, with correlation, confidence, affected runs and a suggested fix.
        The same object as `agent self-heal detect --json`: with no patterns, `failing_signatures`
        and `candidates` say why (nothing failed, or nothing failed min_occurrences times, or
        nothing reached the confidence threshold). Read-only: unlike `agent self-heal detect` it
        neither proposes nor notifies (`proposals` and `notified` stay empty)."""
        with _session(home, db, lookback=since, min_occurrences=min_occurrences,
                      confidence_threshold=confidence_threshold) as sh:
            result = sh.detect(progress=_progress(ctx), **({} if limit is None else {"runs_limit": limit}))
            warn_bad_rows("run_events", result["skipped_rows"])
            warn_bad_rows("runs", result.get("skipped_runs") or 0)
            return result

    @tool("Analyze run health", read_only=True)
    def analyze_run_health(
        ctx: Context,
        run_id: Annotated[str, Field(description="Run id (a unique prefix is enough)")],
    ) -> results.RunHealth:
        """Health score (0-100) of one run with its issues, each with a severity and a recommendation."""
        with _session(home, db) as sh:
            return sh.run_health(run_id, progress=_progress(ctx))

    @tool("Compute agent metrics", read_only=True)
    def compute_agent_metrics(
        since: Annotated[str | None, Field(**schema.field_kwargs("lookback"))] = None,
    ) -> results.AgentMetrics:
        """Success rate, run count, average duration and trend per agent (workflow) in the window."""
        with _session(home, db, lookback=since) as sh:
            return sh.agent_metrics()

    @tool("Compute tool reliability", read_only=True)
    def compute_tool_reliability(
        ctx: Context,
        since: Annotated[str | None, Field(**schema.field_kwargs("lookback"))] = None,
    ) -> results.ToolReliability:
        """Per tool in the window: success, timeout and other-error rates, durations, top error types."""
        with _session(home, db, lookback=since) as sh:
            result = sh.tool_reliability(progress=_progress(ctx))
            warn_bad_rows("tool event", result.get("skipped_rows") or 0)
            return result

    # -------------------------------------------------------------- lifecycle

    @tool("Propose improvement", idempotent=True)
    def propose_improvement(
        pattern_id: Annotated[str, Field(description="Pattern id from detect_failure_patterns "
                                                     "(error_type:tool_name)")],
    ) -> results.ProposalOutcome:
        """Propose a fix for a pattern through its error type's strategy and store it as an
        improvement (status proposed). An open proposal for the pattern is returned, not duplicated."""
        with _session(home, db) as sh:
            return sh.propose(pattern_id)

    @tool("Test improvement", destructive=True, idempotent=False)  # canary/shadow commit a config edit
    def test_improvement(
        improvement_id: Annotated[str, Field(description="Improvement id (imp-...)")],
        mode: Annotated[Literal["simulation", "canary", "shadow"], Field(
            description="simulation replays the history window with the change; canary applies it to a "
                        "fraction of runs; shadow observes it without changing outcomes")] = "simulation",
        fraction: Annotated[float | None, Field(**schema.field_kwargs("fraction"))] = None,
        since: Annotated[str | None, Field(**schema.field_kwargs(
            "lookback", "Baseline window start for a simulation"))] = None,
    ) -> results.TestResult:
        """Estimate the improvement against history: simulated vs baseline success rate with a
        95% interval and a recommendation (safe_to_apply, risky or reject). Stores the result.
        canary/shadow start an experiment section in config.toml (a git commit)."""
        with _session(home, db) as sh:
            return sh.test(improvement_id, mode, since=since, fraction=fraction)

    @tool("Apply improvement", destructive=True, idempotent=False)
    def apply_improvement(
        improvement_id: Annotated[str, Field(description="Improvement id (imp-...), proposed or tested")],
        changes_made: Annotated[str | None, Field(
            description="What was done: recorded with the improvement (required text for manual-only "
                        "improvements; an optional note beside the config edit otherwise)")] = None,
    ) -> results.ApplyResult:
        """Apply an improvement: edit config.toml (comments and formatting kept), commit it to git
        with trailers, mark it applied and schedule verification. Refuses a config with
        uncommitted edits."""
        with _session(home, db) as sh:
            return sh.apply(improvement_id, changes_made)

    @tool("Verify improvement")
    def verify_improvement(
        improvement_id: Annotated[str, Field(description="Improvement id (imp-...), applied")],
        measurement_window_days: Annotated[float | None, Field(**schema.field_kwargs("window_days"))] = None,
        early: Annotated[bool, Field(description=EARLY_HELP)] = False,
    ) -> results.VerifyResult:
        """Measure an applied improvement: success rate and the pattern's error rate before vs after
        the apply (Fisher's exact test, sample-size floor) and recommend keep, rollback or extend."""
        with _session(home, db) as sh:
            return sh.verify(improvement_id, measurement_window_days, early=early)

    @tool("Promote canary", destructive=True, idempotent=False)  # two commits: the section out, the change in
    def canary_promote(
        improvement_id: Annotated[str, Field(description="Improvement id (imp-...), running as a canary or shadow")],
        force: Annotated[bool, Field(description="Promote although its verdict is not keep (recorded)")] = False,
    ) -> results.PromoteResult:
        """End a canary or shadow started by test_improvement (a commit removing its section) and apply
        the improvement to every run (its own commit, verification scheduled). Refused unless the
        verdict (verify_improvement) is keep, unless force."""
        with _session(home, db) as sh:
            return sh.canary_promote(improvement_id, force=force)

    @tool("Drop canary", destructive=True, idempotent=False)  # a commit removing its section
    def canary_drop(
        improvement_id: Annotated[str, Field(description="Improvement id (imp-...), running as a canary or shadow")],
    ) -> results.StatusResult:
        """End a canary or shadow without applying: a commit removes its section and the improvement
        goes back to the status it had."""
        with _session(home, db) as sh:
            return sh.canary_drop(improvement_id)

    # -------------------------------------------------------------- dashboard

    @tool("Health dashboard", read_only=True)
    def get_health_dashboard(
        ctx: Context,
        detailed: Annotated[bool, Field(description="Include per-agent and per-tool tables")] = False,
        since: Annotated[str | None, Field(**schema.field_kwargs("lookback"))] = None,
    ) -> results.HealthDashboard:
        """System-wide health over the window (the lookback setting unless `since`): overall
        score, trend, success rate, worst tools, daily success and recent improvements with
        their measured impact."""
        with _session(home, db, lookback=since) as sh:
            return sh.dashboard(detailed=detailed, progress=_progress(ctx))

    # -------------------------------------------------------------- cross-project learning

    @tool("Export fix pack", read_only=True)
    def export_fix_pack() -> results.FixPack:
        """This home's fix rules as a portable fix pack (format selfheal-fix-pack, version 1): failure
        kind, change template, description and measured evidence with sample sizes per origin home.
        Never paths, secrets, config values beyond the template, or local enabled flags."""
        with _session(home, db) as sh:
            return sh.export_pack()

    @tool("Import fix pack", idempotent=True)
    def import_fix_pack(
        pack: Annotated[str | dict[str, Any], Field(
            description="The fix pack itself (its JSON text or object, as export_fix_pack returns it), "
                        "not a path")],
    ) -> results.ImportResult:
        """Merge another home's fix pack into this home's rules. The whole pack is validated first
        (format, version, every rule's template) and merged in one transaction; evidence it claims for
        this home is ignored. Imported rules inform proposals; nothing is applied."""
        with _session(home, db) as sh:
            return sh.import_pack(pack, "the pack")

    @tool("Sync fix packs", idempotent=True)
    def sync_fix_packs() -> results.SyncResult:
        """Share fix packs through the git remote this home last synced with (set by a person with
        `agent self-heal sync --remote URL`; a client cannot choose a new remote): fetch, read the
        other homes' packs, push ours, then merge theirs. A remote that refuses changes nothing."""
        with _session(home, db) as sh:
            return sh.sync()
    # -------------------------------------------------------------- A/B experiments

    @tool("Start A/B experiment", destructive=True, idempotent=False)  # commits an [ab."ID"] section
    def ab_start(
        pattern_id: Annotated[str, Field(description="Pattern id (error_type:tool_name)")],
        arms: Annotated[list[str] | None, Field(
            description="Improvement ids of the pattern to run as arms (at least two); default: the candidates "
                        "its strategies offer")] = None,
        fraction: Annotated[float | None, Field(
            description="Each arm's share of runs; default: equal shares for every arm and the control")] = None,
    ) -> results.AbExperiment:
        """Run two or more fixes of one pattern as arms of an experiment beside a control: writes
        [ab."ID"] to config.toml (a git commit); ToolPolicy assigns each run to an arm or the control."""
        with _session(home, db) as sh:
            return sh.ab_start(pattern_id, arms, fraction=fraction)

    @tool("A/B experiment status", read_only=True)
    def ab_status(
        experiment_id: Annotated[str | None, Field(description="Experiment id (ab-...); omit to list all")] = None,
    ) -> results.AbList:
        """A/B experiments with their arms and verdict so far (per arm and control: the pattern's
        error rate and run success; chi-square omnibus, each arm vs control by Fisher's exact
        test with Holm's correction, a minimum sample per arm). Nothing is stored."""
        with _session(home, db) as sh:
            return sh.ab_list(experiment_id)

    @tool("Promote A/B winner", destructive=True, idempotent=False)
    def ab_promote(
        experiment_id: Annotated[str, Field(description="Experiment id (ab-...), running")],
        force: Annotated[bool, Field(description="Promote the best observed arm without a significant winner "
                                                 "(recorded)")] = False,
    ) -> results.AbExperiment:
        """End the experiment (a commit removing its section) and apply the winner as a normal
        improvement (its own commit, verification scheduled). Refused without a significant
        winner unless force."""
        with _session(home, db) as sh:
            return sh.ab_promote(experiment_id, force=force)

    @tool("Drop A/B experiment", destructive=True, idempotent=False)
    def ab_drop(
        experiment_id: Annotated[str, Field(description="Experiment id (ab-...), running")],
    ) -> results.AbExperiment:
        """End the experiment without applying anything: a commit removes its section and every
        arm goes back to the status it had."""
        with _session(home, db) as sh:
            return sh.ab_drop(experiment_id)
    # -------------------------------------------------------------- learning from success

    @tool("Learn from success", read_only=True)
    def learn_from_success(
        since: Annotated[str | None, Field(**schema.field_kwargs("lookback"))] = None,
        until: Annotated[str | None, Field(description="End of the window after `since` (default now): "
                                                       "-2d or an ISO date/time")] = None,
    ) -> results.LearnResult:
        """What got better without selfheal: signatures, tools and workflows whose error rate fell
        significantly from the window before `since` to the window since it, each credited to a
        person's own config.toml commit when its timing fits (else "no config change explains
        it"), the fix rules that teaches, and where enabled rules could apply now. Read-only:
        rules are stored by `agent self-heal learn` (this tool reports them, recorded false)."""
        with _session(home, db, lookback=since) as sh:
            return sh.learn(since=since, until=until, record=False)

    @tool("List fix rules", read_only=True)
    def list_rules() -> results.RulesResult:
        """Stored fix rules (learned, verified, imported): failure kind, change template, measured
        effect per origin, and whether each is enabled."""
        with _session(home, db) as sh:
            return sh.rules()

    @tool("Enable or disable a fix rule", idempotent=True)
    def set_rule_enabled(
        rule_id: Annotated[str, Field(description="Rule id (rule-...) from list_rules")],
        enabled: Annotated[bool, Field(description="false: never used as a prior or a proposal")],
    ) -> results.RuleResult:
        """Turn a fix rule on or off; a disabled rule is kept and listed but never a prior or a proposal."""
        with _session(home, db) as sh:
            return sh.set_rule_enabled(rule_id, enabled)

    return server


# ------------------------------------------------------------------ console script


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=(
    "HTTP access: a bind beyond loopback (--host 0.0.0.0, a LAN address) is refused unless a bearer token is "
    f"set with ${TOKEN_ENV} or --token-file; with a token, every request needs 'Authorization: Bearer TOKEN' "
    "(401 otherwise), on loopback too. Loopback binds also check the Host and Origin headers."))
@click.option("--transport", type=click.Choice(["stdio", "streamable-http"]), default="stdio", show_default=True,
              help="stdio (for an MCP client that spawns the server) or streamable HTTP.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help=f"HTTP bind address; beyond loopback a bearer token (${TOKEN_ENV} or --token-file) is required.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"HTTP bearer token: the first line of this file (instead of ${TOKEN_ENV}); at least "
                   f"{MIN_TOKEN_LENGTH} characters. Clients send 'Authorization: Bearer TOKEN'.")
@click.option("--read-only", is_flag=True, default=False,
              help="Serve only the read-only analysis tools (detect_failure_patterns, analyze_run_health, "
                   "compute_agent_metrics, compute_tool_reliability, get_health_dashboard, ab_status, "
                   "learn_from_success, list_rules, export_fix_pack); propose, test, apply, verify, A/B "
                   "start/promote/drop, set_rule_enabled, import and sync are not offered.")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Runtime home (default: $BINKS_HOME or ~/.binks).")
@click.option("--db", type=click.Path(dir_okay=False), default=None,
              help="Run-history database (default: HOME/conversations.db).")
@click.version_option(__version__, prog_name="self-healing-mcp")
def cli(transport: str, host: str, port: int, token_file: str | None, read_only: bool, home: str | None,
        db: str | None) -> None:
    """MCP server with the self-healing tools (detect, health, propose, test, apply, verify)."""
    configure_logging()
    _exit_cleanly_on_signals()  # before anything is logged: a supervisor may stop it at once
    token = None
    if transport == "streamable-http":
        try:
            token = load_token(token_file)
            check_bind(host, token)
        except SelfHealError as exc:
            _refuse(str(exc))
    elif token_file is not None:
        _refuse("--token-file applies to --transport streamable-http only")
    server = build_server(home, db)
    if read_only:
        removed = restrict_to_read_only(server)
        log.info("read-only: not serving %s", ", ".join(removed))
    where = resolve_home(home)
    log.info("self-healing-mcp %s over %s: home %s, database %s", __version__, transport, where,
             db or where / "conversations.db")
    if transport == "stdio":
        anyio.run(_serve_stdio, server)
        _exit_cleanly_on_signals()  # the loop took its signal handlers with it
        return
    access = ("bearer token required" if token else "no token: loopback only") + (", read-only" if read_only else "")
    click.echo(f"self-healing-mcp: serving streamable HTTP at http://{host}:{port}/mcp ({access})", err=True)
    _run_http(server, host, port, token)


cli.context_class = WholeWordsContext  # --help wraps at spaces, never inside --token-file

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit_cleanly_on_signals() -> None:
    """SIGTERM is how a client or a supervisor stops the server, SIGINT is Ctrl-C: exit 0,
    not 143 (nor click's "Aborted!" and 1).

    This handler covers startup and HTTP. Over HTTP, uvicorn swaps in its own handler while
    it serves, shuts down gracefully on SIGTERM or SIGINT, puts this handler back and raises
    the signal again: it lands here and exits 0 too. Should a uvicorn just return instead,
    the exit is 0 all the same. Over stdio, :func:`_serve_stdio` takes the signals while it
    serves."""
    def stop(signum: int, frame: Any) -> None:
        log.info("self-healing-mcp: %s, exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


async def _serve_stdio(server: SelfHealingServer) -> None:
    """Serve over stdio until the client closes stdin, or until SIGTERM or SIGINT: then exit
    0 at once, abandoning a call in progress.

    A signal cannot end this process the ordinary way (a SystemExit out of the loop, or
    cancelling the server's task group): the SDK reads stdin in an AnyIO worker thread, a
    non-daemon thread blocked in read(2) for as long as the client keeps the pipe open, and
    a sync tool runs in another such thread until it returns. Neither can be interrupted
    from outside (the read is retried on EINTR, closing its descriptor does not wake it),
    AnyIO shields both waits from cancellation, and the interpreter's exit joins both
    threads: the process hung after the loop had ended, until a second signal broke that
    join with a traceback. So :func:`_exit_now` ends the process without joining them."""
    async with anyio.create_task_group() as tg:
        await tg.start(_exit_on_signal)  # before the SDK starts its stdin thread
        await server.run_stdio_async()
        tg.cancel_scope.cancel()  # stdin closed: the server is done, stop watching


async def _exit_on_signal(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Wait in the event loop (not in a signal handler, which could interrupt a write to
    stderr half-way) for SIGTERM or SIGINT, then exit 0."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            log.info("self-healing-mcp: %s, exiting", signal.Signals(signum).name)
            _exit_now(0)


def _exit_now(code: int) -> None:
    """Flush the log and the standard streams, then ``os._exit``: the only way out while a
    thread is blocked reading stdin or running a tool (see :func:`_serve_stdio`). Each
    response is flushed as it is sent; a call in progress is abandoned as a crash would
    abandon it (sqlite rolls its transaction back, the next lifecycle command recovers an
    interrupted apply). No atexit handler of ours matters to the server."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)


def _refuse(message: str) -> None:
    """Bad usage: one line on stderr, exit 2, nothing served."""
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(2)


# The SDK answers a request body over 4 MiB with HTTP 413, which a client reports as an opaque
# JSON-RPC error (-32603). import_fix_pack takes packs of up to 4 MiB, sent as a JSON string
# (its quotes escaped) or an object: room for those, so a larger pack reaches the tool and gets
# its one-line refusal ("the pack is larger than 4 MiB"). Only bodies past this are 413.
HTTP_BODY_LIMIT = 16 * 1024 * 1024


def _run_http(server: SelfHealingServer, host: str, port: int, token: str | None = None) -> None:
    """Streamable HTTP at ``/mcp`` with uvicorn logging through our stderr handler; behind the
    bearer-token check when ``token`` is set (see :mod:`.access`)."""
    import uvicorn

    app: Any = server.streamable_http_app(host=host, transport_security=transport_security(host),
                                          max_request_body_size=HTTP_BODY_LIMIT)
    if token is not None:
        app = BearerTokenMiddleware(app, token)
    debug = logging.getLogger("selfheal").isEnabledFor(logging.DEBUG)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=debug,
                            log_level=logging.getLogger("selfheal").getEffectiveLevel())
    anyio.run(uvicorn.Server(config).serve)


def main() -> None:
    try:
        cli(prog_name="self-healing-mcp")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
