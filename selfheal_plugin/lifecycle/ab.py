"""A/B experiments of fix strategies: k candidate fixes of one pattern, run by run, beside a control.

The canary mechanism generalised to k arms (:mod:`selfheal_plugin.lifecycle.canary` is its
one-arm form):

* :func:`start_ab` — the arms are improvements of one pattern (given, or the candidates its
  strategies offer, see :func:`candidate_improvements`); their settings are written under
  ``[ab."AB-ID".arms."IMP-ID"]`` in config.toml and committed (intent first, crash
  recovery like an apply); ``ToolPolicy`` assigns each run to an arm or the control by a
  stable hash (:mod:`selfheal_plugin.runtime.experiments`).
* :func:`judge` — per arm and control, from the runs started since ``started_at``: the
  pattern's error rate (failed calls of the signature / calls of the tool) and the run
  success rate; an omnibus chi-square test across all groups, each arm against the control
  (Fisher's exact test) with Holm's correction, a floor of ``min_sample_size`` runs per
  group. Verdict: ``winner`` (an arm significantly better than the control after the
  correction and not significantly worse on run success; the best of those, with whether
  it beats the runner-up), ``extend`` (no winner yet) or ``drop`` (every arm significantly
  worse).
* :func:`end_ab` — remove the section (one commit); ``promoted``: the winner is applied
  as a normal improvement (its own commit, so a later rollback reverts exactly the apply,
  never the experiment), the other arms end ``ab_lost`` (kept in history); ``dropped``:
  every arm goes back to the status it had. The ``ab_finished`` hook fires.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from filelock import Timeout

from selfheal_plugin.analysis.patterns import get_pattern, split_pattern_id
from selfheal_plugin.errors import NotFoundError, SelfHealError, UsageError
from selfheal_plugin.history.abstore import ACTIVE, AbChangedError, AbExperiment, AbStore, has_ab_table, new_ab_id
from selfheal_plugin.history.connection import normalize_error_type, wellformed_run_sql
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.history.outcome import success_rate
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.lifecycle import configedit, gitops
from selfheal_plugin.lifecycle.apply import (
    APPLICABLE, LifecycleError, UntrustedRecordError, _locked, apply_improvement, atomic_write, check_apply_values,
    check_config_write, check_tool_values, crash_point, lock_for, read_text, trusted_op_commit, undo_config_write,
)
from selfheal_plugin.lifecycle.canary import _edit_text, _removal
from selfheal_plugin.lifecycle.configedit import ConfigChange, sha256_text
from selfheal_plugin.lifecycle.proposals import check_proposal, failure_summary, history_window, improvement_from_proposal
from selfheal_plugin.lifecycle.simulation import ReplayRun, load_runs
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import Proposal, StrategyError
from selfheal_plugin.runtime.experiments import AB, ARM_CONTROL, parse_experiments
from selfheal_plugin.steps import option, step

log = logging.getLogger("selfheal.ab")

ARMABLE = (*APPLICABLE, "candidate")  # what an arm may be before the experiment
MAX_ARMS = 5
ARM_STATUS = "ab"
LOST_STATUS = "ab_lost"


# ================================================================= candidates


def _changes_key(changes: list[dict[str, Any]]) -> str:
    return json.dumps(changes, sort_keys=True)


def candidate_proposals(conn: sqlite3.Connection, settings: Settings, pattern: Any, now: datetime) -> list[Proposal]:
    """What the pattern's strategies offer (the resolved one, then the error type's own when
    that is another), each contained and validated; a failing strategy costs its
    candidates, not the command."""
    history = history_window(conn, settings, now=now)
    asked: list[Any] = []
    try:
        asked.append(plugins.resolve_strategy(pattern.error_type, settings, pattern.failure_kind)[0])
    except StrategyError as exc:
        log.warning("no candidates from the strategy of %s: %s", pattern.id, exc)
    by_type = plugins.strategies(settings).get(normalize_error_type(pattern.error_type))
    if by_type is not None and all(by_type[0] is not s for s in asked):
        asked.append(by_type[0])
    out: list[Proposal] = []
    for strategy in asked:
        method = "candidates" if callable(getattr(strategy, "candidates", None)) else "propose"
        try:
            got = plugins.call_strategy(strategy, method, pattern, history, settings=settings)
        except StrategyError as exc:
            log.warning("no candidates from %s: %s", getattr(strategy, "name", "?"), exc)
            continue
        for raw in (got if isinstance(got, list) else [got])[:MAX_ARMS]:
            try:
                valid = check_proposal(raw, pattern.id, history)
            except (ValueError, TypeError, RecursionError, configedit.ChangeError) as exc:
                log.warning("invalid candidate from %s for %s: %s", getattr(strategy, "name", "?"), pattern.id, exc)
                continue
            if pattern.evidence:
                valid.failure_kind = valid.failure_kind or pattern.failure_kind
                valid.evidence.setdefault("failure", failure_summary(pattern.evidence))
            out.append(valid)
    return out


def _settings_set(imp: Improvement) -> frozenset[tuple[str, ...]]:
    """The config keys a fix sets: two fixes that set the same keys (timeouts of 90 s and
    100 s) are one kind of fix, not two arms worth a default experiment."""
    return frozenset(tuple(str(p) for p in c.get("path") or []) for c in imp.changes or [] if c.get("kind") == "config")


def _keys_text(keys: frozenset[tuple[str, ...]]) -> str:
    return ", ".join(sorted(k[-1] for k in keys if k)) or "nothing"


def candidate_improvements(conn: sqlite3.Connection, settings: Settings, pattern_id: str,
                           now: datetime) -> tuple[list[Improvement], list[Improvement], list[str], str]:
    """(arms already stored, new candidate rows not yet stored, why other fixes are not arms,
    what ``--arms`` could do instead) for ``ab start`` without ``--arms``: the pattern's open
    proposal, its stored candidates, then the strategies' candidates whose changes differ from
    all of those, each kept only when it sets other config keys than the arms before it
    (nothing is stored here)."""
    pattern = get_pattern(conn, pattern_id, since=settings.lookback, now=now)
    store = ImprovementStore(conn)
    open_row = store.open_for_pattern(pattern.id)
    if open_row is not None and open_row.status not in ARMABLE:
        raise LifecycleError(f"{pattern.id} already has {open_row.id} {open_row.status}; an A/B experiment compares "
                             "fixes not yet applied (roll it back or end its experiment first)")
    stored = [open_row] if open_row is not None else []
    stored += [i for i in store.list(status="candidate", limit=None) if i.pattern_id == pattern.id]
    seen = {_changes_key(i.changes) for i in stored}
    kinds: dict[frozenset[tuple[str, ...]], str] = {}  # the keys an arm sets -> that arm
    notes: list[str] = []

    def distinct(imp: Improvement, name: str) -> bool:
        keys = _settings_set(imp)
        if keys in kinds:
            notes.append(f"{name} sets {_keys_text(keys)} like {kinds[keys]}")
            return False
        kinds[keys] = name
        return True

    arms, usable, manual = [], [], 0  # usable: what --arms takes; manual: fixes with a manual step
    for imp in stored:
        reason = _armable_reason(imp)
        manual += _has_manual_steps(imp)
        if reason:
            notes.append(reason)
        else:
            usable.append(imp.id)
            if distinct(imp, imp.id):
                arms.append(imp)
    fresh: list[Improvement] = []
    found = len(stored)
    for prop in candidate_proposals(conn, settings, pattern, now):
        imp = improvement_from_proposal(prop)
        key = _changes_key(imp.changes)
        if key in seen:
            continue
        seen.add(key)
        found += 1
        # its one-line summary, cut at a word when long
        name = f"the {imp.strategy} strategy's {gitops.commit_subject(imp.description.splitlines()[0], 80)!r}"
        if any(c.kind != "config" for c in prop.changes):
            manual += 1
            # a manual step cannot be split by run (a stored fix with the same settings is named already)
            if _settings_set(imp) not in {_settings_set(i) for i in stored}:
                notes.append(f"{name} has manual steps")
            continue
        if distinct(imp, name):
            fresh.append(imp)
    return arms, fresh, notes, _arms_option_hint(pattern.id, usable, manual == found > 0)


def _has_manual_steps(imp: Improvement) -> bool:
    return any(isinstance(c, dict) and c.get("kind") == "manual" for c in imp.changes or [])


def _arms_option_hint(pattern_id: str, usable: list[str], all_manual: bool) -> str:
    """What ``--arms`` can do when ``ab start`` finds fewer than two arms: it takes stored
    fixes of the pattern that only set config values, so it helps only when two exist (two
    that set the same keys, which ``ab start`` alone compares no further)."""
    arms = option("arms", "IDS")
    if len(usable) >= 2:
        return f"give arms with {option('arms', f'{usable[0]},{usable[1]}')}"
    if all_manual:
        return (f"every fix found for {pattern_id} has a manual step, which no arm can run: there is nothing "
                f"to compare by run, with {arms} or without")
    there = f"only {usable[0]}" if usable else "none"
    return f"{arms} takes two stored fixes of {pattern_id} that only set config values, and there is {there}"


def _armable_reason(imp: Improvement) -> str | None:
    if imp.pending_op:
        return f"{imp.id} has an interrupted operation"
    if imp.status not in ARMABLE:
        return f"{imp.id} is {imp.status}; only proposed, tested or candidate improvements can be arms"
    try:
        _overlay(imp, "x")
    except LifecycleError as exc:
        return str(exc)
    return None


# ================================================================= the section


def _overlay(imp: Improvement, ab_id: str) -> list[ConfigChange]:
    changes, manual = configedit.split_changes(imp.changes)
    if manual:
        raise LifecycleError(f"{imp.id} has manual steps; an A/B arm can only set config values")
    if not changes:
        raise LifecycleError(f"{imp.id} changes no config setting; there is nothing to run as an arm")
    out = []
    for c in changes:
        if c.op != "set" or c.path[0] not in ("tools", "servers") or len(c.path) != 3:
            raise LifecycleError(f"{imp.id} changes {c.key()}; an A/B arm can only set [tools.\"NAME\"] and "
                                 "[servers.\"NAME\"] values")
        out.append(ConfigChange((AB, ab_id, "arms", imp.id, *c.path), "set", c.value))
    return out


def _commit(conn: sqlite3.Connection, settings: Settings, exp: AbExperiment, changes: list[ConfigChange], *,
            op: str, action: str, message: str, removing: bool, now: datetime) -> tuple[str | None, str]:
    """Write config.toml and commit, the intent in the experiment's row first (the caller
    holds the lock and has put the row in ``starting``/``ending``). Returns (sha, diff)."""
    store = AbStore(conn)
    cr = gitops.locate(settings.config_path, settings.home)
    old = read_text(cr.real_path)
    where = str(cr.real_path)
    current = configedit.parse_config_text(old, where)
    if removing:
        changes = _removal(current, AB, exp.id)
    parse_experiments(current, cr.real_path)
    new = _edit_text(old, changes, where, removing) if changes else (old or "")
    parse_experiments(configedit.parse_config_text(new, where), cr.real_path)
    if not removing:  # removing our own section undoes our change, like a rollback
        check_config_write(old, new, cr.real_path)
    gitops.check_clean(cr)
    if new == (old or ""):
        return None, ""
    gitops.ensure_repo(cr, now)
    intent = {**(exp.pending_op or {}), "op": op, "action": action, "started_at": format_timestamp(now), "head_before": gitops.head_sha(cr),
              "old_sha256": sha256_text(old), "new_sha256": sha256_text(new), "old_text": old,
              "record": {"config_path": str(settings.config_path)}}
    store.update(exp.id, exp.status, pending_op=intent)
    crash_point(f"{op}-after-intent")
    try:
        atomic_write(cr.real_path, new)
        crash_point(f"{op}-after-write")
        sha = gitops.commit_config(cr, message, now)
    except (SelfHealError, OSError) as exc:
        result = recover_ab_op(conn, settings, store.get(exp.id))
        if result["action"] == "finished":
            raise LifecycleError(f"{action} of {exp.id} reported {' '.join(str(exc).split())}, but its commit "
                                 "exists: finished") from exc
        raise LifecycleError(f"{action} of {exp.id} failed: {' '.join(str(exc).split())}; {result['detail']}, "
                             "nothing was changed") from exc
    crash_point(f"{op}-after-commit")
    return sha, configedit.unified_diff(old, new)


# ================================================================= start


def start_ab(conn: sqlite3.Connection, settings: Settings, pattern_id: str, arm_ids: list[str] | None = None, *,
             fraction: float | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Start an A/B experiment of ``pattern_id``; see the module docs. Refuses (one line,
    nothing changed) fewer than two arms, an unknown pattern or id, an arm of another
    pattern, an arm that is applied or in another experiment, a fix of the pattern in force
    (applied or verified), a dirty config, a running experiment of the same pattern."""
    now = now or utcnow()
    try:
        split_pattern_id(pattern_id)
    except SelfHealError:
        raise UsageError(f"{pattern_id!r} is not a pattern id (error_type:tool_name)") from None
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise UsageError(f"--fraction is each arm's share of runs, between 0 and 1 (exclusive), got {fraction!r}")
    store = ImprovementStore(conn)
    running = [e for e in (AbStore(conn).list(ACTIVE) if has_ab_table(conn) else []) if e.pattern_id == pattern_id]
    if running:
        raise LifecycleError(f"{running[0].id} already runs an A/B experiment of {pattern_id}; promote or drop it "
                             f"first ({step('ab promote|drop', running[0].id)})")
    in_force = store.in_force_for_patterns([pattern_id]).get(pattern_id)
    if in_force is not None:
        # its change is the base config every group runs: the control would not be "no fix", an
        # arm would stack on it, and the experiment's runs would be the fix's own verification
        raise LifecycleError(
            f"{pattern_id} has {in_force.id} in force ({in_force.status}); an A/B experiment compares fixes not in "
            f"force against a control without one: roll it back first ({step('rollback', in_force.id)}), then "
            "start the experiment (its change, proposed again, can be one of the arms)")
    new: list[Improvement] = []
    if arm_ids is not None:
        ids = list(dict.fromkeys(a.strip() for a in arm_ids if a.strip()))
        if len(ids) < 2:
            raise UsageError(f"an A/B experiment needs at least two arms, got {len(ids)}")
        arms = [store.get(i) for i in ids]
        for imp in arms:
            if imp.pattern_id != pattern_id:
                raise LifecycleError(f"{imp.id} is a fix for {imp.pattern_id}, not {pattern_id}")
            reason = _armable_reason(imp)
            if reason:
                raise LifecycleError(reason)
    else:
        arms, new, notes, arms_hint = candidate_improvements(conn, settings, pattern_id, now)
        if len(arms) + len(new) < 2:
            found = [f"{i.id} ({_keys_text(_settings_set(i))})" for i in arms] + \
                [f"a new candidate ({_keys_text(_settings_set(i))})" for i in new]
            raise LifecycleError(
                f"an A/B experiment of {pattern_id} needs two fixes that set different config keys; "
                f"{' and '.join(found) or 'none'} can be an arm" + (f" ({'; '.join(notes)})" if notes else "")
                + f"; {arms_hint}")
    if len(arms) + len(new) > MAX_ARMS:
        new = new[:max(0, MAX_ARMS - len(arms))]
        arms = arms[:MAX_ARMS]
    k = len(arms) + len(new)
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1 \
                or fraction * k >= 1:
            raise UsageError(f"--fraction is each arm's share of runs: between 0 and {1 / k:.4g} for {k} arms "
                             f"(the control keeps the rest), got {fraction!r}")
    share = float(fraction) if fraction is not None else 1 / (k + 1)
    cr = gitops.locate(settings.config_path, settings.home)
    # before any candidate is stored: the section's own values are checked when it is written
    check_tool_values(read_text(cr.real_path), cr.real_path)
    gitops.check_clean(cr)
    for imp in new:  # the pattern's open proposal stays its suggested fix; others are candidates
        if store.open_for_pattern(pattern_id) is None:
            stored, created = store.insert_unless_open(imp)
            if created:
                plugins.fire("improvement_proposed", improvement=stored, settings=settings)
            arms.append(stored)
        else:
            imp.status = "candidate"
            arms.append(store.insert(imp))
    ab_id = new_ab_id()
    started = format_timestamp(now)
    exp = AbExperiment(id=ab_id, pattern_id=pattern_id, started_at=started, status="starting",
                       pending_op={"op": "ab-start"},  # a crash before the intent: recovery deletes the row
                       arms=[{"improvement_id": i.id, "fraction": share, "status_before": i.status,
                              "description": i.description, "strategy": i.strategy} for i in arms])
    lock = _locked(settings)
    try:
        for imp in arms:  # again under the lock: another command may have taken one meanwhile
            fresh = store.get(imp.id)
            if fresh.status != imp.status:
                raise LifecycleError(f"{imp.id} changed meanwhile (now {fresh.status}); nothing was changed")
        changes = [ConfigChange((AB, ab_id, "started_at"), "set", started),
                   ConfigChange((AB, ab_id, "pattern"), "set", pattern_id)]
        for imp in arms:
            changes.append(ConfigChange((AB, ab_id, "arms", imp.id, "fraction"), "set", share))
            changes += _overlay(imp, ab_id)
        body = ["What:", f"  An A/B experiment of {len(arms)} fixes for {pattern_id}, each on {share:.0%} of runs:"]
        body += [f"  - {i.id}: {i.description}" for i in arms]
        body += ["", "Why:", "  Measure which fix works best on real runs before applying one to every run."]
        # the subject holds only what has a fixed length (a pattern id can be any length and is
        # in the body and the trailer), so it is never cut; it pairs with the end's subject
        message = gitops.commit_message(f"selfheal: start A/B {ab_id} ({len(arms)} arms)", body, ab_id, pattern_id,
                                        "ab")
        AbStore(conn).insert(exp)
        try:
            sha, diff = _commit(conn, settings, exp, changes, op="ab-start", action="ab", message=message,
                                removing=False, now=now)
        except BaseException:
            row = conn.execute("SELECT status, pending_op FROM selfheal_ab WHERE id = ?", (ab_id,)).fetchone()
            if row is not None and row[0] == "starting" and "head_before" not in (row[1] or ""):
                AbStore(conn).delete(ab_id, "starting")  # refused before anything was written
            raise
        exp = _finish_start(conn, AbStore(conn).get(ab_id), sha)
    finally:
        lock.release()
    return {**status_of(conn, settings, exp, now=now), "started": True, "diff": diff}


