"""Turn lifecycle events into notifications (bodies as in the design document).

Each event is sent through the ``notify`` hook, so the inbox and any other sink get it.
Bodies are Markdown: text that comes from the history (pattern ids, tool names,
descriptions and changes that quote them) goes through ``markdown_inline``, so a tool
name with a newline cannot forge a heading, and HTML in it stays text.
The ``notify_patterns``, ``notify_applied``, ``notify_verified`` and ``notify_rolled_back``
settings switch them off one by one.
"""
from __future__ import annotations

from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.history.improvements import IN_FORCE, already_fixed
from selfheal_plugin.plugins.manager import Notification, notify
from selfheal_plugin.plugins.strategy import Change
from selfheal_plugin.steps import step
from selfheal_plugin.history.text import format_p, markdown_inline as md


def _short_sha(sha: str | None) -> str | None:
    return sha[:7] if sha else None


def _changes_text(improvement: Any, settings: Any) -> str:
    if improvement.changes_made:
        return improvement.changes_made
    parts = []
    for raw in improvement.changes or []:
        try:
            change = Change.from_dict(raw)
        except (TypeError, ValueError):
            continue
        if change.kind == "config":
            parts.append(f"Updated {settings.home / change.file} " + change.describe().split(": ", 1)[1])
        else:
            parts.append(change.describe())
    return "; ".join(parts) or "none recorded"


def _changes_lines(improvement: Any, settings: Any) -> list[str]:
    """``Changes: …`` on one line, or a list when the record has several lines (a note and
    the keys updated): each line escaped, the line breaks real ones."""
    lines = [line for line in _changes_text(improvement, settings).splitlines() if line.strip()] or ["none recorded"]
    if len(lines) == 1:
        return [f"Changes: {md(lines[0])}"]
    return ["Changes:", *[f"- {md(line)}" for line in lines]]


def _kind(pattern: Any) -> str:
    """The pattern's failure kind with its evidence; an unknown says so."""
    ev = getattr(pattern, "evidence", None) or {}
    return ev.get("summary") or getattr(pattern, "failure_kind", None) or "unknown"


_VERDICT = {"rollback": "roll it back", "extend": "extend monitoring"}  # a verification's title, but a keep's


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, (int, float)) else "n/a"


@hookimpl
def patterns_detected(patterns: list[Any], found: int, settings: Any) -> list[Any] | None:
    """The inbox summary of the patterns; returns where it was delivered (``[]``: nowhere)."""
    if not settings.notify_patterns or not patterns:
        return None
    # the count the detection printed; the ones listed are those the shared cooldown let through
    title = head = f"Detected {max(found, len(patterns))} failure pattern(s)"
    if found > len(patterns):
        title = f"{title}, {len(patterns)} new to the inbox"
        head = f"{title} ({found - len(patterns)} told within the last {settings.cooldown_minutes:g} minutes)"
    # a command that shows each listed pattern, whether or not a proposal was stored for it
    lines = [f"{head}. View details: {step('show', 'PATTERN')}", ""]
    for p in patterns:
        line = (f"- {md(p.id)}: {p.occurrences} occurrence(s) in {len(p.affected_runs)} run(s), "
                f"confidence {_pct(p.confidence)}, kind {md(_kind(p))}")
        if p.suggested_fix and getattr(p, "improvement_status", None) in IN_FORCE:
            # its failures in the window may all predate the fix: say it is fixed, suggest nothing
            line += f". {already_fixed(p.improvement_id, p.improvement_status, p.suggested_fix, md)}"
        elif p.suggested_fix:
            line += f". Fix: {md(p.suggested_fix)}"
        elif getattr(p, "no_fix_reason", None):  # withheld (a rejection that stands, a strategy's error): say why
            line += f". Fix: none — {md(p.no_fix_reason)}"
        lines.append(line)
    return notify(Notification(title=title, body="\n".join(lines),
                               tags=["self-heal", "patterns"], priority="high"), settings)


@hookimpl
def improvement_applied(improvement: Any, settings: Any) -> None:
    if not settings.notify_applied:
        return
    lines = [f"Applied improvement {md(improvement.id)}:", f"Description: {md(improvement.description)}",
             *_changes_lines(improvement, settings)]
    if improvement.commit_sha:
        lines.append(f"Commit: {_short_sha(improvement.commit_sha)}")
    lines += ["", f"Monitoring for {settings.measurement_window_days} days to verify impact."]
    notify(Notification(title=f"Applied improvement {md(improvement.id)}", body="\n".join(lines),
                        tags=["improvement", "applied"], priority="normal"), settings)


