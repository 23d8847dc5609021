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

Once the commit exists, the database writes that record it wait for a busy database
(:func:`after_commit`, :data:`AFTER_COMMIT_ATTEMPTS` busy timeouts); a database still busy
then is :class:`RecordPendingError`, which names the commit (never "nothing was changed")
and leaves the intent for recovery to finish.

A step that *fails* (a git error such as a locked index, a full disk) is undone at once by
the same code a recovery runs — config back to its old bytes, index entry reset, intent
cleared — and reported on one line with git's own reason; config, git and database never
disagree until some later command.

One process at a time: ``BINKS_HOME/selfheal/locks/apply.lock`` guards apply, rollback and
recovery; recovery skips while another command holds it. Every status change (apply,
reject, rollback, test, verify, canary start/end) is a compare-and-set on the status it
read, made under that lock (:func:`update_status`, :func:`update_if_unchanged`); the loser
of a race gets ``<id> changed meanwhile (now STATUS)`` and nothing changes.

The database is written by another program: nothing read from it chooses what is written.
Recovery and rollback work on the home's own config file and repository only
(:func:`home_config_repo`), write back only text git has at HEAD, and revert only a full
commit id reachable from HEAD that carries our trailers for that improvement and touched
the config alone (:func:`gitops.untrusted_commit`); anything else is one line
(:class:`UntrustedRecordError`) and nothing is written. ``SELFHEAL_PAUSE_AT=<step>`` with
``SELFHEAL_PAUSE_DIR`` holds a process at a step (crash steps, ``lock-busy``,
``before-conditional-write``, ``busy-after-commit``; several separated by commas) until a
file says go, so tests can order racing processes. (The locks folder has its own
``.gitignore``, so a dotfiles repository holding BINKS_HOME never sees the lock.)
"""
from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from selfheal_plugin.lifecycle import configedit

from selfheal_plugin.lifecycle import gitops

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.configedit import ConfigChange, sha256_text
from selfheal_plugin.lifecycle.cooldown import undone_before
from selfheal_plugin.errors import ConfigError, LifecycleError, SelfHealError, UsageError
from selfheal_plugin.history.connection import check_writable, is_busy_error, one_line
from selfheal_plugin.history.improvements import Improvement, ImprovementStore, StatusChangedError
from selfheal_plugin.history.settings import Settings, lock_dir, read_config_text
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.steps import option, step

log = logging.getLogger("selfheal.apply")

CRASH_ENV = "SELFHEAL_CRASH_AT"
PAUSE_ENV = "SELFHEAL_PAUSE_AT"  # tests: stop at a step until told to go on (orders racing processes)
PAUSE_DIR_ENV = "SELFHEAL_PAUSE_DIR"
PAUSE_LIMIT_S = 300.0
# Once its commit exists, an apply or rollback tries its database write this many times (each
# waits the busy timeout, SELFHEAL_BUSY_TIMEOUT_MS: 10 s, a minute in all by default) before it reports
# the commit with its record left to recovery (RecordPendingError), never "nothing was changed".
AFTER_COMMIT_ATTEMPTS = 6
APPLY_STEPS = ("after-intent", "after-write", "after-commit", "before-db-update")
ROLLBACK_STEPS = ("rollback-after-intent", "rollback-after-write", "rollback-after-commit")
LOCK_TIMEOUT_S = 30.0
APPLICABLE = ("proposed", "tested")
ROLLBACKABLE = ("applied", "verified")
ABSENT = "absent"  # the content hash we show for a config file that does not exist


class ConflictError(LifecycleError):
    """A later edit by the user touches a key selfheal would have to change back."""


class ChangedMeanwhileError(LifecycleError):
    """Another command changed the improvement's status between our read and our write
    (the loser of a race); nothing was changed."""


class UntrustedRecordError(LifecycleError):
    """A database row names a file, repository, text or commit that is not this home's own
    (the history database is written by another program); nothing was written."""


class RecordPendingError(LifecycleError):
    """The commit of an apply or rollback exists (the change is in force), but the history
    database stayed busy or refused the write that records it: the intent (``pending_op``)
    stays, and :func:`~selfheal_plugin.lifecycle.recovery.recover` on the next command
    finishes the record. Exit code 5 in the CLI (docs/cli.md)."""

    exit_code = 5


def crash_point(step: str) -> None:
    """Exit at once (no cleanup, like a kill) when ``SELFHEAL_CRASH_AT`` names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(99)
    pause_point(step)


