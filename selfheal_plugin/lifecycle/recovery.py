"""Crash recovery: finish or undo every apply, rollback or experiment edit that a killed
process left half done (its intent is the row's ``pending_op``). The service runs it once
when it opens the history, before any command reads config, git or the database."""
from __future__ import annotations

import logging
import sqlite3
from typing import Any, Callable

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.abstore import has_ab_table
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.history.settings import Settings

log = logging.getLogger("selfheal.recovery")


def recover(conn: sqlite3.Connection, settings: Settings,
            warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Finish or undo every interrupted apply/rollback (``pending_op`` set).

    Each operation handled is one line through ``warn`` (the CLI prints it on stderr),
    or a logged warning without one.

    With the commit present, the database is brought in line with it (finished); without
    it, the config file gets its old bytes back and its index entry is reset (undone).
    A file that changed in between (neither old nor new content) is left alone and the
    intent dropped, with a warning. Returns one entry per operation handled.

    Every command opens with this, so the common case (nothing interrupted) is two queries;
    the lifecycle modules that finish or undo an operation are imported only when one is.
    """
    rows = conn.execute("SELECT id FROM improvements WHERE pending_op IS NOT NULL AND pending_op != ''").fetchall()
    if not rows and not _ab_pending(conn):
        return []
    from filelock import Timeout

    from selfheal_plugin.lifecycle.ab import recover_ab
    from selfheal_plugin.lifecycle.apply import fire, lock_for

    say = warn or log.warning  # one line per operation, where the caller wants it (not also in the log)
    ab_actions = recover_ab(conn, settings)  # A/B experiments keep their intent in selfheal_ab
    for action in ab_actions:
        say(f"recovered interrupted {action['op']} of {action['experiment_id']}: {action['action']} "
            f"({action['detail']})")
    if not rows:
        return ab_actions
    lock = lock_for(settings)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return ab_actions  # an apply or rollback is running right now: its intent is not stale
    actions: list[dict[str, Any]] = []
    try:
        store = ImprovementStore(conn)
        for (imp_id,) in rows:
            imp = store.get(imp_id)
            if not imp.pending_op:
                continue
            op = imp.pending_op if isinstance(imp.pending_op, dict) else {}
            try:
                action = _recover_one(store, imp, settings)
            except (SelfHealError, OSError) as exc:
                action = {"improvement_id": imp.id, "op": str(op.get("op"))[:40], "action": "failed",
                          "detail": " ".join(str(exc).split())}
            actions.append(action)
            if action["action"] == "failed":
                msg = f"could not recover the interrupted {action['op']} of {imp.id}: {action['detail']}"
            else:
                msg = f"recovered interrupted {action['op']} of {imp.id}: {action['action']} ({action['detail']})"
            say(msg)
    finally:
        lock.release()
    for action in actions:
        if action["action"] == "finished" and action["op"] in ("apply", "rollback"):
            imp = store.get(action["improvement_id"])
            fire("improvement_applied" if action["op"] == "apply" else "improvement_rolled_back",
                 improvement=imp, settings=settings)
    return ab_actions + actions


def _ab_pending(conn: sqlite3.Connection) -> bool:
    """Whether an A/B start or end left an intent behind (what :func:`~.ab.recover_ab` handles)."""
    return has_ab_table(conn) and conn.execute(
        "SELECT 1 FROM selfheal_ab WHERE pending_op IS NOT NULL LIMIT 1").fetchone() is not None


def _recover_one(store: ImprovementStore, imp: Improvement, settings: Settings) -> dict[str, Any]:
    from selfheal_plugin.lifecycle.apply import recover_apply_op
    from selfheal_plugin.lifecycle.canary import recover_experiment_op

    kind = imp.pending_op.get("op") if isinstance(imp.pending_op, dict) else None
    if kind in ("experiment-start", "experiment-end"):  # a canary/shadow section edit
        return recover_experiment_op(store, imp, settings)
    return recover_apply_op(store, imp, settings)