def _finish_start(conn: sqlite3.Connection, exp: AbExperiment, sha: str | None) -> AbExperiment:
    arms = []
    for a in exp.arms:
        before = a.get("status_before") if a.get("status_before") in ARMABLE else None
        if before is None:
            raise UntrustedRecordError(f"{exp.id} records arm status {str(a.get('status_before'))[:20]!r}; refused")
        arms.append((str(a["improvement_id"]), (before,), {"status": ARM_STATUS}))
    return AbStore(conn).update(exp.id, "starting", arms=arms, status="running", start_sha=sha, pending_op=None)


# ================================================================= judge


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (None stays None; m counts the tests made)."""
    idx = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _fisher(a: int, b: int, c: int, d: int) -> float | None:
    if (a + b) == 0 or (c + d) == 0:
        return None
    if (a + c) == 0 or (b + d) == 0:
        return 1.0
    from scipy import stats  # on use: scipy costs ~1 s at start-up

    return float(stats.fisher_exact([[a, b], [c, d]])[1])


def _chi2(table: list[list[int]]) -> float | None:
    rows = [r for r in table if sum(r) > 0]
    if len(rows) < 2:
        return None
    if any(sum(col) == 0 for col in zip(*rows)):
        return 1.0
    from scipy import stats

    return float(stats.chi2_contingency(rows)[1])


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def group_counts(runs: list[ReplayRun], error_type: str, tool: str) -> dict[str, int]:
    calls = errors = 0
    for r in runs:
        for c in r.calls:
            if c.tool == tool:
                calls += 1
                errors += (not c.ok) and normalize_error_type(c.error_type) == error_type
    return {"runs": len(runs), "runs_completed": sum(r.completed for r in runs), "calls": calls, "errors": errors}


def judge_counts(groups: dict[str, dict[str, int]], *, alpha: float, min_sample: int) -> dict[str, Any]:
    """The verdict from per-group counts (``control`` and one entry per arm): see the module docs."""
    control = groups[ARM_CONTROL]
    arm_ids = [g for g in groups if g != ARM_CONTROL]
    table = [[g["errors"], g["calls"] - g["errors"]] for g in groups.values()]
    p_omni = _chi2(table)
    p_omni_success = _chi2([[g["runs_completed"], g["runs"] - g["runs_completed"]] for g in groups.values()])
    raw_err = [_fisher(groups[a]["errors"], groups[a]["calls"] - groups[a]["errors"], control["errors"],
                       control["calls"] - control["errors"]) for a in arm_ids]
    raw_ok = [_fisher(groups[a]["runs_completed"], groups[a]["runs"] - groups[a]["runs_completed"],
                      control["runs_completed"], control["runs"] - control["runs_completed"]) for a in arm_ids]
    adj_err, adj_ok = holm(raw_err), holm(raw_ok)
    rates = {g: {"error_rate": _rate(c["errors"], c["calls"]), "success_rate": success_rate(c["runs_completed"], c["runs"])}
             for g, c in groups.items()}
    arms_out: list[dict[str, Any]] = []
    for i, a in enumerate(arm_ids):
        er, cer = rates[a]["error_rate"], rates[ARM_CONTROL]["error_rate"]
        sr, csr = rates[a]["success_rate"], rates[ARM_CONTROL]["success_rate"]
        sig_err = adj_err[i] is not None and adj_err[i] < alpha
        sig_ok = adj_ok[i] is not None and adj_ok[i] < alpha
        better = sig_err and er is not None and cer is not None and er < cer
        worse = (sig_err and er is not None and cer is not None and er > cer) or \
                (sig_ok and sr is not None and csr is not None and sr < csr)
        arms_out.append({"improvement_id": a, **groups[a], **rates[a],
                         "p_error": raw_err[i], "p_error_holm": adj_err[i], "p_success": raw_ok[i],
                         "p_success_holm": adj_ok[i], "better": better and not worse, "worse": worse})
    small = [g for g, c in groups.items() if c["runs"] < min_sample]
    best = min(arms_out, key=lambda x: (x["error_rate"] if x["error_rate"] is not None else 2,
                                        -(x["success_rate"] or 0)))
    winners = sorted([x for x in arms_out if x["better"]], key=lambda x: (x["error_rate"], -(x["success_rate"] or 0)))
    out: dict[str, Any] = {"groups": {ARM_CONTROL: {**control, **rates[ARM_CONTROL]}}, "arms": arms_out,
                           "p_omnibus": p_omni, "p_omnibus_success": p_omni_success,
                           "test": "chi-square omnibus across all groups; each arm vs control by Fisher's exact "
                                   "test, Holm-corrected", "significance_level": alpha, "min_sample_size": min_sample,
                           "best_observed": best["improvement_id"], "winner": None, "beats_runner_up": None,
                           "p_runner_up": None}
    if small:
        out.update(verdict="extend", reason=f"no winner yet: {', '.join(small)} ha{'s' if len(small) == 1 else 've'} "
                   f"fewer than {min_sample} runs (min_sample_size)")
        return out
    if winners and (p_omni is not None and p_omni < alpha):
        w = winners[0]
        others = sorted([x for x in arms_out if x is not w], key=lambda x: (x["error_rate"] if x["error_rate"]
                                                                             is not None else 2))
        runner = others[0] if others else None
        p_ru = _fisher(w["errors"], w["calls"] - w["errors"], runner["errors"], runner["calls"] - runner["errors"]) \
            if runner else None
        beats = p_ru is not None and p_ru < alpha
        out.update(verdict="winner", winner=w["improvement_id"], beats_runner_up=beats, p_runner_up=p_ru,
                   reason=(f"{w['improvement_id']} is significantly better than the control "
                           f"(error rate {_pct(w['error_rate'])} vs {_pct(rates[ARM_CONTROL]['error_rate'])}, Holm "
                           f"p={w['p_error_holm']:.3g})" + (f" and than {runner['improvement_id']} (p={p_ru:.3g})"
                                                            if beats and runner else
                                                            f"; not significantly better than {runner['improvement_id']}"
                                                            if runner else "")))
        return out
    if arms_out and all(x["worse"] for x in arms_out):
        out.update(verdict="drop", reason="every arm did significantly worse than the control; drop the experiment")
        return out
    if winners:
        reason = (f"no winner yet: {winners[0]['improvement_id']} looks better than the control, but the omnibus "
                  f"test across all groups is not significant (p={p_omni if p_omni is not None else float('nan'):.3g})")
    else:
        reason = "no winner yet: no arm is significantly better than the control after Holm's correction"
    out.update(verdict="extend", reason=reason)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _assignments(conn: sqlite3.Connection, ab_id: str, lo: datetime, hi: datetime) -> dict[str, str]:
    jd = lambda t: t.timestamp() / 86400 + 2440587.5  # noqa: E731
    sql = f"""SELECT id, json_extract(metadata, '$.selfheal_ab_arms."' || ? || '"') FROM runs
             WHERE metadata IS NOT NULL AND json_valid(metadata) AND instr(metadata, ?) > 0
               AND julianday(started_at) >= ? AND julianday(started_at) < ? AND {wellformed_run_sql()}"""
    return {rid: arm for rid, arm in conn.execute(sql, (ab_id, ab_id, jd(lo), jd(hi))) if isinstance(arm, str)}


def judge(conn: sqlite3.Connection, settings: Settings, exp: AbExperiment, *, now: datetime | None = None
          ) -> dict[str, Any]:
    """The experiment's current verdict (nothing stored)."""
    now = now or utcnow()
    etype, tool = split_pattern_id(exp.pattern_id)
    etype = normalize_error_type(etype)
    started = parse_timestamp(exp.started_at)
    end = parse_timestamp(exp.ended_at) if exp.ended_at else now
    runs = load_runs(conn, started.timestamp(), end.timestamp(), [tool]) if end > started else []
    assigned = _assignments(conn, exp.id, started, end) if end > started else {}
    names = [ARM_CONTROL, *exp.arm_ids]
    groups = {g: group_counts([r for r in runs if assigned.get(r.run_id) == g], etype, tool) for g in names}
    verdict = judge_counts(groups, alpha=settings.significance_level, min_sample=settings.min_sample_size)
    verdict.update(checked_at=format_timestamp(now), since=exp.started_at, until=format_timestamp(end),
                   runs_without_arm=len(runs) - sum(g["runs"] for g in groups.values()))
    return verdict


