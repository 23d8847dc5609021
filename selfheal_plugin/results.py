"""The typed results of :class:`~selfheal_plugin.service.SelfHeal`, one per verb.

They are ``TypedDict``\\ s: the values the engine builds are plain JSON-ready dicts, so
``--json`` prints them as they are (no copies), and the MCP server declares them as its
tools' return types, from which the SDK derives the output schemas. The fields listed are
the documented ones; a result may carry more (``__pydantic_config__`` says so to the
schema, without importing pydantic here).
"""
from __future__ import annotations

from typing import Any, Literal

from typing_extensions import TypedDict  # pydantic derives schemas from these only (Python < 3.12)

_OPEN = {"extra": "allow"}


class FailurePattern(TypedDict, total=False):
    id: str  # error_type:tool_name
    error_type: str
    tool_name: str
    occurrences: int
    correlation_score: float
    confidence: float
    failure_rate: float
    first_seen: str
    last_seen: str
    affected_runs: list[str]
    affected_run_count: int
    suggested_fix: str | None  # the open proposal's description, else that of the strategy's proposal now
    suggested_by: Literal["proposal", "strategy"] | None
    # the open proposal (or standing verified fix) behind suggested_fix, or the rejected one withholding it
    improvement_id: str | None
    # its status: applied = the fix is in force already, being verified; verified = in force and
    # kept, until the pattern keeps failing after it; rejected = a person's rejection still
    # stands (suggested_fix None)
    improvement_status: str | None
    # the open proposal's note: a fix with the same changes was rolled back or rejected within
    # the re-apply cooldown (as in ProposalOutcome); None otherwise
    same_change_undone: dict[str, Any] | None
    no_fix_reason: str | None  # why suggested_fix is None: the rejection that stands, or the strategy's error
    # what the failures are, read from the evidence (the runtime's label is one input):
    # missing_resource | permission | rate_limited | transient_upstream | slow_tail | hang |
    # server_down | invalid_arguments | unknown
    failure_kind: str | None
    # the evidence behind the kind (selfheal_plugin.analysis.evidence.gather): kind_votes,
    # reasons, templates (with kinds), codes (errno, http_status, jsonrpc), paths
    # (exists_now), determinism (verdict and counts), server (streak_share), spacing_s,
    # retry_after_s, reset_in_s, durations
    evidence: dict[str, Any] | None


class ProposalOutcome(TypedDict, total=False):
    improvement_id: str
    pattern_id: str | None
    status: str
    description: str
    expected_impact: str | None
    changes_required: list[str]
    risk_level: str | None
    strategy: str | None
    confidence: float | None
    changes: list[dict[str, Any]]
    expected_reduction: float | None
    failure_kind: str | None  # the pattern's kind when it was proposed
    proposed_at: str | None
    created: bool  # False when an open proposal for the pattern already existed
    # a fix with the same changes was rolled back or rejected within the re-apply cooldown
    # (lifecycle.cooldown): improvement_id, status, note ("a fix with the same changes (imp-…)
    # was rolled back on …"); None otherwise
    same_change_undone: dict[str, Any] | None
    skipped: str | None  # why nothing was proposed (a rejection that still stands)
    error: str | None  # a strategy that failed for this pattern


class DetectResult(TypedDict, total=False):
    since: str
    patterns: list[FailurePattern]
    proposals: list[ProposalOutcome]
    notified: list[str]  # pattern ids whose notification fired this time (the cooldown let them)
    undelivered: list[str]  # pattern ids whose summary no notify hook delivered: told by the next detect
    candidates: int  # signatures with at least min_occurrences failures, before the confidence filter
    failing_signatures: int  # signatures with a failed call in the window, before min_occurrences
    skipped_rows: int
    skipped_runs: int  # malformed runs rows, skipped (history.connection.wellformed_run_sql)
    stopped: bool  # proposing stopped early (the daemon was asked to stop)


