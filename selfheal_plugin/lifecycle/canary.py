"""Canary and shadow tests of an improvement: real config edits, measured on real runs.

``test_improvement(..., mode="canary", fraction=0.5)`` writes the improvement's settings
under ``[canary."ID"]`` (``mode="shadow"``: ``[shadow."ID"]``) in config.toml and commits
that, the same way an apply does (tomlkit edit, atomic write, git commit with trailers,
intent in the database first, crash recovery). ``ToolPolicy`` then enforces the settings
for the canary arm of runs, or only observes them (see :mod:`selfheal_plugin.runtime.experiments`
for the sections and the run ``metadata`` each run gets).

* :func:`verify_experiment` (what ``verify`` does for a canary) compares the canary arm
  with the control arm over the same period — runs started since ``started_at`` — with the
  same statistics and keep / rollback / extend rules as a before/after verification
  (:func:`selfheal_plugin.lifecycle.verification.assess`), and checks the split against the
  configured fraction (exact binomial test). For a shadow it counts the calls and runs
  whose outcome the shadow settings would have changed.
* :func:`promote_experiment` removes the section (a commit) and applies the improvement
  normally (its own commit, so a later rollback reverts exactly the apply);
  :func:`drop_experiment` removes the section (a commit) and puts the improvement back to
  proposed/tested.

Status: ``canary`` or ``shadow`` while the section is in force; the improvement's
``experiment`` column holds the section, fraction, start and commits.
"""
from __future__ import annotations

import re
import sqlite3
from datetime import datetime, timedelta
from typing import Any

from selfheal_plugin.lifecycle import configedit

from selfheal_plugin.lifecycle import gitops

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.apply import (
    APPLICABLE, ChangedMeanwhileError, LifecycleError, UntrustedRecordError, _locked, abort_operation,
    apply_improvement, atomic_write, check_apply_values, check_config_write, crash_point, read_text, trusted_op_commit,
    undo_config_write, update_if_unchanged, update_status,
)
from selfheal_plugin.lifecycle.configedit import ConfigChange, sha256_text
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.runtime.experiments import ARM_CANARY, ARM_CONTROL, CANARY, SHADOW, SHADOW_KEYS, parse_experiments
from selfheal_plugin.history.connection import wellformed_run_sql
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.history.outcome import finished_sql
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.lifecycle.simulation import load_runs
from selfheal_plugin.lifecycle.verification import assess, pattern_tool
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.steps import step

EXPERIMENT_MODES = (CANARY, SHADOW)
DEFAULT_FRACTION = 0.5


# ------------------------------------------------------------------ the section


def _overlay(imp: Improvement, mode: str) -> list[ConfigChange]:
    """The improvement's config changes, moved under ``[MODE."ID"]``; refuses what an
    experiment cannot split by run (manual steps, deletions, other tables)."""
    changes, manual = configedit.split_changes(imp.changes)
    if manual:
        raise LifecycleError(f"{imp.id} has manual steps ({'; '.join(manual)}); a {mode} can only test config "
                             "settings, apply it instead")
    if not changes:
        raise LifecycleError(f"{imp.id} changes no config setting; there is nothing to run as a {mode}")
    out = []
    for c in changes:
        if c.op != "set":
            raise LifecycleError(f"{mode} mode can only set values; {imp.id} deletes {c.key()}")
        if c.path[0] not in ("tools", "servers") or len(c.path) != 3:
            raise LifecycleError(f"{mode} mode covers [tools.\"NAME\"] and [servers.\"NAME\"] settings, "
                                 f"not {c.key()}")
        if mode == SHADOW and (c.path[0] != "tools" or c.path[2] not in SHADOW_KEYS):
            raise LifecycleError(f"shadow mode can only observe {', '.join(SHADOW_KEYS)} (a different {c.path[2]} "
                                 "would change what the agent sees); use --mode canary")
        out.append(ConfigChange((mode, imp.id, *c.path), "set", c.value))
    return out