def status_of(conn: sqlite3.Connection, settings: Settings, exp: AbExperiment, *, now: datetime | None = None
              ) -> dict[str, Any]:
    verdict = judge(conn, settings, exp, now=now) if exp.status in ("running", "starting") else exp.verdict
    d = exp.to_dict()
    d["experiment_id"] = d.pop("id")
    d["config_section"] = f'[ab."{exp.id}"]'
    d["verdict"] = verdict
    return d


def record_verdict(conn: sqlite3.Connection, settings: Settings, ab_id: str, *, now: datetime | None = None
                   ) -> tuple[dict[str, Any], bool]:
    """Judge a running experiment and store the verdict (CAS on running); returns (status,
    whether this verdict is new to notify: once per verdict and winner)."""
    store = AbStore(conn)
    exp = store.get(ab_id)
    st = status_of(conn, settings, exp, now=now)
    v = st["verdict"] or {}
    key = f"{v.get('verdict')}:{v.get('winner')}"
    fresh = v.get("verdict") in ("winner", "drop") and exp.notified != key
    lock = _locked(settings)
    try:
        store.update(ab_id, "running", verdict=v, **({"notified": key} if fresh else {}))
    finally:
        lock.release()
    return st, fresh


# ================================================================= end


def end_ab(conn: sqlite3.Connection, settings: Settings, ab_id: str, outcome: str, *, force: bool = False,
           now: datetime | None = None) -> dict[str, Any]:
    """``promoted`` (the winner applied; refused without a significant winner unless
    ``force``, which promotes the best observed arm and is recorded) or ``dropped``."""
    now = now or utcnow()
    exp = ensure_known(conn, ab_id)
    store = AbStore(conn)
    if outcome == "promoted" and exp.status == "promoted" and exp.winner \
            and ImprovementStore(conn).get(exp.winner).status in APPLICABLE:
        # a promotion killed between its end commit and the apply (recovery finished the end)
        applied = apply_improvement(conn, settings, exp.winner, f"Promoted from A/B experiment {ab_id}", now=now)
        result = {**status_of(conn, settings, exp, now=now), "end_commit_sha": exp.end_sha, "diff": "",
                  "applied": applied}
        plugins.fire("ab_finished", experiment=result, settings=settings)
        return result
    if exp.status != "running":
        raise LifecycleError(f"{ab_id} is {exp.status}; only a running experiment can be {outcome}")
    verdict = judge(conn, settings, exp, now=now)
    winner = None
    forced = False
    if outcome == "promoted":
        winner = verdict.get("winner")
        if winner is None:
            if not force:
                raise LifecycleError(f"{ab_id} has no significant winner ({verdict['reason']}); promote the best "
                                     f"observed arm anyway with {option('force')}")
            winner, forced = verdict["best_observed"], True
        # apply would refuse the winner after the section is gone: refuse before the end
        check_apply_values(settings, ImprovementStore(conn).get(winner))
    lock = _locked(settings)
    try:
        exp = store.get(ab_id)
        if exp.status != "running":
            raise LifecycleError(f"{ab_id} changed meanwhile (now {exp.status}); nothing was changed")
        for a in exp.arm_ids:
            imp = ImprovementStore(conn).get(a)
            if imp.status != ARM_STATUS:
                raise LifecycleError(f"{a} changed meanwhile (now {imp.status}); nothing was changed")
        finish = {"status": outcome, "winner": winner, "forced": int(forced), "verdict": verdict,
                  "ended_at": format_timestamp(now)}
        exp = store.update(ab_id, "running", status="ending", pending_op={"op": "ab-end", "finish": finish})
        body = ["What:", f"  Remove [ab.\"{ab_id}\"] (the A/B experiment of {exp.pattern_id} started "
                f"{exp.started_at}).", "", "Why:",
                f"  The experiment is {outcome}" + (f": {winner} is applied to every run next" if winner else "")
                + (" (forced without a significant winner)." if forced else ".")]
        message = gitops.commit_message(f"selfheal: end A/B {ab_id} ({outcome})", body, ab_id, exp.pattern_id,
                                        "ab-end")
        try:
            sha, diff = _commit(conn, settings, exp, [], op="ab-end", action="ab-end", message=message,
                                removing=True, now=now)
        except BaseException:
            cur = store.get(ab_id)
            if cur.status == "ending" and (cur.pending_op or {}).get("op") == "ab-end" \
                    and "head_before" not in (cur.pending_op or {}):
                store.update(ab_id, "ending", status="running", pending_op=None)
            raise
        exp = _finish_end(conn, store.get(ab_id), finish, sha)
    finally:
        lock.release()
    applied = None
    if outcome == "promoted" and winner:
        note = f"Promoted from A/B experiment {ab_id}" + (f" with --force (verdict {verdict['verdict']})"
                                                         if forced else "")
        applied = apply_improvement(conn, settings, winner, note, now=now)
    result = {**status_of(conn, settings, exp, now=now), "end_commit_sha": sha, "diff": diff, "applied": applied}
    plugins.fire("ab_finished", experiment=result, settings=settings)
    return result