class PatternDetails(FailurePattern, total=False):
    templates: list[dict[str, Any]]
    context: dict[str, Any]
    runs: list[dict[str, Any]]


class ImprovementRow(TypedDict, total=False):
    id: str
    status: str
    description: str
    pattern_id: str | None
    strategy: str | None
    risk_level: str | None
    expected_impact: str | None
    actual_impact: str | None
    proposed_at: str | None
    applied_at: str | None
    commit_sha: str | None
    same_change_undone: dict[str, Any] | None  # as in ProposalOutcome: the same change was undone before


class TestResult(TypedDict, total=False):
    improvement_id: str
    test_mode: str
    simulated_success_rate: float | None
    baseline_success_rate: float | None
    expected_improvement: str | None
    recommendation: str  # safe_to_apply | risky | reject
    failure_kind: str | None  # the pattern's kind when it was proposed ("unknown" stays unknown)
    # 95% intervals: simulated_success_rate and improvement (the replayed window), and
    # next_window_success_rate (a prediction interval for the next next_window_runs runs)
    interval: dict[str, Any] | None
    next_step: str | None  # the command to run next (never apply after a risky result)
    model_source: str  # "selfheal replay" or "strategy NAME": who simulated the change
    baseline_source: str  # "history": the baseline is the window's own runs, whoever simulated


class ApplyPlan(TypedDict, total=False):
    improvement_id: str
    config_path: str
    diff: str
    manual: list[str]
    # what apply's result says too (ApplyResult): shown before apply asks
    test: dict[str, Any] | None
    test_note: str
    same_change_undone: dict[str, Any] | None  # as in ProposalOutcome
    warnings: list[str]


class RollbackPlan(TypedDict, total=False):
    improvement_id: str
    status: str
    description: str
    commit_sha: str | None
    method: str  # revert | inverse-edit | manual
    diff: str


class ApplyResult(TypedDict, total=False):
    improvement_id: str
    status: str
    applied_at: str | None
    verification_scheduled: str | None
    commit_sha: str | None
    test: dict[str, Any] | None  # its last test when it was applied: recommendation, reason; None: never tested
    test_note: str  # that in one line: "Its test said: risky — …" or "Not tested: … predicts its effect …"
    # as in ProposalOutcome: a fix with the same changes was rolled back or rejected lately; None otherwise
    same_change_undone: dict[str, Any] | None
    # one line each: test_note unless the test said safe_to_apply, and "Note: " + same_change_undone's note
    warnings: list[str]


class VerifyResult(TypedDict, total=False):
    improvement_id: str
    expected_impact: str | None
    actual_impact: str
    verification_status: str  # verified | failed | inconclusive
    recommendation: str  # keep | rollback | extend
    metrics: dict[str, Any]
    previous_recommendation: str | None  # the last verification's, None before the first


class RollbackResult(TypedDict, total=False):
    improvement_id: str
    status: str
    method: str
    rollback_sha: str | None


class StatusResult(TypedDict, total=False):
    improvement_id: str
    status: str


class PromoteResult(ApplyResult, total=False):
    verdict: str  # the canary's verify recommendation when it was promoted
    forced: bool
    ended: dict[str, Any]


class RunHealth(TypedDict, total=False):
    run_id: str
    health_score: float
    issues: list[dict[str, Any]]


class AgentMetrics(TypedDict, total=False):
    agents: list[dict[str, Any]]


class ToolReliability(TypedDict, total=False):
    tools: list[dict[str, Any]]
    skipped_rows: int


class HealthDashboard(TypedDict, total=False):
    overall_health_score: float | None
    trend: str
    success_rate: float | None
    recent_improvements: list[dict[str, Any]]


class PluginsReport(TypedDict, total=False):
    plugins: list[dict[str, Any]]
    strategies: list[dict[str, Any]]
    kind_strategies: list[dict[str, Any]]  # failure kind -> the strategy registered for it (kind, strategy, plugin)
    hooks: list[dict[str, Any]]
    errors: list[dict[str, Any]]