def experiment_refusal(imp: Improvement, mode: str = CANARY) -> str | None:
    """Why ``imp``'s changes cannot run as a ``mode`` (what :func:`test_experiment` would
    refuse), else None: what a step that suggests a canary asks first."""
    try:
        _overlay(imp, mode)
    except LifecycleError as exc:
        return str(exc)
    return None


def _removal(data: dict[str, Any], mode: str, imp_id: str) -> list[ConfigChange]:
    table = data.get(mode)
    if not isinstance(table, dict) or imp_id not in table:
        return []
    # The whole [canary] table goes when this was its only section (tomlkit would leave an
    # empty super table behind otherwise).
    return [ConfigChange((mode,), "delete")] if set(table) == {imp_id} else [ConfigChange((mode, imp_id), "delete")]


def _edit_text(old: str | None, changes: list[ConfigChange], where: str, removing: bool) -> str:
    new = configedit.edit_config(old, changes, where=where).new_text
    eol = configedit.line_ending(old)
    if removing and new.endswith(eol * 2) and old is not None and not old.endswith(eol * 2):
        new = new[:-len(eol)]  # the blank line selfheal put before the section it added
    return new


def _commit_edit(conn: sqlite3.Connection, settings: Settings, imp: Improvement, changes: list[ConfigChange], *,
                 op: str, action: str, message: str, expect: tuple[str, ...], finish: dict[str, Any],
                 sha_key: str, now: datetime, removing: bool = False) -> tuple[Improvement, str | None, str]:
    """Edit config.toml, commit, then set ``finish`` fields — with the apply's intent record
    (``pending_op``) so a crash is finished or undone by :func:`recover`. Returns (row,
    commit sha or None when the file needed no change, diff)."""
    store = ImprovementStore(conn)
    lock = _locked(settings)
    try:
        imp = store.get(imp.id)
        if imp.status not in expect:
            raise ChangedMeanwhileError(f"{imp.id} changed meanwhile (now {imp.status}); nothing was changed")
        cr = gitops.locate(settings.config_path, settings.home)
        old = read_text(cr.real_path)
        where = str(cr.real_path)
        current = configedit.parse_config_text(old, where)
        if removing:
            changes = _removal(current, *changes[0].path[:2]) if changes else []
        parse_experiments(current, cr.real_path)  # a broken section already there is refused first
        new = _edit_text(old, changes, where, removing) if changes else (old or "")
        parse_experiments(configedit.parse_config_text(new, where), cr.real_path)
        if not removing:  # removing our own section undoes our change, like a rollback
            check_config_write(old, new, cr.real_path)
        gitops.check_clean(cr)
        if new == (old or ""):
            fields = _finished(finish, sha_key, None)
            return update_status(store, imp.id, imp.status, **fields, pending_op=None), None, ""
        gitops.ensure_repo(cr, now)
        intent = {"op": op, "action": action, "step": "intent", "started_at": format_timestamp(now),
                  "head_before": gitops.head_sha(cr), "old_sha256": sha256_text(old), "new_sha256": sha256_text(new),
                  "old_text": old, "record": {"config_path": str(settings.config_path)}, "finish": finish,
                  "sha_key": sha_key}
        update_status(store, imp.id, imp.status, pending_op=intent)
        crash_point(f"{op}-after-intent")
        try:
            atomic_write(cr.real_path, new)
            crash_point(f"{op}-after-write")
            sha = gitops.commit_config(cr, message, now)
        except (SelfHealError, OSError) as exc:  # undone at once, like a recovery; raises unless committed
            what = "start of the " + action if op == "experiment-start" else "end of the " + action.split("-")[0]
            imp = abort_operation(store, settings, imp.id, exc, what, recover_experiment_op)
            sha = (imp.experiment or {}).get(sha_key)
        else:
            crash_point(f"{op}-after-commit")
            imp = update_status(store, imp.id, imp.status, **_finished(finish, sha_key, sha), pending_op=None)
    finally:
        lock.release()
    return imp, sha, configedit.unified_diff(old, new)