def _finish_end(conn: sqlite3.Connection, exp: AbExperiment, finish: dict[str, Any], sha: str | None) -> AbExperiment:
    outcome = finish.get("status")
    if outcome not in ("promoted", "dropped"):
        raise UntrustedRecordError(f"the interrupted end of {exp.id} would set status {str(outcome)[:20]!r}; refused")
    winner = finish.get("winner") if finish.get("winner") in exp.arm_ids else None
    arms = []
    for a in exp.arms:
        imp_id = str(a.get("improvement_id"))
        before = a.get("status_before") if a.get("status_before") in ARMABLE else "candidate"
        if imp_id == winner:
            to = before if before in APPLICABLE else "tested"
        elif outcome == "promoted":
            to = LOST_STATUS
        else:
            to = before
        arms.append((imp_id, (ARM_STATUS,), {"status": to}))
    verdict = finish.get("verdict") if isinstance(finish.get("verdict"), dict) else None
    ended = finish.get("ended_at") if isinstance(finish.get("ended_at"), str) else format_timestamp(utcnow())
    return AbStore(conn).update(exp.id, "ending", arms=arms, status=outcome, winner=winner, end_sha=sha,
                                forced=1 if finish.get("forced") else 0, verdict=verdict, ended_at=ended,
                                pending_op=None)


