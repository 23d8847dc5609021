"""Every hook selfheal calls, in one place: this module is the plugin reference.

A plugin is a module (or object) with functions decorated ``@selfheal_plugin.hookimpl``
whose names are the hooks below; it may take any subset of a hook's arguments. Hooks
are called for every plugin unless marked *firstresult*, which stops at the first
non-None result. A plugin that raises is reported (``agent self-heal plugins``) and
skipped; the others still run (see :mod:`selfheal_plugin.plugins.manager`). Each
implementation of a third-party plugin runs in a worker thread with a deadline
(``[self_heal] plugin_timeout_seconds``); anything it raises, ``SystemExit`` included, is
reported and never ends the command. Each call may run on a different thread: keep no
thread-bound object (an ``sqlite3`` connection opened with ``check_same_thread``) from one
call to the next. None of these hooks is *firstresult*.

The parameter types below are the real ones; those of higher layers are imported for
type checkers only.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    from selfheal_plugin.plugins.pattern import Pattern
    from selfheal_plugin.history.improvements import Improvement
    from selfheal_plugin.history.settings import Settings
    from selfheal_plugin.plugins.notification import Notification
    from selfheal_plugin.plugins.strategy import Strategy

hookspec = HookspecMarker("selfheal")
hookimpl = HookimplMarker("selfheal")


@hookspec
def register_strategies(register: Callable[[Strategy], None]) -> None:
    """Register fix strategies.

    Fires when a strategy is first looked up, and again after plugins were added or
    removed. Call
    ``register(strategy)`` for each :class:`selfheal_plugin.plugins.strategy.Strategy` instance.
    Strategies registered by plugins loaded later win for the error types they share
    with earlier ones (load order: built-ins, entry points, the user plugin folder), so a
    third-party strategy replaces a built-in by naming the same type.

    :param register: callback taking one strategy instance.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def run_failed(run: dict[str, Any], settings: Settings) -> None:
    """A run in the history ended with status ``failed``.

    Fires once per failed run (across restarts, and with several watchers) when the
    watcher sees it, after ``history_changed`` for the same rows — or in the runtime's own
    process when it calls :func:`selfheal_plugin.daemon.watcher.notify_run_finished`; a run is
    claimed in ``selfheal_hooked_runs`` first, so whoever claims it fires it. The built-in
    auto-analysis hook narrows detection to this run's errors.

    :param run: the ``runs`` row as a dict (``id``, ``workflow_name``, ``status``,
        ``started_at``, ``completed_at``, ``error``, ...).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def history_changed(new_runs: list[str], new_event_count: int, settings: Settings) -> None:
    """New rows appeared in the run history.

    Fires when the watcher reads rows past its persisted watermark, before any
    ``run_failed`` for those rows.

    :param new_runs: ids of runs that gained events or changed status.
    :param new_event_count: number of new ``run_events`` rows.
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def patterns_detected(patterns: list[Pattern], found: int, settings: Settings) -> Any:
    """Detection found recurring failure patterns not told about within the cooldown.

    Fires after ``agent self-heal detect`` (and the daemon's periodic detection) when at
    least one pattern passed the thresholds and its notification cooldown
    (``cooldown_minutes``, shared with auto-analysis) let it through. The built-in
    notification hook turns it into an inbox entry when ``notify_patterns`` is on.

    :param patterns: the :class:`selfheal_plugin.plugins.pattern.Pattern` objects found whose
        cooldown let them through (each is told at most once per cooldown).
    :param found: how many patterns the detection found, those the cooldown held back included
        (``len(patterns)`` when none was).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: optionally where it delivered the news (the built-in hook returns the ``notify``
        results: ``[]`` when no sink took the summary). Not firstresult: every implementation
        is called. When ``notify_patterns`` is on and no implementation returned a non-empty
        value, the patterns were told nowhere (an inbox that cannot be written): their
        cooldown is not used up, and the next detection tells them.
    """