def _finished(finish: dict[str, Any], sha_key: str, sha: str | None) -> dict[str, Any]:
    fields = dict(finish)
    fields["experiment"] = {**(finish.get("experiment") or {}), sha_key: sha}
    return fields


def recover_experiment_op(store: ImprovementStore, imp: Improvement, settings: Settings) -> dict[str, Any]:
    """Finish (its commit exists) or undo (it does not) an interrupted section edit."""
    op = imp.pending_op if isinstance(imp.pending_op, dict) else {}
    record = op.get("record") if isinstance(op.get("record"), dict) else {}
    action = op.get("action")
    modes = "|".join(EXPERIMENT_MODES)
    if not (isinstance(action, str) and re.fullmatch(rf"(?:{modes})(?:-end)?", action)):
        raise UntrustedRecordError(f"the interrupted {str(op.get('op'))[:40]} of {imp.id} names the action "
                                   f"{str(action)[:40]!r}, not one selfheal makes; refused, nothing was changed")
    cr, sha = trusted_op_commit(store, imp, settings, op, record, action)
    if sha:
        update_status(store, imp.id, imp.status, **_trusted_finish(imp, op, sha), pending_op=None)
        return {"improvement_id": imp.id, "op": op.get("op"), "action": "finished",
                "detail": f"commit {sha[:12]} exists"}
    detail = undo_config_write(cr, op)
    update_status(store, imp.id, imp.status, pending_op=None)
    return {"improvement_id": imp.id, "op": op.get("op"), "action": "undone", "detail": detail}


def _trusted_finish(imp: Improvement, op: dict[str, Any], sha: str) -> dict[str, Any]:
    """The fields an interrupted section edit sets when finished: only a status an
    experiment start or end leads to and the experiment record, never other columns
    (the intent is read from the database)."""
    finish = op.get("finish") if isinstance(op.get("finish"), dict) else {}
    sha_key = op.get("sha_key") if op.get("sha_key") in ("commit_sha", "end_commit_sha") else "commit_sha"
    status = finish.get("status")
    allowed = EXPERIMENT_MODES if op.get("op") == "experiment-start" else APPLICABLE
    if status not in allowed:
        raise UntrustedRecordError(f"the interrupted {str(op.get('op'))[:40]} of {imp.id} would set status "
                                   f"{str(status)[:40]!r}; refused, nothing was changed")
    experiment = finish.get("experiment") if isinstance(finish.get("experiment"), dict) else {}
    return _finished({"status": status, "experiment": experiment}, sha_key, sha)


# ------------------------------------------------------------------ start