# ================================================================= recovery


def recover_ab_op(conn: sqlite3.Connection, settings: Settings, exp: AbExperiment) -> dict[str, Any]:
    """Finish (its commit exists) or undo (it does not) an interrupted start or end."""
    op = exp.pending_op or {}
    kind = op.get("op")
    if kind not in ("ab-start", "ab-end"):
        raise UntrustedRecordError(f"the interrupted operation of {exp.id} is {str(kind)[:40]!r}; refused")
    store = AbStore(conn)
    if "head_before" not in op:  # the intent was recorded, nothing written yet
        if kind == "ab-start":
            store.delete(exp.id, "starting")
        else:
            store.update(exp.id, "ending", status="running", pending_op=None)
        return {"experiment_id": exp.id, "op": kind, "action": "undone", "detail": "the config had not been changed"}
    action = "ab" if kind == "ab-start" else "ab-end"
    record = op.get("record") if isinstance(op.get("record"), dict) else {}
    cr, sha = trusted_op_commit(None, SimpleNamespace(id=exp.id), settings, op, record, action)  # type: ignore[arg-type]
    if sha:
        if kind == "ab-start":
            _finish_start(conn, exp, sha)
        else:
            _finish_end(conn, exp, op.get("finish") if isinstance(op.get("finish"), dict) else {}, sha)
        detail = f"commit {sha[:12]} exists"
        finish = op.get("finish") if isinstance(op.get("finish"), dict) else {}
        if kind == "ab-end" and finish.get("status") == "promoted":
            detail += f"; apply the winner with: {step('ab promote', exp.id)}"
        return {"experiment_id": exp.id, "op": kind, "action": "finished", "detail": detail}
    detail = undo_config_write(cr, op)
    if kind == "ab-start":
        store.delete(exp.id, "starting")
    else:
        store.update(exp.id, "ending", status="running", pending_op=None)
    return {"experiment_id": exp.id, "op": kind, "action": "undone", "detail": detail}


