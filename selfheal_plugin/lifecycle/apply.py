"""Apply and roll back improvements: config edit, git commit and database, kept in step.

An apply goes through named steps; the intent is in the database (``pending_op``)
before the file changes, and the commit sha after::

    validate → intent (DB) → write config (atomic) → git commit → sha (DB) → applied (DB)
                   │ after-intent   │ after-write       │ after-commit │ before-db-update

A crash anywhere leaves ``pending_op`` set. :func:`recover`, which every lifecycle
command calls first, finishes an operation whose commit exists (the commit is the point
of no return) and undoes one whose commit does not (the file gets its old bytes back, the
index entry is reset), so config file, git and database always agree. Setting
``SELFHEAL_CRASH_AT=<step>`` makes the process exit at that step (tests prove recovery
from each). Rollback has the same shape with steps ``rollback-after-intent``,
``rollback-after-write`` and ``rollback-after-commit``.

A step that *fails* (a git error such as a locked index, a full disk) is undone at once by
the same code a recovery runs — config back to its old bytes, index entry reset, intent
cleared — and reported on one line with git's own reason; config, git and database never
disagree until some later command.

One process at a time: ``BINKS_HOME/selfheal/locks/apply.lock`` guards apply, rollback and
recovery; recovery skips while another command holds it. (The locks folder has its own
``.gitignore``, so a dotfiles repository holding BINKS_HOME never sees the lock.)
"""
from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from selfheal_plugin.lifecycle import configedit

from selfheal_plugin.lifecycle import gitops

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.configedit import ConfigChange, sha256_text
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.history.settings import Settings, lock_dir
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow

log = logging.getLogger("selfheal.apply")

CRASH_ENV = "SELFHEAL_CRASH_AT"
APPLY_STEPS = ("after-intent", "after-write", "after-commit", "before-db-update")
ROLLBACK_STEPS = ("rollback-after-intent", "rollback-after-write", "rollback-after-commit")
LOCK_TIMEOUT_S = 30.0
APPLICABLE = ("proposed", "tested")
ROLLBACKABLE = ("applied", "verified")
ABSENT = "absent"  # the content hash we show for a config file that does not exist


class LifecycleError(SelfHealError):
    """An improvement is not in a state for this operation, or the operation was refused."""


class ConflictError(LifecycleError):
    """A later edit by the user touches a key selfheal would have to change back."""


def crash_point(step: str) -> None:
    """Exit at once (no cleanup, like a kill) when ``SELFHEAL_CRASH_AT`` names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(99)


def lock_for(settings: Settings) -> FileLock:
    return FileLock(str(lock_dir(settings.home) / "apply.lock"))


def _locked(settings: Settings) -> FileLock:
    lock = lock_for(settings)
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise LifecycleError("another selfheal command is applying or rolling back an improvement; "
                             "nothing was changed, try again") from None
    return lock


def fire(hook: str, **kwargs: Any) -> None:
    """Call a lifecycle hook of the plugin system (notifications and third-party reactions)."""
    plugins.fire(hook, **kwargs)


def atomic_write(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename over the target, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.selfheal-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_temp_files(path: Path) -> None:
    for tmp in path.parent.glob(f".{path.name}.selfheal-*.tmp"):
        tmp.unlink(missing_ok=True)


def read_text(path: Path) -> str | None:
    """The file's text exactly as stored (no newline translation: a CRLF file stays CRLF,
    so hashes, diffs and the bytes a recovery writes back are the file's own)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SelfHealError(f"cannot read {path}: {exc.strerror or exc}") from exc


def display_path(path: Path) -> str:
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ planning


def _config_changes(imp: Improvement) -> tuple[list[ConfigChange], list[str]]:
    return configedit.split_changes(imp.changes)