def test_experiment(conn: sqlite3.Connection, settings: Settings, improvement_id: str, mode: str, *,
                    fraction: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Start a canary/shadow for an improvement (or, when it already runs in that mode,
    report its results so far). Returns the design document's test fields plus the
    section, commit and diff."""
    if mode not in EXPERIMENT_MODES:
        raise UsageError(f"unknown experiment mode {mode!r}: use {', '.join(EXPERIMENT_MODES)}")
    if fraction is not None:
        if mode != CANARY:
            raise UsageError("--fraction is for canary mode only")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise UsageError(f"--fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    now = now or utcnow()
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    exp = imp.experiment or {}
    if imp.status in EXPERIMENT_MODES:
        if imp.status != mode:
            raise LifecycleError(f"{imp.id} is already in {imp.status} mode; end it first "
                                 f"({step('canary drop', imp.id)})")
        if fraction is not None and abs(float(fraction) - float(exp.get("fraction") or 0)) > 1e-12:
            raise LifecycleError(f"{imp.id} already runs as a canary on {exp.get('fraction'):.0%} of runs; drop it "
                                 "and start again to change the fraction")
        report = experiment_report(conn, settings, imp, now=now)
        return _test_result(imp, report, started=False)
    if imp.status not in APPLICABLE:
        raise LifecycleError(f"{imp.id} is {imp.status}; only proposed or tested improvements can run as a {mode}")
    overlay = _overlay(imp, mode)
    running = store.list(status=mode, limit=None)
    if running:
        raise LifecycleError(f"{running[0].id} is already running as a {mode}; one {mode} at a time — promote or "
                             f"drop it first ({step('canary promote|drop', running[0].id)})")
    f = float(fraction if fraction is not None else DEFAULT_FRACTION) if mode == CANARY else None
    started = format_timestamp(now)
    head = [ConfigChange((mode, imp.id, "fraction"), "set", f)] if f is not None else []
    changes = head + [ConfigChange((mode, imp.id, "started_at"), "set", started)] + overlay
    lines = [f"{configedit.dotted_key(c.path)} = {configedit.format_value(c.value)}" for c in overlay]
    what = f"on {f:.0%} of runs" if f is not None else "observe only"
    body = ["What:", *[f"  {ln}" for ln in lines], "", "Why:",
            f"  Test \"{imp.description}\" as a {mode} ({what}) before applying it to every run."]
    if imp.pattern_id:
        body.append(f"  Recurring failure pattern {imp.pattern_id}.")
    message = gitops.commit_message(f"selfheal: {mode} {imp.id} ({what})", body, imp.id, imp.pattern_id, mode)
    record = {"mode": mode, "fraction": f, "started_at": started, "section": [mode, imp.id],
              "status_before": imp.status, "settings": [c.to_dict() for c in overlay]}
    imp, sha, diff = _commit_edit(conn, settings, imp, changes, op="experiment-start", action=mode, message=message,
                                  expect=APPLICABLE, finish={"status": mode, "experiment": record},
                                  sha_key="commit_sha", now=now)
    plugins.fire("improvement_tested", improvement=imp, result={"improvement_id": imp.id, "test_mode": mode,
                                                                 "started_at": started}, settings=settings)
    report = experiment_report(conn, settings, imp, now=now)
    return {**_test_result(imp, report, started=True), "diff": diff}


def _test_result(imp: Improvement, report: dict[str, Any], started: bool) -> dict[str, Any]:
    exp = imp.experiment or {}
    mode = exp.get("mode")
    sim = imp.test_result or {}
    rec = {"keep": "safe_to_apply", "rollback": "reject"}.get(report["recommendation"], "pending")
    if started:
        reason = (f"{mode} started: runs from now on are measured; check with {step('verify', imp.id)}, "
                  f"end with {step('canary promote|drop', imp.id)}")
    else:
        reason = report["reason"]
    return {
        "improvement_id": imp.id, "test_mode": mode, "status": imp.status, "started": started,
        "simulated_success_rate": sim.get("simulated_success_rate"),
        "baseline_success_rate": report["metrics"].get("control_success_rate") if mode == CANARY else None,
        "expected_improvement": sim.get("expected_improvement"), "recommendation": rec, "reason": reason,
        "fraction": exp.get("fraction"), "started_at": exp.get("started_at"), "commit_sha": exp.get("commit_sha"),
        "config_section": f'[{mode}."{imp.id}"]', "settings": exp.get("settings"), "report": report,
    }


# ------------------------------------------------------------------ measure


def _arms(conn: sqlite3.Connection, imp_id: str, lo: datetime, hi: datetime) -> dict[str, str]:
    """run id → arm, from the runs' ``metadata`` (written by ToolPolicy)."""
    sql = f"""
    SELECT id, coalesce(
        CASE WHEN json_extract(metadata, '$.selfheal_improvement') = ? THEN json_extract(metadata, '$.selfheal_arm') END,
        json_extract(metadata, '$.selfheal_arms."' || ? || '"'))
    FROM runs WHERE metadata IS NOT NULL AND json_valid(metadata) AND instr(metadata, ?) > 0
      AND julianday(started_at) >= ? AND julianday(started_at) < ? AND {wellformed_run_sql()}"""
    jd = lambda t: t.timestamp() / 86400 + 2440587.5  # noqa: E731
    return {rid: arm for rid, arm in conn.execute(sql, (imp_id, imp_id, imp_id, jd(lo), jd(hi)))
            if arm in (ARM_CANARY, ARM_CONTROL)}


def _binomial_p(k: int, n: int, p: float) -> float | None:
    if n == 0:
        return None
    from scipy import stats

    return float(stats.binomtest(k, n, p).pvalue)


def experiment_report(conn: sqlite3.Connection, settings: Settings, imp: Improvement,
                      days: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The current measurement of a canary (arms compared) or shadow (outcome changes);
    nothing is stored."""
    now = now or utcnow()
    exp = imp.experiment or {}
    days = settings.measurement_window_days if days is None else days
    if not isinstance(days, (int, float)) or isinstance(days, bool) or days <= 0:
        raise UsageError(f"measurement window must be a positive number of days, got {days!r}")
    started = parse_timestamp(exp["started_at"])
    end = min(started + timedelta(days=days), now)
    complete = now >= started + timedelta(days=days)
    window = {"days": days, "since": format_timestamp(started), "until": format_timestamp(end), "complete": complete}
    if exp.get("mode") == SHADOW:
        return _shadow_report(conn, settings, imp, started, end, window)


    tool = pattern_tool(imp)
    runs = load_runs(conn, started.timestamp(), end.timestamp(), [tool] if tool else []) if end > started else []
    arms = _arms(conn, imp.id, started, end) if end > started else {}
    control = [r for r in runs if arms.get(r.run_id) == ARM_CONTROL]
    canary = [r for r in runs if arms.get(r.run_id) == ARM_CANARY]
    a = assess(imp, settings, control, canary, complete, labels=("in the control arm", "in the canary arm"))
    fraction = float(exp.get("fraction") or DEFAULT_FRACTION)
    n = len(control) + len(canary)
    p_split = _binomial_p(len(canary), n, fraction)
    reason = a["reason"]
    if len(runs) > n and a["recommendation"] == "extend":  # runs came, but none was put in an arm
        reason += (f"; {len(runs) - n} run(s) since the start have no arm: is the runtime's ToolPolicy reading "
                   "this config.toml?")
    if a["recommendation"] == "keep":
        reason = f"the canary arm did significantly better; promote it: {step('canary promote', imp.id)}"
    elif a["recommendation"] == "rollback":
        reason = f"the canary arm did significantly worse; drop it: {step('canary drop', imp.id)}"
    pattern = a["pattern"]
    if pattern is not None:  # name the groups for what they are
        pattern = {**pattern, "control_error_rate": pattern["before_error_rate"],
                   "canary_error_rate": pattern["after_error_rate"]}
    metrics = {"control_success_rate": a["sr_b"], "canary_success_rate": a["sr_a"],
               "before_success_rate": a["sr_b"], "after_success_rate": a["sr_a"],
               "runs_analyzed": n, "runs_control": len(control), "runs_canary": len(canary),
               "runs_before": len(control), "runs_after": len(canary), "runs_without_arm": len(runs) - n,
               "p_value": a["p_success"],
               "test": "Fisher's exact test, two-sided", "significance_level": settings.significance_level,
               "tests": a["tests"], "alpha_per_test": round(a["alpha_per_test"], 6),
               "min_sample_size": settings.min_sample_size, "pattern": pattern,
               "split": {"fraction": fraction, "canary_share": round(len(canary) / n, 4) if n else None,
                         "p_value": p_split,
                         "test": "exact binomial test of the canary count against the fraction"}}
    return {"mode": CANARY, "recommendation": a["recommendation"], "verification_status": a["status"],
            "reason": reason, "actual_impact": a["actual"].replace("success rate", "success rate (canary vs control)",
                                                                    1), "metrics": metrics, "window": window}


def _shadow_report(conn: sqlite3.Connection, settings: Settings, imp: Improvement, started: datetime,
                   end: datetime, window: dict[str, Any]) -> dict[str, Any]:
    jd = lambda t: t.timestamp() / 86400 + 2440587.5  # noqa: E731
    rows = conn.execute(
        "SELECT status, json_extract(metadata, '$.selfheal_shadow') FROM runs WHERE metadata IS NOT NULL "
        "AND json_valid(metadata) AND json_extract(metadata, '$.selfheal_shadow.improvement') = ? "
        f"AND julianday(started_at) >= ? AND julianday(started_at) < ? AND {wellformed_run_sql()}",
        (imp.id, jd(started), jd(end))).fetchall()
    import json

    calls = changed = succeed = fail = recover_runs = break_runs = runs_n = 0
    examples: list[dict[str, Any]] = []
    for status, raw in rows:
        try:
            s = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(s, dict):
            continue
        runs_n += 1
        calls += int(s.get("calls") or 0)
        changed += int(s.get("would_change") or 0)
        succeed += int(s.get("would_succeed") or 0)
        fail += int(s.get("would_fail") or 0)
        recover_runs += status == "failed" and int(s.get("would_succeed") or 0) > 0
        break_runs += status == "completed" and int(s.get("would_fail") or 0) > 0
        for c in s.get("changes") or []:
            if len(examples) < 5:
                examples.append(c)
    floor = settings.min_sample_size
    alpha = settings.significance_level
    p = _binomial_p(succeed, succeed + fail, 0.5) if succeed and fail else None
    if runs_n < floor:
        rec, status = "extend", "inconclusive"
        reason = f"extend monitoring: {runs_n} run(s) observed under the shadow (min_sample_size {floor})"
    elif fail and (not succeed or (p is not None and p < alpha and fail > succeed)):
        rec, status = "rollback", "failed"
        reason = (f"{fail} call(s) that succeeded would have failed under the shadow settings; drop it: "
                  f"{step('canary drop', imp.id)}")
    elif succeed and (not fail or (p is not None and p < alpha)):
        rec, status = "keep", "verified"
        reason = (f"{succeed} failed call(s) would have succeeded and {fail} would have failed; promote it: "
                  f"{step('canary promote', imp.id)}")
    else:
        rec, status = "extend", "inconclusive"
        reason = ("extend monitoring: the shadow settings would not have changed any call's outcome" if not changed
                  else f"extend monitoring: {succeed} call(s) would have succeeded, {fail} failed (no clear winner)")
    total_runs = conn.execute(f"SELECT count(*) FROM runs WHERE {finished_sql()} AND "
                              f"julianday(started_at) >= ? AND julianday(started_at) < ? AND {wellformed_run_sql()}",
                              (jd(started), jd(end))).fetchone()[0]
    actual = (f"{changed} of {calls} observed call(s) would have changed outcome ({succeed} failure(s) → success, "
              f"{fail} success(es) → failure); {recover_runs} failed run(s) would have got past that call, "
              f"{break_runs} completed run(s) would have failed")
    metrics = {"runs_observed": runs_n, "runs_in_period": total_runs, "calls_observed": calls,
               "calls_would_change": changed, "calls_would_succeed": succeed, "calls_would_fail": fail,
               "runs_would_recover": recover_runs, "runs_would_break": break_runs,
               "runs_analyzed": runs_n, "p_value": p,
               "test": "exact binomial (sign) test of failure→success vs success→failure changes",
               "significance_level": alpha, "min_sample_size": floor, "examples": examples}
    return {"mode": SHADOW, "recommendation": rec, "verification_status": status, "reason": reason,
            "actual_impact": actual, "metrics": metrics, "window": window}


def verify_experiment(conn: sqlite3.Connection, settings: Settings, imp: Improvement, days: float | None = None, *,
                      now: datetime | None = None) -> dict[str, Any]:
    """``verify`` of an improvement in canary/shadow mode: measure, store, notify. The
    improvement stays in its mode; promote or drop ends it."""
    now = now or utcnow()
    report = experiment_report(conn, settings, imp, days, now=now)
    result = {"improvement_id": imp.id, "expected_impact": imp.expected_impact, **report,
              "checked_at": format_timestamp(now), "p_value": report["metrics"]["p_value"]}
    store = ImprovementStore(conn)
    exp = {**(imp.experiment or {}), "last_verification": {k: report[k] for k in
                                                           ("recommendation", "verification_status", "actual_impact")}
           | {"checked_at": result["checked_at"]}}
    imp = update_if_unchanged(store, settings, imp, "the verification was not stored",
                              metrics={**report["metrics"], "verification_status": report["verification_status"],
                                       "recommendation": report["recommendation"], "mode": report["mode"],
                                       "checked_at": result["checked_at"], "window": report["window"]},
                              actual_impact=report["actual_impact"], experiment=exp)
    result["status"] = imp.status
    plugins.fire("improvement_verified", improvement=imp, verification=result, settings=settings)
    return result


# ------------------------------------------------------------------ end


def running_experiment(conn: sqlite3.Connection, improvement_id: str, outcome: str) -> Improvement:
    """The improvement, running as a canary or shadow; else the refusal to end it as ``outcome``
    (promoted, dropped)."""
    imp = ImprovementStore(conn).get(improvement_id)
    if imp.status not in EXPERIMENT_MODES:
        start = (f" (start one: {step('test', imp.id, mode='canary')})"
                 if imp.status in APPLICABLE and experiment_refusal(imp) is None else "")
        raise LifecycleError(f"{imp.id} is {imp.status}; only an improvement running as a canary or shadow can be "
                             f"{outcome}{start}")
    return imp


def _end(conn: sqlite3.Connection, settings: Settings, improvement_id: str, outcome: str,
         now: datetime) -> tuple[Improvement, dict[str, Any]]:
    imp = running_experiment(conn, improvement_id, outcome)
    exp = dict(imp.experiment or {})
    mode = exp.get("mode") or imp.status
    back = exp.get("status_before") if exp.get("status_before") in APPLICABLE else "tested"
    body = ["What:", f"  Remove [{mode}.\"{imp.id}\"] (the {mode} started {exp.get('started_at')}).", "", "Why:",
            f"  The {mode} is {outcome}" + (" (the improvement is applied to every run next)." if outcome == "promoted"
                                             else ".")]
    message = gitops.commit_message(f"selfheal: end {mode} {imp.id} ({outcome})", body, imp.id, imp.pattern_id,
                                    f"{mode}-end")
    record = {**exp, "ended_at": format_timestamp(now), "outcome": outcome}
    imp, sha, diff = _commit_edit(conn, settings, imp, [ConfigChange((mode, imp.id), "delete")],
                                  op="experiment-end", action=f"{mode}-end", message=message, expect=(mode,),
                                  # a dropped experiment's measurement is history (kept in the record), not
                                  # the improvement's measured impact
                                  finish={"status": back, "experiment": record,
                                          **({"actual_impact": None, "metrics": None} if outcome == "dropped" else {})},
                                  sha_key="end_commit_sha", now=now,
                                  removing=True)
    return imp, {"mode": mode, "end_commit_sha": sha, "diff": diff, "status": imp.status}


def promote_experiment(conn: sqlite3.Connection, settings: Settings, improvement_id: str, *,
                       changes_made: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """End the canary/shadow (section removed, committed) and apply the improvement
    normally (its own commit, applied_at = ``now``)."""
    now = now or utcnow()
    # apply would refuse it after the section is gone: refuse first
    check_apply_values(settings, running_experiment(conn, improvement_id, "promoted"))
    imp, ended = _end(conn, settings, improvement_id, "promoted", now)
    applied = apply_improvement(conn, settings, imp.id, changes_made, now=now)
    return {**applied, "ended": ended}


def drop_experiment(conn: sqlite3.Connection, settings: Settings, improvement_id: str, *,
                    now: datetime | None = None) -> dict[str, Any]:
    """End the canary/shadow without applying: section removed (a commit), status back to
    what it was before (proposed or tested)."""
    now = now or utcnow()
    imp, ended = _end(conn, settings, improvement_id, "dropped", now)
    return {"improvement_id": imp.id, "status": imp.status, "commit_sha": ended["end_commit_sha"],
            "diff": ended["diff"], "mode": ended["mode"]}


test_experiment.__test__ = False  # a library function, not a pytest test