def pause_point(step: str) -> None:
    """When ``SELFHEAL_PAUSE_AT`` names this step (one, or several separated by commas): create ``<SELFHEAL_PAUSE_DIR>/<step>.reached``
    and wait until ``<step>.go`` exists there (at most :data:`PAUSE_LIMIT_S`). Lets a test
    hold one process at a known point while another runs, with files, not sleeps."""
    if step not in os.environ.get(PAUSE_ENV, "").split(",") or not os.environ.get(PAUSE_DIR_ENV):
        return
    folder = Path(os.environ[PAUSE_DIR_ENV])
    (folder / f"{step}.reached").touch()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not (folder / f"{step}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def lock_for(settings: Settings) -> FileLock:
    try:
        return FileLock(str(lock_dir(settings.home) / "apply.lock"))
    except OSError as exc:  # a home this user cannot write: no lock folder can be made
        raise LifecycleError(f"the home is read-only ({settings.home}): cannot create selfheal's lock "
                             f"({_one_line(exc)}); nothing was changed") from None


def _locked(settings: Settings) -> FileLock:
    lock = lock_for(settings)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pause_point("lock-busy")
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise LifecycleError("another selfheal command is applying or rolling back an improvement; "
                             "nothing was changed, try again") from None
    except OSError as exc:  # the lock file cannot be created (a read-only lock folder)
        raise LifecycleError(f"the home is read-only ({lock.lock_file}): cannot take selfheal's lock "
                             f"({_one_line(exc)}); nothing was changed") from None
    return lock


def update_status(store: ImprovementStore, improvement_id: str, expected: str | tuple[str, ...],
                  what: str = "nothing was changed", **fields: Any) -> Improvement:
    """Compare-and-set: write ``fields`` only while the row is still ``expected`` (the
    status the caller read); else :class:`ChangedMeanwhileError` and nothing is written.
    The caller holds the apply lock, so the check and every file/git step it guards
    happen while no other selfheal command changes the row."""
    try:
        return store.update(improvement_id, expect_status=expected, **fields)
    except StatusChangedError as exc:
        raise ChangedMeanwhileError(f"{improvement_id} changed meanwhile (now {exc.actual}); {what}") from None


def update_if_unchanged(store: ImprovementStore, settings: Settings, imp: Improvement,
                        what: str = "nothing was changed", **fields: Any) -> Improvement:
    """Take the apply lock and write ``fields`` only if ``imp`` is still in the status it was
    read in (for a result computed without the lock: a simulation, a verification)."""
    pause_point("before-conditional-write")
    lock = _locked(settings)
    try:
        return update_status(store, imp.id, imp.status, what, **fields)
    finally:
        lock.release()


def after_commit(store: ImprovementStore, improvement_id: str, sha: str, done: str,
                 write: Callable[[], Improvement], landed: Callable[[Improvement], bool]) -> Improvement:
    """Make a database ``write`` that follows commit ``sha`` (the point of no return): a
    busy database is waited for :data:`AFTER_COMMIT_ATTEMPTS` times (the intent in the row
    makes a retry safe; ``landed`` says whether an attempt whose read-back failed was written
    after all). When it still cannot be written, :class:`RecordPendingError` says what is
    true — ``done`` (e.g. "applied") with the commit, the record left to recovery — never
    "nothing was changed"."""
    reason = ""
    for attempt in range(AFTER_COMMIT_ATTEMPTS):
        if attempt:
            pause_point("busy-after-commit")
            try:
                current = store.get(improvement_id)
            except sqlite3.OperationalError as exc:
                if not is_busy_error(exc):
                    reason = f"could not be read ({one_line(exc)})"
                    break
            else:
                if landed(current):
                    return current
        try:
            return write()
        except sqlite3.OperationalError as exc:
            if not is_busy_error(exc):
                reason = f"could not be written ({one_line(exc)})"
                break
            reason = "is busy"
            log.info("%s of %s committed in %s; the history database is busy (attempt %d of %d)",
                     done, improvement_id, sha[:12], attempt + 1, AFTER_COMMIT_ATTEMPTS)
    raise RecordPendingError(f"{done} {improvement_id} (commit {sha[:12]}), but the history database {reason}: "
                             f"the record will be completed by the next command (or run {step('improvements')})")


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
    so hashes, diffs and the bytes a recovery writes back are the file's own).

    Never blocks and never reads anything but a regular file (a FIFO at config.toml would
    hang every command); invalid UTF-8 is a :class:`ConfigError` like invalid TOML
    (:func:`~selfheal_plugin.history.settings.read_config_text`)."""
    return read_config_text(path)


def display_path(path: Path) -> str:
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ the home's own config


def _same_file(value: object, *allowed: str) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return os.path.realpath(value) in allowed
    except (ValueError, OSError):  # a NUL byte, a loop
        return False


def home_config_repo(settings: Settings, record: Any, what: str) -> gitops.ConfigRepo:
    """The home's own config file and its repository — never a path read from the
    database. A ``record`` (an intent's or apply's, from the database) naming any other
    config file or repository is refused with :class:`UntrustedRecordError`."""
    cr = gitops.locate(settings.config_path, settings.home)
    record = record if isinstance(record, dict) else {}
    allowed = (os.path.realpath(settings.config_path), str(cr.real_path))
    for key in ("config_path", "real_path"):
        value = record.get(key)
        if value is not None and not _same_file(value, *allowed):
            raise UntrustedRecordError(f"{what} names {str(value)[:200]!r} as its config file, not this home's "
                                       f"{settings.config_path}; refused, nothing was changed (a home moved or "
                                       "copied since the apply: undo its commit by hand, git revert)")
    repo = record.get("repo")
    if repo is not None and not _same_file(repo, str(cr.root)):
        raise UntrustedRecordError(f"{what} names {str(repo)[:200]!r} as its repository, not {cr.root} (which holds "
                                   f"{settings.config_path}); refused, nothing was changed")
    return cr


def check_entries(cr: gitops.ConfigRepo, sha: str, entries: Any, what: str) -> list[dict[str, Any]]:
    """The apply record's key edits (from the database), accepted only when the apply
    commit ``sha`` really made them: each key held ``old`` in the commit's parent and
    ``new`` in the commit. An inverse edit then only ever writes values git had."""
    if not isinstance(entries, list):
        raise UntrustedRecordError(f"{what}: the recorded edits are not a list; refused, nothing was changed")
    before = configedit.parse_config_text(gitops.file_at(cr, f"{sha}^"), f"{cr.rel} at {sha[:12]}^")
    after = configedit.parse_config_text(gitops.file_at(cr, sha), f"{cr.rel} at {sha[:12]}")
    for e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("path"), list) and e["path"]
              and all(isinstance(p, str) and p for p in e["path"]) and e.get("op") in ("set", "delete")
              and isinstance(e.get("existed"), bool))
        if ok:
            old, new = configedit.lookup(before, e["path"]), configedit.lookup(after, e["path"])
            ok = ((configedit.is_missing(old) if not e["existed"] else old == e.get("old"))
                  and (configedit.is_missing(new) if e["op"] == "delete" else new == e.get("new")))
        if not ok:
            shown = configedit.dotted_key(e["path"]) if isinstance(e, dict) and isinstance(e.get("path"), list) \
                and all(isinstance(p, str) for p in e["path"]) else repr(e)[:80]
            raise UntrustedRecordError(f"{what}: the recorded edit of {shown} is not what commit {sha[:12]} "
                                       "changed; refused, nothing was changed")
    return entries


def _created_tables(record: dict[str, Any]) -> list[list[str]]:
    tables = record.get("created_tables")
    if not isinstance(tables, list):
        return []
    return [t for t in tables if isinstance(t, list) and t and all(isinstance(p, str) for p in t)]


# ------------------------------------------------------------------ planning


def check_tool_values(text: str | None, where: Path, *, written: bool = False) -> None:
    """Refuse to apply when a ``[tools]`` or ``[servers]`` value in ``text`` is one the runtime
    refuses (:func:`~selfheal_plugin.history.settings.check_tool_tables`): in the file as it is,
    a change would replace the person's value silently or leave a file ToolPolicy does not load;
    in what a change would write (``written``), the change is wrong."""
    refused = configedit.refused_values(configedit.parse_config_text(text, str(where)), where)
    if refused is None:
        return
    if written:
        raise configedit.ChangeError(f"the change would write a value the runtime refuses: {refused}; "
                                     "nothing was changed")
    raise ConfigError(f"{refused}; fix it first, nothing was changed")


def check_config_write(old: str | None, new: str | None, where: Path) -> None:
    """The one check before selfheal writes config.toml — an apply, a canary/shadow or A/B
    section, the end of one that is promoted: :func:`check_tool_values` on the file as it is
    (``old``) and on what would be written (``new``). A rollback, and the drop of our own
    section, do not ask it: undoing our own change must work whatever else the file holds."""
    check_tool_values(old, where)
    check_tool_values(new, where, written=True)


def check_apply_values(settings: Settings, imp: Improvement) -> None:
    """What :func:`apply_improvement` of ``imp`` would refuse about ``[tools]``/``[servers]``
    values (:func:`check_config_write` on its edit of the file as it is now), for a promotion
    to ask before it ends the experiment whose winner it applies next."""
    changes, _manual = _config_changes(imp)
    cr = gitops.locate(settings.config_path, settings.home)
    old = read_text(cr.real_path)
    new = configedit.edit_config(old, changes, where=str(cr.real_path)).new_text if changes else old
    check_config_write(old, new, cr.real_path)


def _config_changes(imp: Improvement) -> tuple[list[ConfigChange], list[str]]:
    return configedit.split_changes(imp.changes)


def plan_apply(conn: sqlite3.Connection, settings: Settings, improvement_id: str) -> dict[str, Any]:
    """What ``apply`` would do, changing nothing: the diff, the repository, the checks.

    Raises the same refusals ``apply`` would (wrong status, forbidden change, unparsable
    or uncommitted config).
    """
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    if imp.pending_op:  # maybe an apply or rollback running in another process: let it finish, look again
        lock = _locked(settings)
        try:
            fresh = store.get(improvement_id)
        finally:
            lock.release()
        if fresh.status != imp.status:
            raise ChangedMeanwhileError(f"{imp.id} changed meanwhile (now {fresh.status}); nothing was changed")
        imp = fresh
    _check_applicable(imp)
    changes, manual = _config_changes(imp)
    plan: dict[str, Any] = {"improvement_id": imp.id, "description": imp.description, "manual_steps": manual,
                            "config_changes": [c.to_dict() for c in changes], "diff": "", "config_path": None,
                            "repository": None, "creates_repository": False, "old_sha256": None,
                            # what its last test said and the same change undone lately: said before anything
                            # is asked, and again in apply's result
                            **apply_notes(imp)}
    if not changes:
        return plan
    cr = gitops.locate(settings.config_path, settings.home)
    old = read_text(cr.real_path)
    edit = configedit.edit_config(old, changes, where=str(cr.real_path))
    check_config_write(old, edit.new_text, cr.real_path)
    gitops.check_clean(cr)
    if not edit.changed:
        raise LifecycleError(f"{display_path(settings.config_path)} already holds these values; nothing to apply")
    check_writable(conn)  # refused before the question, as apply would refuse it
    gitops.check_can_commit(cr)
    plan.update({"diff": configedit.unified_diff(old, edit.new_text), "config_path": str(cr.real_path),
                 "repository": str(cr.root), "creates_repository": cr.repo is None, "old_sha256": sha256_text(old) or ABSENT,
                 "edits": configedit.describe_entries(edit.entries)})
    return plan


def apply_notes(imp: Improvement) -> dict[str, Any]:
    """What whoever applies ``imp`` must hear, the same in :func:`plan_apply` (before the
    question) and :func:`apply_improvement`'s result (CLI text and ``--json``, the MCP tool):
    ``test`` (its last test's ``recommendation`` and ``reason``; None: never tested),
    ``test_note`` (that, in one line), ``same_change_undone`` (:func:`undone_before`) and
    ``warnings``: one line each for an apply made without a ``safe_to_apply`` test, and for a
    fix with the same changes rolled back or rejected lately."""
    tested = imp.test_result if isinstance(imp.test_result, dict) else {}
    test = ({"recommendation": tested.get("recommendation"), "reason": tested.get("reason")}
            if tested.get("recommendation") else None)
    if test is None:
        test_note = f"Not tested: {step('test', imp.id)} predicts its effect from history"
    else:
        test_note = f"Its test said: {test['recommendation']}" + (f" — {test['reason']}" if test["reason"] else "")
    undone = undone_before(imp)
    warnings = [test_note] if test is None or test["recommendation"] != "safe_to_apply" else []
    if undone:
        warnings.append(f"Note: {undone['note']}")
    return {"test": test, "test_note": test_note, "same_change_undone": undone, "warnings": warnings}


def _reread_applicable(store: ImprovementStore, improvement_id: str) -> Improvement:
    """The row again, under the apply lock: an improvement that another command took past
    proposed/tested since we first read it is the loser's one line, "changed meanwhile"."""
    imp = store.get(improvement_id)
    if imp.status not in APPLICABLE:
        raise ChangedMeanwhileError(f"{imp.id} changed meanwhile (now {imp.status}); nothing was changed")
    _check_applicable(imp)
    return imp


def _check_rollbackable(imp: Improvement) -> None:
    if imp.status not in ROLLBACKABLE:
        raise LifecycleError(f"{imp.id} is {imp.status}; only applied or verified improvements can be rolled back")


def _check_applicable(imp: Improvement, pending: bool = True) -> None:
    if pending and imp.pending_op:
        op = imp.pending_op.get("op") if isinstance(imp.pending_op, dict) else None
        raise LifecycleError(f"{imp.id} has an interrupted {str(op)[:40]} that could not be recovered; "
                             "see the warning above")
    if imp.status not in APPLICABLE:
        hint = f" (roll it back first: {step('rollback', imp.id)})" if imp.status in ROLLBACKABLE else ""
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
    _check_applicable(imp, pending=False)  # an intent now may be an apply running elsewhere: see under the lock
    changes, manual = _config_changes(imp)
    now = now or utcnow()
    if not changes:
        if not (changes_made and changes_made.strip()):
            raise UsageError(f"{imp.id} has only manual steps; say what was done with {option('changes_made', 'TEXT')} "
                             f"(steps: {'; '.join(manual) or 'none listed'})")
        lock = _locked(settings)
        try:
            imp = _reread_applicable(store, improvement_id)
            imp = _record_applied(store, imp, settings, now, commit_sha=None, changes_made=changes_made.strip(),
                                  record=None)
        finally:
            lock.release()
        _notify_applied(imp, settings)
        return _applied_result(imp, manual, diff="", creates=False)
    lock = _locked(settings)
    try:
        imp = _reread_applicable(store, improvement_id)  # another process may have applied it meanwhile
        cr = gitops.locate(settings.config_path, settings.home)
        old = read_text(cr.real_path)
        edit = configedit.edit_config(old, changes, where=str(cr.real_path))
        check_config_write(old, edit.new_text, cr.real_path)
        gitops.check_clean(cr)
        if expected_sha256 is not None and (sha256_text(old) or ABSENT) != expected_sha256:
            raise LifecycleError(f"{cr.real_path} changed since the diff was shown; nothing was changed, run "
                                 "apply again")
        if not edit.changed:
            raise LifecycleError(f"{display_path(settings.config_path)} already holds these values; nothing to apply")
        # what a refusal would strand is checked before a repository or commit is made
        check_writable(conn)
        gitops.check_can_commit(cr)
        creates = cr.repo is None
        gitops.ensure_repo(cr, now)
        lines = configedit.describe_entries(edit.entries)
        record = {"config_path": str(settings.config_path), "real_path": str(cr.real_path), "repo": str(cr.root),
                  "entries": edit.entries, "created_tables": edit.created_tables, "file_existed": old is not None}
        intent = {"op": "apply", "step": "intent", "started_at": format_timestamp(now),
                  "head_before": gitops.head_sha(cr), "old_sha256": sha256_text(old),
                  "new_sha256": sha256_text(edit.new_text), "old_text": old, "record": record}
        update_status(store, imp.id, imp.status, pending_op=intent)
        crash_point("after-intent")
        try:
            atomic_write(cr.real_path, edit.new_text)
            crash_point("after-write")
            sha = gitops.commit_config(cr, _apply_message(imp, lines, manual), now)
        except (SelfHealError, OSError) as exc:
            imp = abort_operation(store, settings, imp.id, exc, "apply")  # raises unless the commit exists
        else:
            crash_point("after-commit")
            committed = {**intent, "step": "committed", "commit_sha": sha}
            after_commit(store, imp.id, sha, "applied",
                         lambda: update_status(store, imp.id, imp.status, pending_op=committed),
                         lambda row: row.pending_op == committed or row.commit_sha == sha)
            crash_point("before-db-update")
            text = _changes_made_text(settings, lines, changes_made)
            imp = after_commit(store, imp.id, sha, "applied",
                               lambda: _record_applied(store, imp, settings, now, commit_sha=sha, changes_made=text,
                                                       record=record),
                               lambda row: row.status == "applied" and row.commit_sha == sha)
    finally:
        lock.release()
    _notify_applied(imp, settings)
    return _applied_result(imp, manual, diff=configedit.unified_diff(old, edit.new_text), creates=creates)


def _apply_message(imp: Improvement, lines: list[str], manual: list[str]) -> str:
    subject = f"selfheal: {imp.description}".splitlines()[0]  # commit_message fits it in 72 characters
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
    return update_status(store, imp.id, imp.status, status="applied", applied_at=format_timestamp(when),
                        verification_scheduled=format_timestamp(scheduled), commit_sha=commit_sha,
                        changes_made=changes_made, apply_record=record, pending_op=None)


def _applied_result(imp: Improvement, manual: list[str], diff: str, creates: bool) -> dict[str, Any]:
    rec = imp.apply_record or {}
    return {"improvement_id": imp.id, "status": imp.status, "applied_at": imp.applied_at,
            "verification_scheduled": imp.verification_scheduled, "commit_sha": imp.commit_sha,
            "changes_made": imp.changes_made, "config_path": rec.get("real_path"), "repository": rec.get("repo"),
            "created_repository": creates, "manual_steps": manual, "diff": diff, **apply_notes(imp)}


def _notify_applied(imp: Improvement, settings: Settings) -> None:
    fire("improvement_applied", improvement=imp, settings=settings)


# ------------------------------------------------------------------ rollback


def _automatic_mark(imp: Improvement, automatic: bool) -> dict[str, Any]:
    """The row's fields that mark a rollback the daemon made on its own (``metrics``'
    ``rolled_back_automatically``, beside the verification that asked for it)."""
    if not automatic:
        return {}
    return {"metrics": {**(imp.metrics if isinstance(imp.metrics, dict) else {}), "rolled_back_automatically": True}}


def rollback_improvement(conn: sqlite3.Connection, settings: Settings, improvement_id: str, *,
                         reason: str | None = None, now: datetime | None = None,
                         automatic: bool = False) -> dict[str, Any]:
    """Undo an applied improvement.

    When no later commit touched the config, ``git revert`` of the apply commit (with
    ``--no-commit`` and our own commit, for the identity and trailers); otherwise the
    inverse tomlkit edit: previous values back, keys the apply added removed. A key the
    user changed since is a :class:`ConflictError` and nothing changes. A manual-only
    improvement is marked rolled back (its steps must be undone by hand). ``automatic``:
    the daemon rolls back on its own (the row and the notification say so).
    """
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    _check_rollbackable(imp)
    now = now or utcnow()
    if not imp.commit_sha:
        lock = _locked(settings)
        try:
            imp = store.get(improvement_id)
            if imp.status not in ROLLBACKABLE or imp.commit_sha:
                raise ChangedMeanwhileError(f"{imp.id} changed meanwhile (now {imp.status}); nothing was changed")
            imp = update_status(store, imp.id, imp.status, status="rolled_back",
                                rolled_back_at=format_timestamp(now), pending_op=None,
                                **_automatic_mark(imp, automatic))
        finally:
            lock.release()
        fire("improvement_rolled_back", improvement=imp, settings=settings)
        return _rolled_back_result(imp, method="manual", diff="",
                                   note="no config change was committed; undo the manual steps by hand")
    lock = _locked(settings)
    try:
        imp = store.get(improvement_id)
        if imp.status not in ROLLBACKABLE:
            raise ChangedMeanwhileError(f"{imp.id} changed meanwhile (now {imp.status}); nothing was changed")
        cr, record, what, method, current, new = _rollback_edit(settings, imp)
        head_before = gitops.head_sha(cr)
        intent = {"op": "rollback", "method": method, "step": "intent", "started_at": format_timestamp(now),
                  "head_before": head_before, "old_sha256": sha256_text(current), "new_sha256": sha256_text(new),
                  "old_text": current, "record": record, "automatic": automatic}
        update_status(store, imp.id, imp.status, pending_op=intent)
        crash_point("rollback-after-intent")
        lines = [f"{configedit.dotted_key(e['path'])}: {configedit.format_value(e['new'])} → "
                 f"{configedit.format_value(e['old']) if e['existed'] else '(removed)'}"
                 for e in check_entries(cr, imp.commit_sha, record.get("entries", []), what)]
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
                f"selfheal: roll back {imp.id}", body, imp.id, imp.pattern_id, "rollback"), now)
        except (SelfHealError, OSError) as exc:
            imp = abort_operation(store, settings, imp.id, exc, "rollback")  # raises unless the commit exists
        else:
            crash_point("rollback-after-commit")
            imp = after_commit(store, imp.id, sha, "rolled back",
                               lambda: update_status(store, imp.id, imp.status, status="rolled_back", rollback_sha=sha,
                                                     rolled_back_at=format_timestamp(now), pending_op=None,
                                                     **_automatic_mark(imp, automatic)),
                               lambda row: row.status == "rolled_back" and row.rollback_sha == sha)
    finally:
        lock.release()
    fire("improvement_rolled_back", improvement=imp, settings=settings)
    return _rolled_back_result(imp, method=method, diff=configedit.unified_diff(current, new))