for _t in (FailurePattern, ProposalOutcome, DetectResult, PatternDetails, ImprovementRow, TestResult, ApplyPlan,
           ApplyResult, VerifyResult, RollbackResult, StatusResult, PromoteResult, RunHealth, AgentMetrics,
           ToolReliability, HealthDashboard, PluginsReport):
    _t.__pydantic_config__ = _OPEN  # type: ignore[attr-defined]


# ------------------------------------------------------------------ fix packs and sync (lifecycle/sharing.py)


class FixPack(TypedDict, total=False):
    format: str  # "selfheal-fix-pack"
    version: int
    exported_at: str
    home: str  # the exporting home's id (origin of its evidence)
    rules: list[dict[str, Any]]  # id, failure_kind, error_type, description, template, evidence


class ImportResult(TypedDict, total=False):
    home: str  # the pack's home id
    own_home: str
    rules: int  # rules in the pack
    own_entries_ignored: int  # evidence the pack claimed for this home (ours wins)
    added: list[dict[str, Any]]  # id, failure_kind, description, places, summary
    updated: list[dict[str, Any]]
    unchanged: list[dict[str, Any]]


class SyncResult(ImportResult, total=False):
    remote: str
    clone: str  # the bare local copy, BINKS_HOME/selfheal/sync/<hash>
    packs_read: list[str]
    packs_refused: list[dict[str, Any]]  # pack, reason
    pushed: bool  # False when the remote already had this home's pack as it is
    attempts: int  # 2 after a non-fast-forward push was retried
    skipped_rules: int  # stored rules left out of our pack because they no longer validate


for _t in (FixPack, ImportResult, SyncResult):
    _t.__pydantic_config__ = _OPEN  # type: ignore[attr-defined]


class AbExperiment(TypedDict, total=False):
    """An A/B experiment of fix strategies (``ab start|status|promote|drop``)."""
    experiment_id: str  # ab-YYYYMMDD-xxxxxxxx
    pattern_id: str
    status: str  # running | promoted | dropped (starting/ending while its section is being committed)
    arms: list[dict[str, Any]]  # improvement_id, fraction, status_before, description, strategy
    started_at: str
    ended_at: str | None
    winner: str | None
    forced: int
    start_sha: str | None
    end_sha: str | None
    config_section: str
    verdict: dict[str, Any] | None  # verdict (winner|extend|drop), reason, groups, arms, p-values
    started: bool  # ab start: the section was written now
    diff: str
    end_commit_sha: str | None  # promote/drop
    applied: dict[str, Any] | None  # promote: the winner's apply result


class AbList(TypedDict, total=False):
    experiments: list[AbExperiment]


for _t in (AbExperiment, AbList):
    _t.__pydantic_config__ = _OPEN  # type: ignore[attr-defined]


class LearnResult(TypedDict, total=False):
    """``agent self-heal learn``: what improved between two windows, why, and the rules learned."""
    since: str
    until: str
    windows: dict[str, list[str]]  # before/after: [start, end) of each, whole hours
    tested: int  # subjects with enough failures before to be tested
    significance_level: float
    correction: str
    test: str
    improved: list[dict[str, Any]]  # kind, subject, rates, p_value, attributed, explanation, commit, rule_id
    commits: list[dict[str, Any]]  # a person's commits to config.toml in the windows
    learned_rules: list[dict[str, Any]]
    applicable: list[dict[str, Any]]  # enabled rules x patterns of their kind still failing
    suggestions: list[str]
    recorded: bool


class RulesResult(TypedDict, total=False):
    rules: list[dict[str, Any]]


class RuleResult(TypedDict, total=False):
    rule: dict[str, Any]
    changed: bool  # False: the rule already was enabled/disabled so; nothing was written


for _t in (LearnResult, RulesResult, RuleResult):
    _t.__pydantic_config__ = _OPEN  # type: ignore[attr-defined]
