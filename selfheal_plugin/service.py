"""The one service behind every shell: ``agent self-heal``, ``self-healing-mcp``, the daemon,
and runtimes or plugin authors calling selfheal from Python::

    from selfheal_plugin import SelfHeal

    with SelfHeal(home="~/.binks") as sh:
        found = sh.detect(propose=True)
        for p in found["patterns"]:
            print(p["id"], p["suggested_fix"])
        sh.test(found["proposals"][0]["improvement_id"])

A ``SelfHeal`` owns the settings (``[self_heal]`` of config.toml, overridden by keyword
arguments), the history connection, the clock and crash recovery, which runs once, when it
opens: an apply, rollback or experiment edit a killed process left half done is finished or
undone before any verb reads config, git or the database. Each verb returns a typed result
(:mod:`selfheal_plugin.results`); the shells only parse arguments, call one verb and render.

Every question has one answer here:

* a pattern's suggested fix is its stored open proposal's description wherever one exists
  (or its verified fix's, while the pattern has not kept failing after it), else the
  description of the proposal its strategy makes now, not stored (``suggested_by`` says
  which): a read-only detect suggests the fix a proposing one stores; a fix in force
  (``improvement_status`` applied or verified) is said to be so, never suggested again; while
  a person's rejection stands there is none (``no_fix_reason`` says so,
  ``improvement_status`` ``rejected``), as there is no proposal;
* ``detect(notify=True)`` notifies at most once per pattern per ``cooldown_minutes``,
  whoever asks (CLI, MCP, daemon), through the same cooldown record;
* a rejected pattern is not proposed again until its evidence changes (see
  :func:`selfheal_plugin.lifecycle.proposals.rejection_stands`);
* a strategy that takes over an error type supersedes the open proposals of the strategy it
  replaced (status ``superseded``, kept in history) when, and in the transaction where, its
  own proposal is stored: a failing one supersedes nothing;
* ``canary_promote`` refuses unless the canary's verdict is keep (``force=True`` overrides
  and is recorded); after a risky ``test`` the next step is a canary wherever one can run
  (``apply`` only for a change no canary can run, e.g. manual steps), one choice for
  ``test`` and ``health`` (:meth:`SelfHeal._next_step`).
"""
from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from selfheal_plugin.errors import LifecycleError, NotFoundError, UsageError
from selfheal_plugin.analysis.patterns import Pattern, detect_failure_patterns, get_pattern, pattern_details
from selfheal_plugin.history import schema
from selfheal_plugin.history.clock import wall_clock
from selfheal_plugin.history.connection import check_writable, connect, malformed_runs
from selfheal_plugin.history.improvements import IN_FORCE, ImprovementStore, already_fixed
from selfheal_plugin.history.settings import Settings, load_settings
from selfheal_plugin.history.times import parse_since
from selfheal_plugin.lifecycle import proposals  # the other lifecycle modules: imported by the verbs that use them,
# so that a command pays only for its own (detect does not import git, the simulator or the A/B judge)
from selfheal_plugin.lifecycle.cooldown import claim_notifications, release_notifications
from selfheal_plugin.lifecycle.recovery import recover
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import HistoryWindow, Proposal, StrategyError
from selfheal_plugin.results import (
    AbExperiment, AbList, AgentMetrics, ApplyPlan, ApplyResult, DetectResult, FixPack, HealthDashboard,
    ImportResult, ImprovementRow, LearnResult, PatternDetails, PluginsReport, PromoteResult, ProposalOutcome,
    RollbackPlan, RollbackResult, RuleResult, RulesResult, RunHealth, StatusResult, SyncResult, TestResult,
    ToolReliability, VerifyResult,
)
from selfheal_plugin.steps import option, step

EXPERIMENT_MODES = ("canary", "shadow")
TEST_MODES = ("simulation", *EXPERIMENT_MODES)
# what `verify --early` (and the MCP tool's `early`) does, said once for both shells
EARLY_HELP = ("Accept a significant improvement before the window after the apply has ended "
              "(otherwise it is provisional: extend monitoring).")