def _rollback_edit(settings: Settings, imp: Improvement) -> tuple[gitops.ConfigRepo, dict[str, Any], str, str, str, str]:
    """(repository, apply record, its name in messages, method, config text now, config text
    after) of rolling back ``imp``, or the refusal: checked alike before a question is asked
    (:func:`plan_rollback`) and under the lock before anything is written."""
    record = imp.apply_record if isinstance(imp.apply_record, dict) else {}
    what = f"the apply record of {imp.id}"
    cr = home_config_repo(settings, record, what)
    untrusted = gitops.untrusted_commit(cr, imp.commit_sha, imp.id, "apply")
    if untrusted:
        raise UntrustedRecordError(f"cannot roll back {imp.id}: {untrusted}; only selfheal's own apply commit "
                                   "is reverted, nothing was changed")
    current = read_text(cr.real_path)
    current_data = configedit.parse_config_text(current, str(cr.real_path))
    gitops.check_clean(cr)
    gitops.check_can_commit(cr)
    if gitops.changed_since(cr, imp.commit_sha):
        entries = check_entries(cr, imp.commit_sha, record.get("entries", []), what)
        conflicts = configedit.conflicts_with(current_data, entries)
        if conflicts:
            raise ConflictError(f"{cr.real_path} was edited after {imp.id} was applied: {'; '.join(conflicts)}. "
                                "Not overwriting your edit; nothing was changed (undo it by hand if needed)")
        new = configedit.edit_config(current, configedit.inverse_changes(entries), where=str(cr.real_path)).new_text
        return cr, record, what, "inverse-edit", current, configedit.remove_empty_tables(new, _created_tables(record))
    return cr, record, what, "revert", current, gitops.file_at(cr, f"{imp.commit_sha}^")