def plan_apply(conn: sqlite3.Connection, settings: Settings, improvement_id: str) -> dict[str, Any]:
    """What ``apply`` would do, changing nothing: the diff, the repository, the checks.

    Raises the same refusals ``apply`` would (wrong status, forbidden change, unparsable
    or uncommitted config).
    """
    imp = ImprovementStore(conn).get(improvement_id)
    _check_applicable(imp)
    changes, manual = _config_changes(imp)
    plan: dict[str, Any] = {"improvement_id": imp.id, "description": imp.description, "manual_steps": manual,
                            "config_changes": [c.to_dict() for c in changes], "diff": "", "config_path": None,
                            "repository": None, "creates_repository": False, "old_sha256": None}
    if not changes:
        return plan
    cr = gitops.locate(settings.config_path, settings.home)
    old = read_text(cr.real_path)
    edit = configedit.edit_config(old, changes, where=str(cr.real_path))
    gitops.check_clean(cr)
    if not edit.changed:
        raise LifecycleError(f"{display_path(settings.config_path)} already holds these values; nothing to apply")
    plan.update({"diff": configedit.unified_diff(old, edit.new_text), "config_path": str(cr.real_path),
                 "repository": str(cr.root), "creates_repository": cr.repo is None, "old_sha256": sha256_text(old) or ABSENT,
                 "edits": configedit.describe_entries(edit.entries)})
    return plan


def _check_applicable(imp: Improvement) -> None:
    if imp.pending_op:
        raise LifecycleError(f"{imp.id} has an interrupted {imp.pending_op.get('op')} that could not be recovered; "
                             "see the warning above")
    if imp.status not in APPLICABLE:
        hint = " (roll it back first: agent self-heal rollback)" if imp.status in ROLLBACKABLE else ""
        raise LifecycleError(f"{imp.id} is {imp.status}; only proposed or tested improvements can be applied{hint}")


# ------------------------------------------------------------------ apply


def apply_improvement(conn: sqlite3.Connection, settings: Settings, improvement_id: str,
                      changes_made: str | None = None, *, expected_sha256: str | None = None,
                      now: datetime | None = None) -> dict[str, Any]:
    """Apply an improvement: edit config.toml, commit it, record it, notify.

    Config changes are written with tomlkit (the rest of the file byte-identical),
    atomically, and committed alone with trailers ``Self-Heal-Improvement`` and
    ``Self-Heal-Pattern``. A proposal with only manual steps is recorded as applied with
    ``changes_made`` (what the person did), without a commit.
    ``expected_sha256`` (from :func:`plan_apply`) refuses when the file changed since the
    diff was shown. Returns the design document's fields plus commit and diff.
    """
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    _check_applicable(imp)
    changes, manual = _config_changes(imp)
    now = now or utcnow()
    if not changes:
        if not (changes_made and changes_made.strip()):
            raise UsageError(f"{imp.id} has only manual steps; say what was done with --changes-made TEXT "
                             f"(steps: {'; '.join(manual) or 'none listed'})")
        imp = _record_applied(store, imp, settings, now, commit_sha=None, changes_made=changes_made.strip(),
                              record=None)
        _notify_applied(imp, settings)
        return _applied_result(imp, manual, diff="", creates=False)
    lock = _locked(settings)
    try:
        imp = store.get(improvement_id)  # another process may have applied it meanwhile
        _check_applicable(imp)
        cr = gitops.locate(settings.config_path, settings.home)
        old = read_text(cr.real_path)
        edit = configedit.edit_config(old, changes, where=str(cr.real_path))
        gitops.check_clean(cr)
        if expected_sha256 is not None and (sha256_text(old) or ABSENT) != expected_sha256:
            raise LifecycleError(f"{cr.real_path} changed since the diff was shown; nothing was changed, run "
                                 "apply again")
        if not edit.changed:
            raise LifecycleError(f"{display_path(settings.config_path)} already holds these values; nothing to apply")
        creates = cr.repo is None
        gitops.ensure_repo(cr)
        lines = configedit.describe_entries(edit.entries)
        record = {"config_path": str(settings.config_path), "real_path": str(cr.real_path), "repo": str(cr.root),
                  "entries": edit.entries, "created_tables": edit.created_tables, "file_existed": old is not None}
        intent = {"op": "apply", "step": "intent", "started_at": format_timestamp(now),
                  "head_before": gitops.head_sha(cr), "old_sha256": sha256_text(old),
                  "new_sha256": sha256_text(edit.new_text), "old_text": old, "record": record}
        store.update(imp.id, pending_op=intent)
        crash_point("after-intent")
        try:
            atomic_write(cr.real_path, edit.new_text)
            crash_point("after-write")
            sha = gitops.commit_config(cr, _apply_message(imp, lines, manual))
        except (SelfHealError, OSError) as exc:
            imp = abort_operation(store, settings, imp.id, exc, "apply")  # raises unless the commit exists
        else:
            crash_point("after-commit")
            store.update(imp.id, pending_op={**intent, "step": "committed", "commit_sha": sha})
            crash_point("before-db-update")
            text = _changes_made_text(settings, lines, changes_made)
            imp = _record_applied(store, imp, settings, now, commit_sha=sha, changes_made=text, record=record)
    finally:
        lock.release()
    _notify_applied(imp, settings)
    return _applied_result(imp, manual, diff=configedit.unified_diff(old, edit.new_text), creates=creates)