class SelfHeal:
    """selfheal over one runtime home.

    :param home: the runtime home (default ``$BINKS_HOME`` or ``~/.binks``).
    :param db: the run-history database (default ``HOME/conversations.db``).
    :param settings: ready settings (then ``home``, ``db`` and ``overrides`` are ignored).
    :param clock: a callable returning the current UTC instant (a
        :class:`~selfheal_plugin.history.clock.SimulatedClock` in the testbed).
    :param warn: receives one line per recovered operation (the CLI prints them on stderr).
    :param overrides: ``[self_heal]`` values for this session (``lookback``,
        ``min_occurrences``, ``confidence_threshold``, ...), as the CLI's flags give them.
    """

    def __init__(self, home: str | Path | None = None, db: str | Path | None = None, *,
                 settings: Settings | None = None, clock: Callable[[], datetime] | None = None,
                 warn: Callable[[str], None] | None = None, **overrides: Any) -> None:
        self.settings = settings or load_settings(home, db, **overrides)
        self.clock = clock or wall_clock
        parse_since(self.settings.lookback)  # a bad window is a usage error before anything is opened
        self.conn: sqlite3.Connection = connect(self.settings.db_path)
        try:
            self.recovered = recover(self.conn, self.settings, warn=warn)
        except BaseException:
            self.conn.close()
            raise

    # -------------------------------------------------------------- plumbing

    def __enter__(self) -> "SelfHeal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def now(self) -> datetime:
        return self.clock()

    # -------------------------------------------------------------- detection

    def detect(self, *, propose: bool = False, notify: bool = False, since: str | None = None,
               progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None,
               runs_limit: int | None = schema.default("limit"), **filters: Any) -> DetectResult:
        """Recurring failure patterns of the window, each with its one suggested fix.

        ``propose`` stores a proposal for every pattern (idempotent); ``notify`` fires
        ``patterns_detected`` for the patterns whose cooldown has passed. ``progress`` sees the
        index scan; ``should_stop`` is asked before each proposal (``stopped`` in the result says
        it stopped there). ``runs_limit`` bounds each pattern's ``affected_runs`` to its latest runs,
        by default the latest 20 (the ``limit`` flag's default, as ``detect --json`` and the MCP
        tool list them); ``None`` lists every one (``affected_run_count`` is the total;
        :meth:`show` lists them all). ``filters`` go to
        :func:`~selfheal_plugin.analysis.patterns.detect_failure_patterns` (``error_type``,
        ``tool_name``, ...)."""
        s, now = self.settings, self.now()
        found = detect_failure_patterns(self.conn, since=since or s.lookback, min_occurrences=s.min_occurrences,
                                        confidence_threshold=s.confidence_threshold, now=now, progress=progress,
                                        lazy_detail=True, **filters)
        # one window for proposing and suggesting: each tool's calls are read once, each
        # pattern's strategy runs once (a proposal a rejection kept out is still the suggestion)
        history = proposals.history_window(self.conn, s, since, now=now)
        outcomes: list[ProposalOutcome] = []
        made: dict[str, Proposal | StrategyError] = {}
        if propose and found.patterns:
            outcomes = self._propose_all(found.patterns, since=since, now=now, should_stop=should_stop,
                                         history=history, made=made)
        self._attach_fixes(found.patterns, history, made)
        notified: list[str] = []
        undelivered: list[str] = []
        if notify and found.patterns:
            claimed = set(claim_notifications(self.conn, [p.id for p in found.patterns], now, s.cooldown_minutes))
            fresh = [p for p in found.patterns if p.id in claimed]
            notified = [p.id for p in fresh]
            if fresh:
                delivered = plugins.fire("patterns_detected", patterns=fresh, found=len(found.patterns), settings=s)
                if s.notify_patterns and not any(delivered):  # the summary reached no sink: not told
                    release_notifications(self.conn, notified, now)
                    notified, undelivered = [], notified
        return {"since": found.since, "patterns": [p.to_dict(runs_limit=runs_limit) for p in found.patterns], "proposals": outcomes,
                "notified": notified, "undelivered": undelivered, "candidates": found.candidates, "failing_signatures": found.failing,
                "skipped_rows": found.scanned.total_bad_rows, "skipped_runs": malformed_runs(self.conn),
                "stopped": len(outcomes) < len(found.patterns) if propose else False}

    def show(self, pattern_id: str, since: str | None = None) -> PatternDetails:
        """One pattern: message templates, context, affected runs, and its suggested fix."""
        return pattern_details(self._pattern_with_fix(pattern_id, since))

    def _pattern_with_fix(self, pattern_id: str, since: str | None = None) -> Pattern:
        """One pattern of the window with its one suggested fix (:meth:`_attach_fixes`)."""
        now = self.now()
        pattern = get_pattern(self.conn, pattern_id, since=since or self.settings.lookback, now=now)
        self._attach_fixes([pattern], proposals.history_window(self.conn, self.settings, since, now=now))
        return pattern

    def _attach_fixes(self, patterns: list[Pattern], history: HistoryWindow,
                      made: dict[str, Proposal | StrategyError] | None = None) -> None:
        """Each pattern's one suggested fix (:func:`~selfheal_plugin.lifecycle.proposals.attach_fixes`):
        its open proposal's description, or its verified fix's while that stands (both may be
        in force: ``improvement_status``), else that of the proposal its strategy makes now
        (not stored), or made already in this command (``made``, see
        :func:`~selfheal_plugin.lifecycle.proposals.made_by_strategies`), unless a rejection
        stands."""
        proposals.attach_fixes(self.conn, patterns, history, made)

    # -------------------------------------------------------------- proposals

    def propose(self, pattern_id: str, since: str | None = None) -> ProposalOutcome:
        """Store a proposal for one pattern (the open one when it exists)."""
        pattern = get_pattern(self.conn, pattern_id, since=since or self.settings.lookback, now=self.now())
        outcome = self._propose_all([pattern], since=since, now=self.now())[0]
        if outcome.get("error"):
            raise proposals.StrategyError(outcome["error"])
        if outcome.get("skipped"):
            raise LifecycleError(outcome["skipped"])
        return outcome

    def _propose_all(self, patterns: list[Pattern], *, since: str | None, now: datetime,
                     should_stop: Callable[[], bool] | None = None, history: HistoryWindow | None = None,
                     made: dict[str, Proposal | StrategyError] | None = None) -> list[ProposalOutcome]:
        """Outcomes of :func:`~selfheal_plugin.lifecycle.proposals.propose_all`; ``made`` receives
        what the strategies answered for the patterns nothing was stored for."""
        results = proposals.propose_all(self.conn, self.settings, patterns, since=since, now=now,
                                        should_stop=should_stop, history=history)
        if made is not None:
            made.update(proposals.made_by_strategies(patterns, results))
        out: list[ProposalOutcome] = []
        for pattern, res in zip(patterns, results):
            if isinstance(res, proposals.StrategyError):
                out.append({"pattern_id": pattern.id, "error": str(res)})
            else:
                out.append(res.to_dict())
        return out

    def improvements(self, status: str | None = None, limit: int | None = schema.default("limit")
                     ) -> list[ImprovementRow]:
        """Stored improvements (ours and the runtime's older rows), the latest status change first
        (applied, verified, rolled back, tested, rejected, proposed: whichever happened last), the
        order of the dashboard's ``recent_improvements`` too."""
        return proposals.list_improvements(self.conn, status=status, limit=limit)

    # -------------------------------------------------------------- test, apply, verify, undo

    def test(self, improvement_id: str, mode: str = "simulation", *, since: str | None = None,
             fraction: float | None = None) -> TestResult:
        """``simulation`` replays the window with the change; ``canary`` and ``shadow`` start an
        experiment section in config.toml (a git commit) — see :meth:`canary_start`."""
        from selfheal_plugin.lifecycle import simulation
        if mode in EXPERIMENT_MODES:
            return self.canary_start(improvement_id, mode=mode, fraction=fraction)
        if mode != "simulation":
            raise UsageError(f"unknown test mode {mode!r}: use {', '.join(TEST_MODES)}")
        if fraction is not None:
            raise UsageError("--fraction is for canary mode only")
        check_writable(self.conn)  # the result is stored: a read-only history is one line before the work
        result = simulation.test_improvement(self.conn, self.settings, improvement_id, since=since, now=self.now())
        result["next_step"] = self._after_test(improvement_id, result["recommendation"])
        return result

    def _after_test(self, improvement_id: str, recommendation: str) -> str:
        """What to do after a test said ``recommendation`` (:meth:`_next_step`)."""
        return self._next_step(ImprovementStore(self.conn).get(improvement_id), recommendation)[1]

    def _next_step(self, imp: Any, recommendation: str | None = None) -> tuple[str, str]:
        """The one next step for an open proposal, as (``reject`` | ``canary`` | ``apply``, the
        step): reject what its test rejected, try a risky change on a share of runs first when
        it can run as a canary, else apply it (knowingly: a change of manual steps only asks
        what was done, ``--changes-made``). ``recommendation`` is the test's just made, else
        the one stored on a tested proposal. What ``test`` says next and what ``health``
        recommends for a pattern with an open proposal both come from here."""
        from selfheal_plugin.lifecycle import canary, configedit
        if recommendation is None and imp.status == "tested":
            recommendation = (imp.test_result or {}).get("recommendation")
        if recommendation == "reject":
            return "reject", step("reject", imp.id)
        if recommendation == "risky" and canary.experiment_refusal(imp) is None:
            return "canary", step("test", imp.id, mode="canary")
        try:
            manual_only = not configedit.split_changes(imp.changes)[0]
        except configedit.ChangeError:  # apply says what is wrong with it
            manual_only = False
        return "apply", step("apply", imp.id, **({"changes_made": "TEXT"} if manual_only else {}))

    def plan_apply(self, improvement_id: str) -> ApplyPlan:
        """What :meth:`apply` would write (diff, repository, manual steps), changing nothing."""
        from selfheal_plugin.lifecycle import apply as applying
        return applying.plan_apply(self.conn, self.settings, improvement_id)

    def apply(self, improvement_id: str, changes_made: str | None = None, *,
              expected_sha256: str | None = None) -> ApplyResult:
        """Edit config.toml and commit it; ``expected_sha256`` refuses a file that changed since
        the plan was shown."""
        from selfheal_plugin.lifecycle import apply as applying
        return applying.apply_improvement(self.conn, self.settings, improvement_id, changes_made,
                                          expected_sha256=expected_sha256, now=self.now())

    def verify(self, improvement_id: str, window_days: float | None = None, *, early: bool = False) -> VerifyResult:
        """Before vs after the apply (or canary vs control, or what a shadow observed)."""
        from selfheal_plugin.lifecycle import canary, verification
        imp = ImprovementStore(self.conn).get(improvement_id)
        if imp.status in EXPERIMENT_MODES:
            return canary.verify_experiment(self.conn, self.settings, imp, window_days, now=self.now())
        return verification.verify_improvement(self.conn, self.settings, improvement_id, window_days, early=early,
                                               now=self.now())

    def plan_rollback(self, improvement_id: str) -> RollbackPlan:
        """What :meth:`rollback` would do (method, diff), changing nothing; its refusals first."""
        from selfheal_plugin.lifecycle import apply as applying
        return applying.plan_rollback(self.conn, self.settings, improvement_id)

    def rollback(self, improvement_id: str, reason: str | None = None) -> RollbackResult:
        """Revert the improvement's commit (or the inverse edit when config.toml moved on)."""
        from selfheal_plugin.lifecycle import apply as applying
        return applying.rollback_improvement(self.conn, self.settings, improvement_id, reason=reason,
                                             now=self.now())

    def reject(self, improvement_id: str) -> StatusResult:
        """Reject a proposal; the pattern is not proposed again until its evidence changes."""
        from selfheal_plugin.lifecycle import apply as applying
        return applying.reject_improvement(self.conn, self.settings, improvement_id)

    # -------------------------------------------------------------- automatic decisions

    def auto_apply(self, *, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Test and apply what is low-risk, confident and simulated safe
        (:mod:`~selfheal_plugin.lifecycle.autopilot`); lists of what was tested, applied,
        held back (with the reason) and refused."""
        from selfheal_plugin.lifecycle import autopilot
        report = autopilot.AutopilotReport()
        autopilot.auto_apply(self.conn, self.settings, self.now(), report, should_stop=should_stop)
        return {k: v for k, v in report.to_dict().items() if v}

    def verify_due(self, *, retry_seconds: float = 3600.0,
                   should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Verify what is due: keep, extend monitoring, conclude inconclusive, or roll back."""
        from selfheal_plugin.lifecycle import autopilot
        report = autopilot.AutopilotReport()
        autopilot.verify_due(self.conn, self.settings, self.now(), report, retry_seconds=retry_seconds,
                             should_stop=should_stop)
        return {k: v for k, v in report.to_dict().items() if v}

    # -------------------------------------------------------------- canary and shadow

    def canary_start(self, improvement_id: str, *, mode: str = "canary", fraction: float | None = None) -> TestResult:
        """Write the change under ``[canary."ID"]`` (a ``fraction`` of runs) or ``[shadow."ID"]``."""
        from selfheal_plugin.lifecycle import canary
        result = canary.test_experiment(self.conn, self.settings, improvement_id, mode, fraction=fraction,
                                        now=self.now())
        result["next_step"] = step("verify", improvement_id)
        return result

    def canary_promote(self, improvement_id: str, *, force: bool = False,
                       changes_made: str | None = None) -> PromoteResult:
        """End the canary and apply the change to every run — only when its verdict is keep."""
        from selfheal_plugin.lifecycle import canary
        canary.running_experiment(self.conn, improvement_id, "promoted")  # before its verdict is asked for
        verdict = self.verify(improvement_id)
        recommendation = verdict.get("recommendation")
        if recommendation != "keep" and not force:
            raise LifecycleError(f"{improvement_id}: the canary's verdict is {recommendation} "
                                 f"({verdict.get('reason') or 'not enough evidence'}); promote anyway with {option('force')}")
        note = changes_made
        if recommendation != "keep":
            note = "; ".join(x for x in (changes_made, f"promoted with --force (verdict {recommendation})") if x)
        result = canary.promote_experiment(self.conn, self.settings, improvement_id, changes_made=note, now=self.now())
        return {**result, "verdict": recommendation, "forced": recommendation != "keep"}

    def canary_drop(self, improvement_id: str) -> StatusResult:
        """End the canary or shadow without applying; the improvement goes back to tested."""
        from selfheal_plugin.lifecycle import canary
        return canary.drop_experiment(self.conn, self.settings, improvement_id, now=self.now())

    # -------------------------------------------------------------- health

    def dashboard(self, *, detailed: bool = False, since: str | None = None, improvements_limit: int = 5,
                  progress: Callable[[int, int], None] | None = None) -> HealthDashboard:
        """Health over the window: score, trend, success rate, worst tools, recent improvements."""
        from selfheal_plugin.analysis import health
        return health.get_health_dashboard(self.conn, detailed=detailed, since=since or self.settings.lookback,
                                           now=self.now(), progress=progress, improvements_limit=improvements_limit)

    def run_health(self, run_id: str, *, progress: Callable[[int, int], None] | None = None) -> RunHealth:
        """Health score (0–100) and issues of one run (a unique id prefix is enough)."""
        from selfheal_plugin.analysis import health
        return health.analyze_run_health(self.conn, run_id, progress=progress, suggest=self._suggested_fix,
                                         next_step=self._next_step)

    def _suggested_fix(self, pattern_id: str) -> str | None:
        """The fix ``detect`` and ``show`` suggest for a pattern of the window, or that they
        suggest none while a rejection stands (None: no failure of it in the window, or no
        strategy answers)."""
        try:
            pattern = self._pattern_with_fix(pattern_id)  # what show reports, without its details
        except NotFoundError:
            return None
        if pattern.suggested_fix is None and pattern.improvement_status == "rejected":
            return f"No fix suggested: {pattern.no_fix_reason}"
        if pattern.improvement_status in IN_FORCE:  # in config.toml already: not a change to make again
            return already_fixed(pattern.improvement_id, pattern.improvement_status, pattern.suggested_fix)
        return pattern.suggested_fix

    def agent_metrics(self, since: str | None = None) -> AgentMetrics:
        from selfheal_plugin.analysis import health
        return health.compute_agent_metrics(self.conn, since=since or self.settings.lookback, now=self.now())

    def tool_reliability(self, since: str | None = None, *,
                         progress: Callable[[int, int], None] | None = None) -> ToolReliability:
        from selfheal_plugin.analysis import health
        return health.compute_tool_reliability(self.conn, since=since or self.settings.lookback, now=self.now(),
                                               progress=progress)

    # -------------------------------------------------------------- plugins

    def plugins(self) -> PluginsReport:
        """Loaded plugins, their hooks, the strategy for each error type, and plugin errors."""
        return plugins.describe(self.settings)


    # -------------------------------------------------------------- cross-project learning

    def export_pack(self) -> FixPack:
        """This home's fix rules as a portable pack (kind, template, description, evidence with
        sample sizes; never paths, secrets or the local enabled flags)."""
        from selfheal_plugin.lifecycle import sharing
        pack, _skipped = sharing.export_pack(self.conn, self.now())
        return pack  # type: ignore[return-value]

    def import_pack(self, data: bytes | str | dict[str, Any], where: str = "the pack") -> ImportResult:
        """Validate a whole fix pack, then merge all its rules in one transaction; evidence it
        claims for this home is ignored (our own measurement wins)."""
        from selfheal_plugin.lifecycle import sharing
        return sharing.import_pack(self.conn, data, where, self.now())  # type: ignore[return-value]

    def sync(self, remote: str | None = None) -> SyncResult:
        """Share packs through a git remote (the remembered one without ``remote``): fetch, read
        the other homes' packs, push ours, then merge theirs; a refusal changes nothing."""
        from selfheal_plugin.lifecycle import sharing
        return sharing.sync(self.conn, self.settings, remote, self.now())  # type: ignore[return-value]

    def sync_remembered(self) -> SyncResult | None:
        """:meth:`sync` with the remembered remote when one is set, else nothing (the daemon's
        scheduled sync)."""
        from selfheal_plugin.lifecycle import sharing
        return sharing.sync_remembered(self.conn, self.settings, self.now())  # type: ignore[return-value]
    # -------------------------------------------------------------- A/B experiments

    def ab_start(self, pattern_id: str, arms: list[str] | None = None, *,
                 fraction: float | None = None) -> AbExperiment:
        """Run two or more fixes of one pattern as arms of an experiment beside a control
        (``[ab."ID"]`` in config.toml, a git commit); without ``arms`` the strategies offer them."""
        from selfheal_plugin.lifecycle import ab
        return ab.start_ab(self.conn, self.settings, pattern_id, arms, fraction=fraction, now=self.now())

    def ab_status(self, experiment_id: str) -> AbExperiment:
        """One experiment with its current verdict (judged now while it runs)."""
        from selfheal_plugin.lifecycle import ab
        return ab.status_of(self.conn, self.settings, ab.ensure_known(self.conn, experiment_id), now=self.now())

    def ab_list(self, experiment_id: str | None = None) -> AbList:
        """The answer to ``ab status [ID]``, one shape for the CLI's ``--json`` and the MCP
        tool: every experiment, newest first, or only ``experiment_id``; running ones judged now."""
        from selfheal_plugin.lifecycle import ab
        if experiment_id:
            return {"experiments": [self.ab_status(experiment_id)]}
        return {"experiments": [ab.status_of(self.conn, self.settings, e, now=self.now())
                                for e in ab.all_experiments(self.conn)]}

    def ab_promote(self, experiment_id: str, *, force: bool = False) -> AbExperiment:
        """End the experiment and apply its winner (refused without a significant winner
        unless ``force``: then the best observed arm, recorded)."""
        from selfheal_plugin.lifecycle import ab
        return ab.end_ab(self.conn, self.settings, experiment_id, "promoted", force=force, now=self.now())

    def ab_drop(self, experiment_id: str) -> AbExperiment:
        """End the experiment without applying anything; every arm goes back to what it was."""
        from selfheal_plugin.lifecycle import ab
        return ab.end_ab(self.conn, self.settings, experiment_id, "dropped", now=self.now())

    def ab_judge_due(self, *, should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The daemon's round over running experiments (see
        :func:`~selfheal_plugin.lifecycle.autopilot.judge_experiments`)."""
        from selfheal_plugin.lifecycle import autopilot
        report = autopilot.AutopilotReport()
        autopilot.judge_experiments(self.conn, self.settings, self.now(), report, should_stop=should_stop)
        return {k: v for k, v in report.to_dict().items() if v}
    # -------------------------------------------------------------- learning from success

    def learn(self, since: str | None = None, until: str | None = None, *, record: bool = True) -> LearnResult:
        """What got better without us between the window before ``since`` and the one since it
        (signatures, tools, workflows), the person's config change that explains each (or why
        none does), the rules learned (stored unless ``record`` is False) and where enabled
        rules could apply now (:mod:`~selfheal_plugin.lifecycle.learning`)."""
        from selfheal_plugin.lifecycle import learning
        now = self.now()
        end = parse_since(until, now) if until else None
        return learning.learn(self.conn, self.settings, since=since, until=end, now=now, record=record)

    def rules(self) -> RulesResult:
        """Stored fix rules (learned, verified and imported), enabled or not."""
        from selfheal_plugin.lifecycle import learning
        return {"rules": learning.rules_list(self.conn)}

    def set_rule_enabled(self, rule_id: str, enabled: bool) -> RuleResult:
        """Turn a rule on or off (a disabled rule is never a prior or a proposal); one that
        already is so is left as it is (``changed`` False)."""
        from selfheal_plugin.lifecycle import learning
        return learning.set_rule_enabled(self.conn, rule_id, enabled)  # type: ignore[return-value]