def plan_rollback(conn: sqlite3.Connection, settings: Settings, improvement_id: str) -> dict[str, Any]:
    """What ``rollback`` would do, changing nothing: the method and the diff; raises the same
    refusals it would (wrong status, a record naming another home, a dirty tree, a conflicting
    edit), so a person is not asked first."""
    imp = ImprovementStore(conn).get(improvement_id)
    _check_rollbackable(imp)
    plan = {"improvement_id": imp.id, "status": imp.status, "description": imp.description,
            "commit_sha": imp.commit_sha, "method": "manual", "diff": ""}
    if imp.commit_sha:
        _, _, _, plan["method"], current, new = _rollback_edit(settings, imp)
        plan["diff"] = configedit.unified_diff(current, new)
    return plan


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
    lock = _locked(settings)  # not in the middle of an apply: it either finished (we lose) or never started
    try:
        imp = _reread_applicable(store, improvement_id)  # an interrupted apply is finished or undone first
        imp = update_status(store, imp.id, imp.status, status="rejected")
    finally:
        lock.release()
    return {"improvement_id": imp.id, "status": imp.status}


def recover_apply_op(store: ImprovementStore, imp: Improvement, settings: Settings) -> dict[str, Any]:
    """Finish (the commit exists) or undo (it does not) an interrupted apply or rollback."""
    op = imp.pending_op if isinstance(imp.pending_op, dict) else {}
    kind = op.get("op")
    if kind not in ("apply", "rollback"):
        raise UntrustedRecordError(f"the interrupted operation of {imp.id} is {str(kind)[:40]!r}, not one selfheal "
                                   "makes; refused, nothing was changed")
    record = op.get("record") if isinstance(op.get("record"), dict) else {}
    action = kind
    cr, sha = trusted_op_commit(store, imp, settings, op, record, action)
    started = _started(op)
    if sha:
        if kind == "apply":
            entries = check_entries(cr, sha, record.get("entries", []), f"the interrupted apply of {imp.id}")
            lines = configedit.describe_entries(entries)
            _record_applied(store, imp, settings, started, commit_sha=sha,
                            changes_made=_changes_made_text(settings, lines, None), record=record)
        else:
            update_status(store, imp.id, imp.status, status="rolled_back", rollback_sha=sha,
                          rolled_back_at=format_timestamp(started), pending_op=None,
                          **_automatic_mark(imp, op.get("automatic") is True))
        return {"improvement_id": imp.id, "op": kind, "action": "finished", "detail": f"commit {sha[:12]} exists"}
    detail = undo_config_write(cr, op)
    update_status(store, imp.id, imp.status, pending_op=None)
    return {"improvement_id": imp.id, "op": kind, "action": "undone", "detail": detail}