@hookspec
def improvement_proposed(improvement: Improvement, settings: Settings) -> None:
    """A new proposal was stored in ``improvements`` (status ``proposed``).

    Fires once per new row; proposing again for a pattern that already has an open
    proposal returns that proposal and does not fire.

    :param improvement: the stored :class:`selfheal_plugin.history.improvements.Improvement`.
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def improvement_tested(improvement: Improvement, result: dict[str, Any], settings: Settings) -> None:
    """An improvement was tested (simulation, canary or shadow).

    Fires after the test result is stored on the row.

    :param improvement: the :class:`selfheal_plugin.history.improvements.Improvement` as stored.
    :param result: the test result (``test_mode``, ``simulated_success_rate``,
        ``baseline_success_rate``, ``recommendation``, ...).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def improvement_applied(improvement: Improvement, settings: Settings) -> None:
    """An improvement's changes were written and committed (status ``applied``).

    Fires after the commit and the database row agree (``commit_sha``, ``applied_at``,
    ``verification_scheduled`` set). The built-in notification hook writes an inbox
    entry when ``notify_applied`` is on.

    :param improvement: the applied :class:`selfheal_plugin.history.improvements.Improvement`.
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def improvement_verified(improvement: Improvement, verification: dict[str, Any], settings: Settings) -> None:
    """An applied improvement was measured against the history before it.

    Fires after every verification, whatever its recommendation (keep, rollback,
    extend monitoring). The built-in notification hook writes an inbox entry when
    ``notify_verified`` is on (urgent when the recommendation is rollback) and the
    recommendation differs from the last verification's (``previous_recommendation``),
    except when the daemon rolls the change back at once (``rollback_follows``): the
    rollback's entry then tells it.

    :param improvement: the :class:`selfheal_plugin.history.improvements.Improvement` as stored.
    :param verification: the result (``expected_impact``, ``actual_impact``,
        ``verification_status``, ``recommendation``, ``metrics``; ``rollback_follows`` from
        the daemon's scheduled verification).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def improvement_rolled_back(improvement: Improvement, settings: Settings) -> None:
    """An applied improvement was reverted (status ``rolled_back``).

    Fires after the revert commit and the database row agree, whether a user or the
    daemon's automatic rollback asked for it (then ``improvement.metrics`` holds
    ``rolled_back_automatically``, beside the verification that asked for it). The
    built-in notification hook writes an inbox entry when ``notify_rolled_back`` is on
    (urgent for an automatic rollback).

    :param improvement: the :class:`selfheal_plugin.history.improvements.Improvement` as stored.
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def ab_verdict(experiment: dict[str, Any], settings: Settings) -> None:
    """A running A/B experiment reached a verdict (a winner, or every arm worse).

    Fires once per verdict (and winner) when the daemon judges the experiment on its
    schedule. The built-in notification hook writes one inbox entry.

    :param experiment: the experiment as ``agent self-heal ab status ID --json`` shows it
        (``experiment_id``, ``pattern_id``, ``arms``, ``verdict``, ...).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def ab_finished(experiment: dict[str, Any], settings: Settings) -> None:
    """An A/B experiment ended: promoted (its winner applied) or dropped.

    Fires after the commit removing its ``[ab."ID"]`` section and the database agree (and,
    for a promotion, after the winner's apply). The built-in notification hook writes one
    inbox entry.

    :param experiment: the experiment as ``agent self-heal ab status ID --json`` shows it,
        with ``status`` (``promoted``/``dropped``), ``winner``, ``forced``, ``end_commit_sha``
        and ``applied`` (the winner's apply result, or None).
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: nothing; not firstresult, every implementation is called and return values are ignored.
    """


@hookspec
def notify(notification: Notification, settings: Settings) -> str | None:
    """Deliver a notification to the user.

    Fires for every :class:`selfheal_plugin.plugins.manager.Notification` the lifecycle hooks
    produce; every implementation gets it (the inbox is one, a plugin may add Slack,
    desktop notifications, ...). Delivery failures are reported, not raised.

    :param notification: title, source, tags, priority (``urgent``/``high``/``normal``/
        ``low``) and Markdown body.
    :param settings: the :class:`selfheal_plugin.history.settings.Settings` in force.
    :returns: optionally where it was delivered (the inbox returns the day file's path);
        not firstresult, every implementation is called and ``plugins.fire`` returns the
        non-None results.
    """