def recover_ab(conn: sqlite3.Connection, settings: Settings) -> list[dict[str, Any]]:
    """Every interrupted A/B start or end, finished or undone (see :mod:`.recovery`)."""
    if not has_ab_table(conn):
        return []
    rows = conn.execute("SELECT id FROM selfheal_ab WHERE pending_op IS NOT NULL").fetchall()
    if not rows:
        return []
    lock = lock_for(settings)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return []
    out = []
    try:
        for (ab_id,) in rows:
            exp = AbStore(conn).get(ab_id)
            if not exp.pending_op:
                continue
            try:
                out.append(recover_ab_op(conn, settings, exp))
            except (SelfHealError, OSError) as exc:
                out.append({"experiment_id": ab_id, "op": str(exp.pending_op.get("op"))[:40], "action": "failed",
                            "detail": " ".join(str(exc).split())})
            except AbChangedError as exc:  # pragma: no cover - a concurrent writer
                out.append({"experiment_id": ab_id, "op": "?", "action": "failed", "detail": str(exc)})
    finally:
        lock.release()
    return out


def running_experiments(conn: sqlite3.Connection) -> list[AbExperiment]:
    """Experiments whose section is in force (for the dashboard and the daemon)."""
    if not has_ab_table(conn):
        return []
    return AbStore(conn).list("running")


def all_experiments(conn: sqlite3.Connection) -> list[AbExperiment]:
    return AbStore(conn).list() if has_ab_table(conn) else []


def ensure_known(conn: sqlite3.Connection, ab_id: str) -> AbExperiment:
    if not has_ab_table(conn):  # an unknown id creates nothing
        raise NotFoundError(f"no A/B experiment {ab_id!r} (see: {step('ab status')})")
    return AbStore(conn).get(ab_id)