def _started(op: dict[str, Any]) -> datetime:
    try:
        return parse_timestamp(op["started_at"]) if isinstance(op.get("started_at"), str) else utcnow()
    except (SelfHealError, ValueError, TypeError, OverflowError):
        return utcnow()


def trusted_op_commit(store: ImprovementStore, imp: Improvement, settings: Settings, op: dict[str, Any],
                      record: dict[str, Any], action: str) -> tuple[gitops.ConfigRepo, str | None]:
    """An interrupted operation's config repository and commit, checked against the
    home's own before anything is written: the config file and repository it names must
    be this home's, ``head_before`` a commit in the history of HEAD, and its commit (the
    recorded one or the one found by our trailers) selfheal's own for this improvement
    and action. Returns (repository, commit sha or None when no commit was made)."""
    what = f"the interrupted {op.get('op')} of {imp.id}"
    cr = home_config_repo(settings, record, what)
    head_before = op.get("head_before")
    if head_before is not None and not gitops.reachable(cr, head_before):
        raise UntrustedRecordError(f"{what} started at {str(head_before)[:40]!r}, which is not a commit in the "
                                   f"history of HEAD in {cr.root}; refused, nothing was changed")
    sha = op.get("commit_sha") or gitops.find_commit(cr, imp.id, action, head_before)
    if sha:
        untrusted = gitops.untrusted_commit(cr, sha, imp.id, action)
        if untrusted:
            raise UntrustedRecordError(f"{what}: {untrusted}; refused, nothing was changed")
    return cr, sha


