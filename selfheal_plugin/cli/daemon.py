"""``agent self-heal-daemon``: a thin shell over :mod:`selfheal_plugin.daemon.loop`."""
from __future__ import annotations

import json
import logging
import os

import click

from selfheal_plugin.cli.common import common_options, echo_json, print_line, settings_for, table_console
from selfheal_plugin.cli.options import setting_option
from selfheal_plugin.daemon.loop import Daemon, TickReport, parse_interval
from selfheal_plugin.daemon.watcher import MODES, resolve_mode
from selfheal_plugin.history.text import for_rich


@click.command("self-heal-daemon")
@setting_option("interval", "--interval")
@click.option("--auto-detect", is_flag=True, help="Also propose a fix for every pattern periodic detection finds.")
@click.option("--no-auto-apply", is_flag=True,
              help="Never apply anything, even with [self_heal] auto_apply_enabled = true.")
@click.option("--once", is_flag=True, help="Hook what is new, run one round, and exit (for cron).")
@click.option("--watch", "watch_mode", type=click.Choice(MODES), default=None,
              help="native file events or poll (default: $SELFHEAL_WATCH, else native; polls where "
                   "native events are unavailable).")
@common_options
def self_heal_daemon(home: str | None, db: str | None, as_json: bool, interval: str = "1h",
                     auto_detect: bool = False, no_auto_apply: bool = False, once: bool = False,
                     watch_mode: str | None = None) -> None:
    """Watch the run history and heal continuously.

    Fires the run-failed hooks as runs fail (the built-in auto-analysis proposes and
    notifies), detects patterns every --interval, verifies applied improvements when
    their measurement window ends and rolls back automatically the ones that made things
    significantly worse. Auto-applies low-risk, simulated-safe proposals only when
    [self_heal] auto_apply_enabled = true. One daemon per home; SIGTERM/SIGINT stop it.
    """
    seconds = parse_interval(interval)
    mode = resolve_mode(watch_mode)
    s = settings_for(home, db)
    if not (os.environ.get("SELFHEAL_LOG") or os.environ.get("RUST_LOG")):
        logging.getLogger("selfheal").setLevel(logging.INFO)  # a daemon says what it does

    def report(r: TickReport) -> None:
        if as_json:
            click.echo(json.dumps(r.to_dict(), default=str))
        else:
            click.echo(f"[{r.at}] {r.summary()}")
            for e in r.plugin_errors:
                click.echo(f"  ✗ {e}")

    daemon = Daemon(s, interval=seconds, auto_detect=auto_detect, auto_apply=not no_auto_apply,
                    watch_mode=mode, on_report=None if once else report, reload_config=True)
    try:
        daemon.open()  # a missing or foreign database is one line, before anything is created
        daemon.acquire()
        if once:
            checked, tick = daemon.run_once()
            if as_json:
                echo_json({"hooked_runs": checked.failed_runs, "new_events": checked.new_event_count,
                           "initialized": checked.initialized, "tick": tick.to_dict()})
                return
            out = table_console()  # a long line wraps under its indent at the terminal's width
            if checked.initialized:
                print_line(out, "First start on this history: watch marks set (earlier failures are left to "
                           "detection).")
            print_line(out, f"Hooked {len(checked.failed_runs)} failed run(s); {checked.new_event_count} new "
                       "event(s).")
            print_line(out, f"Round at {for_rich(tick.at)}: {for_rich(tick.summary())}")
            for v in tick.verified:
                print_line(out, f"  verified {for_rich(v['improvement_id'])}: {for_rich(v['recommendation'])} "
                           f"({for_rich(v['actual_impact'])})")
            for r in tick.rolled_back:
                print_line(out, f"  rolled back {for_rich(r['improvement_id'])} (revert commit "
                           f"{(r['rollback_sha'] or '')[:7]})")
            for a in tick.applied:
                print_line(out, f"  applied {for_rich(a['improvement_id'])} (commit {(a['commit_sha'] or '')[:7]})")
            for e in tick.errors:
                print_line(out, f"  error: {for_rich(e)}")
            for e in tick.plugin_errors:
                print_line(out, f"  ✗ {for_rich(e)}")
            return
        daemon.run()
    finally:
        daemon.close()
        daemon.release()


COMMANDS = [self_heal_daemon]