@hookimpl
def improvement_verified(improvement: Any, verification: dict[str, Any], settings: Any) -> None:
    if not settings.notify_verified:
        return
    recommendation = str(verification.get("recommendation") or "extend_monitoring")
    if verification.get("previous_recommendation") == verification.get("recommendation"):
        return  # the same verdict as the last verification: nothing new for the inbox
    if verification.get("rollback_follows"):
        return  # the daemon rolls it back at once: the rollback's one entry tells the verdict
    metrics = verification.get("metrics") or {}
    # only a keep verifies the improvement; a rollback or extend verdict is a verification's result
    keep = recommendation == "keep"
    head = f"Verified improvement {md(improvement.id)}" if keep else f"Verification of {md(improvement.id)}"
    title = head if keep else f"{head}: {_VERDICT.get(recommendation, md(recommendation))}"
    lines = [f"{head}:",
             f"Expected: {md(verification.get('expected_impact') or improvement.expected_impact or 'unknown')}",
             f"Actual: {md(verification.get('actual_impact') or 'unknown')}",
             f"Recommendation: {md(recommendation.replace('_', ' ').capitalize())}",
             "", "Metrics:",
             f"- Success rate before: {_pct(metrics.get('before_success_rate'))}",
             f"- Success rate after: {_pct(metrics.get('after_success_rate'))}",
             f"- Runs analyzed: {metrics.get('runs_analyzed', 'n/a')}"]
    # extend is "nothing to decide yet" (too few runs, or no significant change so far): low, never high
    priority = {"rollback": "urgent", "keep": "normal", "extend": "low"}.get(recommendation.lower(), "high")
    tags = ["improvement", "verified"] if keep else ["improvement", "verification"]
    notify(Notification(title=title, body="\n".join(lines), tags=tags, priority=priority), settings)


@hookimpl
def improvement_rolled_back(improvement: Any, settings: Any) -> None:
    if not settings.notify_rolled_back:
        return
    metrics = improvement.metrics if isinstance(improvement.metrics, dict) else {}
    automatic = metrics.get("rolled_back_automatically") is True
    if automatic:  # the daemon's verification asked for it: the verdict is told here, once
        lines = [f"Improvement {md(improvement.id)} made things significantly worse and was rolled back "
                 "automatically.", f"Description: {md(improvement.description)}"]
    else:
        lines = [f"Rolled back improvement {md(improvement.id)}:", f"Description: {md(improvement.description)}"]
    if improvement.actual_impact:
        lines.append(f"Actual impact: {md(improvement.actual_impact)}")
    if automatic:
        lines.append(f"Success rate before: {_pct(metrics.get('before_success_rate'))}, after: "
                     f"{_pct(metrics.get('after_success_rate'))} ({format_p(metrics.get('p_value'))})")
    if improvement.commit_sha:
        lines.append(f"Reverted commit: {_short_sha(improvement.commit_sha)}")
    if improvement.rollback_sha:
        lines.append(f"Revert commit: {_short_sha(improvement.rollback_sha)}")
    lines += ["", f"The pattern stays open: agent self-heal show {md(improvement.pattern_id)}"
              if improvement.pattern_id else "See: agent self-heal improvements --status rolled_back"]
    if automatic:
        notify(Notification(title=f"Automatically rolled back {md(improvement.id)}", body="\n".join(lines),
                            tags=["improvement", "rolled-back", "automatic"], priority="urgent"), settings)
        return
    notify(Notification(title=f"Rolled back improvement {md(improvement.id)}", body="\n".join(lines),
                        tags=["improvement", "rolled-back"], priority="high"), settings)


def _arm_lines(experiment: dict[str, Any]) -> list[str]:
    verdict = experiment.get("verdict") or {}
    control = (verdict.get("groups") or {}).get("control") or {}
    lines = [f"- control: error rate {_pct(control.get('error_rate'))}, run success {_pct(control.get('success_rate'))}"
             f" ({control.get('runs', 0)} runs)"]
    for arm in verdict.get("arms") or []:
        lines.append(f"- {md(str(arm.get('improvement_id')))}: error rate {_pct(arm.get('error_rate'))}, run success "
                     f"{_pct(arm.get('success_rate'))} ({arm.get('runs', 0)} runs)")
    return lines


@hookimpl
def ab_verdict(experiment: dict[str, Any], settings: Any) -> None:
    if not settings.notify_verified:
        return
    verdict = experiment.get("verdict") or {}
    ab_id = md(str(experiment.get("experiment_id")))
    lines = [f"A/B experiment {ab_id} of {md(str(experiment.get('pattern_id')))} reached a verdict:",
             f"{md(str(verdict.get('reason') or verdict.get('verdict')))}", "", *_arm_lines(experiment), "",
             f"Next: agent self-heal ab {'promote' if verdict.get('verdict') == 'winner' else 'drop'} {ab_id}"]
    notify(Notification(title=f"A/B experiment {ab_id}: {md(str(verdict.get('verdict')))}", body="\n".join(lines),
                        tags=["ab", "verdict"], priority="normal"), settings)


@hookimpl
def ab_finished(experiment: dict[str, Any], settings: Any) -> None:
    if not settings.notify_applied:
        return
    ab_id = md(str(experiment.get("experiment_id")))
    status = str(experiment.get("status"))
    lines = [f"A/B experiment {ab_id} of {md(str(experiment.get('pattern_id')))} {md(status)}."]
    if experiment.get("winner"):
        lines.append(f"Winner: {md(str(experiment['winner']))}" + (" (forced)" if experiment.get("forced") else ""))
        applied = experiment.get("applied") or {}
        if applied.get("commit_sha"):
            lines.append(f"Applied: commit {_short_sha(applied['commit_sha'])}")
    if experiment.get("end_commit_sha"):
        lines.append(f"Section removed: commit {_short_sha(experiment['end_commit_sha'])}")
    lines += ["", *_arm_lines(experiment)]
    notify(Notification(title=f"A/B experiment {ab_id} {md(status)}", body="\n".join(lines),
                        tags=["ab", status], priority="normal"), settings)