def _apply_message(imp: Improvement, lines: list[str], manual: list[str]) -> str:
    subject = f"selfheal: {imp.description}".splitlines()[0][:72].rstrip()
    body = ["What:", *[f"  {ln}" for ln in lines], "", "Why:"]
    if imp.pattern_id:
        body.append(f"  Recurring failure pattern {imp.pattern_id}"
                    + (f" (confidence {imp.confidence:.0%})" if imp.confidence is not None else "") + ".")
    body.append(f"  {imp.description}")
    if imp.expected_impact:
        body.append(f"  Expected impact: {imp.expected_impact}")
    tr = imp.test_result or {}
    if tr.get("recommendation"):
        body.append(f"  Simulation: {tr.get('recommendation')}"
                    + (f", {tr['expected_improvement']} success rate" if tr.get("expected_improvement") else ""))
    if imp.strategy:
        body.append(f"  Strategy: {imp.strategy}; risk: {imp.risk_level or 'unknown'}")
    if manual:
        body += ["", "Manual steps (not done by this commit):", *[f"  - {m}" for m in manual]]
    return gitops.commit_message(subject, body, imp.id, imp.pattern_id, "apply")


def _changes_made_text(settings: Settings, lines: list[str], note: str | None) -> str:
    text = "\n".join(f"Updated {display_path(settings.config_path)} {ln}" for ln in lines)
    return f"{note.strip()}\n{text}" if note and note.strip() else text


def _record_applied(store: ImprovementStore, imp: Improvement, settings: Settings, when: datetime,
                    commit_sha: str | None, changes_made: str, record: dict[str, Any] | None) -> Improvement:
    scheduled = when + timedelta(days=settings.measurement_window_days)
    return store.update(imp.id, status="applied", applied_at=format_timestamp(when),
                        verification_scheduled=format_timestamp(scheduled), commit_sha=commit_sha,
                        changes_made=changes_made, apply_record=record, pending_op=None)


def _applied_result(imp: Improvement, manual: list[str], diff: str, creates: bool) -> dict[str, Any]:
    rec = imp.apply_record or {}
    return {"improvement_id": imp.id, "status": imp.status, "applied_at": imp.applied_at,
            "verification_scheduled": imp.verification_scheduled, "commit_sha": imp.commit_sha,
            "changes_made": imp.changes_made, "config_path": rec.get("real_path"), "repository": rec.get("repo"),
            "created_repository": creates, "manual_steps": manual, "diff": diff}


def _notify_applied(imp: Improvement, settings: Settings) -> None:
    fire("improvement_applied", improvement=imp, settings=settings)


# ------------------------------------------------------------------ rollback