def undo_config_write(cr: gitops.ConfigRepo, op: dict[str, Any]) -> str:
    """Put config file and index entry back as they were before an operation whose commit
    was never made (``op``: its intent with ``old_text`` and both hashes). Returns what was
    done. Shared by recovery, by a step that failed (:func:`abort_operation`) and by the
    canary/shadow section edits."""
    _remove_temp_files(cr.real_path)
    current = read_text(cr.real_path)
    h = sha256_text(current)
    if h == op.get("new_sha256") and h != op.get("old_sha256"):
        old = _trusted_old_text(cr, op)
        gitops.check_file_writable(cr.real_path)  # a file made read-only since is not replaced either
        if old is None:  # it did not exist: set aside, never deleted (git has no copy of it)
            aside = _set_aside(cr.real_path)
            _reset_index(cr)
            return f"config set aside as {aside.name} (there was none before)"
        atomic_write(cr.real_path, old)
        _reset_index(cr)
        return "config restored to its previous content"
    if h == op.get("old_sha256"):
        _reset_index(cr)
        return "the config had not been changed yet"
    gitops.end_revert_state(cr)
    return "the config was edited since; left as it is"


def _trusted_old_text(cr: gitops.ConfigRepo, op: dict[str, Any]) -> str | None:
    """The text an undo writes back, accepted only when it is what git holds for the
    config at the commit the operation started from (every operation starts from a clean,
    committed config), so an undo never writes text that only the database knows."""
    old = op.get("old_text")
    head_before = op.get("head_before")
    if (old is not None and not isinstance(old, str)) or sha256_text(old) != op.get("old_sha256"):
        raise UntrustedRecordError(f"the recorded previous text of {cr.real_path} does not match its recorded hash; "
                                   "refused, nothing was changed")
    head = gitops.head_sha(cr)
    if head_before != head:  # an unfinished operation never moved HEAD: restore only what HEAD has
        raise UntrustedRecordError(f"the interrupted operation started at {str(head_before)[:12]!r} but HEAD of "
                                   f"{cr.root} is {str(head)[:12]!r}; refused to guess, nothing was changed")
    committed = gitops.file_at(cr, head_before) if head_before else None
    if committed is None:
        ok = old is None or not old.strip()
    else:  # git may convert line endings on checkout
        ok = old is not None and old.replace("\r\n", "\n") == committed.replace("\r\n", "\n")
    if not ok:
        raise UntrustedRecordError(f"the recorded previous text of {cr.real_path} is not what git has at "
                                   f"{str(head_before)[:12] or 'HEAD'}; refused, nothing was changed")
    return old


def _set_aside(path: Path) -> Path:
    n = 0
    while True:
        aside = path.with_name(f".{path.name}.selfheal-undone" + (f"-{n}" if n else ""))
        if not os.path.lexists(aside):
            os.rename(path, aside)
            return aside
        n += 1


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