def rollback_improvement(conn: sqlite3.Connection, settings: Settings, improvement_id: str, *,
                         reason: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Undo an applied improvement.

    When no later commit touched the config, ``git revert`` of the apply commit (with
    ``--no-commit`` and our own commit, for the identity and trailers); otherwise the
    inverse tomlkit edit: previous values back, keys the apply added removed. A key the
    user changed since is a :class:`ConflictError` and nothing changes. A manual-only
    improvement is marked rolled back (its steps must be undone by hand).
    """
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    if imp.status not in ROLLBACKABLE:
        raise LifecycleError(f"{imp.id} is {imp.status}; only applied or verified improvements can be rolled back")
    now = now or utcnow()
    if not imp.commit_sha:
        imp = store.update(imp.id, status="rolled_back", rolled_back_at=format_timestamp(now), pending_op=None)
        fire("improvement_rolled_back", improvement=imp, settings=settings)
        return _rolled_back_result(imp, method="manual", diff="",
                                   note="no config change was committed; undo the manual steps by hand")
    record = imp.apply_record or {}
    lock = _locked(settings)
    try:
        imp = store.get(improvement_id)
        if imp.status not in ROLLBACKABLE:
            raise LifecycleError(f"{imp.id} is {imp.status}; only applied or verified improvements can be rolled back")
        cr = gitops.locate(Path(record.get("config_path") or settings.config_path), settings.home)
        if cr.repo is None or not gitops.has_commit(cr, imp.commit_sha):
            raise LifecycleError(f"commit {imp.commit_sha[:12]} of {imp.id} is not in the repository holding "
                                 f"{cr.real_path}; nothing was changed")
        current = read_text(cr.real_path)
        current_data = configedit.parse_config_text(current, str(cr.real_path))
        gitops.check_clean(cr)
        if gitops.changed_since(cr, imp.commit_sha):
            method = "inverse-edit"
            conflicts = configedit.conflicts_with(current_data, record.get("entries", []))
            if conflicts:
                raise ConflictError(f"{cr.real_path} was edited after {imp.id} was applied: {'; '.join(conflicts)}. "
                                    "Not overwriting your edit; nothing was changed (undo it by hand if needed)")
            inverse = configedit.inverse_changes(record.get("entries", []))
            new = configedit.edit_config(current, inverse, where=str(cr.real_path)).new_text
            new = configedit.remove_empty_tables(new, record.get("created_tables", []))
        else:
            method = "revert"
            new = gitops.file_at(cr, f"{imp.commit_sha}^")
        head_before = gitops.head_sha(cr)
        intent = {"op": "rollback", "method": method, "step": "intent", "started_at": format_timestamp(now),
                  "head_before": head_before, "old_sha256": sha256_text(current), "new_sha256": sha256_text(new),
                  "old_text": current, "record": record}
        store.update(imp.id, pending_op=intent)
        crash_point("rollback-after-intent")
        lines = [f"{configedit.dotted_key(e['path'])}: {configedit.format_value(e['new'])} → "
                 f"{configedit.format_value(e['old']) if e['existed'] else '(removed)'}"
                 for e in record.get("entries", [])]
        body = ["What:", *[f"  {ln}" for ln in lines], "", "Why:",
                f"  {reason or 'Rollback requested'} (applied in {imp.commit_sha[:12]}).",
                f"  Method: {'git revert' if method == 'revert' else 'inverse edit (the file changed since)'}."]
        try:
            if method == "revert":
                gitops.revert_no_commit(cr, imp.commit_sha)
            else:
                atomic_write(cr.real_path, new)
            crash_point("rollback-after-write")
            sha = gitops.commit_config(cr, gitops.commit_message(
                f"selfheal: roll back {imp.id}", body, imp.id, imp.pattern_id, "rollback"))
        except (SelfHealError, OSError) as exc:
            imp = abort_operation(store, settings, imp.id, exc, "rollback")  # raises unless the commit exists
        else:
            crash_point("rollback-after-commit")
            imp = store.update(imp.id, status="rolled_back", rollback_sha=sha,
                               rolled_back_at=format_timestamp(now), pending_op=None)
    finally:
        lock.release()
    fire("improvement_rolled_back", improvement=imp, settings=settings)
    return _rolled_back_result(imp, method=method, diff=configedit.unified_diff(current, new))


def _rolled_back_result(imp: Improvement, method: str, diff: str, note: str | None = None) -> dict[str, Any]:
    out = {"improvement_id": imp.id, "status": imp.status, "rolled_back_at": imp.rolled_back_at,
           "rollback_sha": imp.rollback_sha, "commit_sha": imp.commit_sha, "method": method, "diff": diff}
    if note:
        out["note"] = note
    return out


# ------------------------------------------------------------------ reject


def reject_improvement(conn: sqlite3.Connection, settings: Settings, improvement_id: str) -> dict[str, Any]:
    """proposed/tested → rejected (a new proposal for the pattern may then be made)."""
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    if imp.status not in APPLICABLE:
        raise LifecycleError(f"{imp.id} is {imp.status}; only proposed or tested improvements can be rejected")
    imp = store.update(imp.id, status="rejected")
    return {"improvement_id": imp.id, "status": imp.status}


def recover_apply_op(store: ImprovementStore, imp: Improvement, settings: Settings) -> dict[str, Any]:
    """Finish (the commit exists) or undo (it does not) an interrupted apply or rollback."""
    op = imp.pending_op or {}
    kind = op.get("op")
    record = op.get("record") or {}
    cr = gitops.locate(Path(record.get("config_path") or settings.config_path), settings.home)
    started = parse_timestamp(op["started_at"]) if op.get("started_at") else utcnow()
    action = "rollback" if kind == "rollback" else "apply"
    sha = op.get("commit_sha") or gitops.find_commit(cr, imp.id, action, op.get("head_before"))
    if sha:
        if kind == "apply":
            lines = configedit.describe_entries(record.get("entries", []))
            _record_applied(store, imp, settings, started, commit_sha=sha,
                            changes_made=_changes_made_text(settings, lines, None), record=record)
        else:
            store.update(imp.id, status="rolled_back", rollback_sha=sha, rolled_back_at=format_timestamp(started),
                         pending_op=None)
        return {"improvement_id": imp.id, "op": kind, "action": "finished", "detail": f"commit {sha[:12]} exists"}
    detail = undo_config_write(cr, op)
    store.update(imp.id, pending_op=None)
    return {"improvement_id": imp.id, "op": kind, "action": "undone", "detail": detail}


def undo_config_write(cr: gitops.ConfigRepo, op: dict[str, Any]) -> str:
    """Put config file and index entry back as they were before an operation whose commit
    was never made (``op``: its intent with ``old_text`` and both hashes). Returns what was
    done. Shared by recovery, by a step that failed (:func:`abort_operation`) and by the
    canary/shadow section edits."""
    _remove_temp_files(cr.real_path)
    current = read_text(cr.real_path)
    h = sha256_text(current)
    if h == op.get("new_sha256") and h != op.get("old_sha256"):
        old = op.get("old_text")
        if old is None:
            cr.real_path.unlink(missing_ok=True)
        else:
            atomic_write(cr.real_path, old)
        _reset_index(cr)
        return "config restored to its previous content"
    if h == op.get("old_sha256"):
        _reset_index(cr)
        return "the config had not been changed yet"
    gitops.end_revert_state(cr)
    return "the config was edited since; left as it is"


def _reset_index(cr: gitops.ConfigRepo) -> None:
    """The config's index entry back to HEAD. A git that cannot do it (a locked index) is
    fine when nothing is staged anyway — the failed command never got to stage it."""
    try:
        gitops.restore_index_and_file(cr, "")
    except gitops.GitOpsError:
        if not gitops.index_matches_head(cr):
            raise
        try:
            gitops.end_revert_state(cr)
        except gitops.GitOpsError:
            pass


def abort_operation(store: ImprovementStore, settings: Settings, improvement_id: str, exc: BaseException,
                    what: str, recover_one: Callable[..., dict[str, Any]] | None = None) -> Improvement:
    """A write or commit step failed after the intent was recorded: run recovery for this
    improvement now (not on some later command). When the commit exists after all, the
    operation is finished and the row returned; otherwise the edit is undone and a one-line
    :class:`LifecycleError` with the cause (git's own reason) is raised. The caller holds
    the lock."""
    reason = _one_line(exc)
    try:
        action = (recover_one or recover_apply_op)(store, store.get(improvement_id), settings)
    except (SelfHealError, OSError) as undo_exc:
        raise LifecycleError(f"{what} of {improvement_id} failed: {reason}; undoing it failed too "
                             f"({_one_line(undo_exc)}), the next selfheal command will retry") from exc
    if action["action"] == "finished":
        log.warning("%s of %s reported %s, but its commit exists: finished", what, improvement_id, reason)
        return store.get(improvement_id)
    outcome = ("the config was edited meanwhile and is left as it is" if "edited since" in action["detail"]
               else f"{action['detail']}, nothing was changed")
    raise LifecycleError(f"{what} of {improvement_id} failed: {reason.rstrip('.')}; {outcome}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    return " ".join(text.split()) or type(exc).__name__
