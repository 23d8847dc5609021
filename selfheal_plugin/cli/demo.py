"""``agent self-heal demo``: prints each step of :func:`selfheal_plugin.testbed.demo.run_demo`."""
from __future__ import annotations

import sys
from typing import Any, Callable

import click

from selfheal_plugin.cli.ab import print_experiment
from selfheal_plugin.cli.common import echo_json, err_console, pct, print_line, table_console
from selfheal_plugin.cli.learn import print_rules
from selfheal_plugin.history.text import for_rich
from selfheal_plugin.cli.options import OneLineUsageError, setting_option
from selfheal_plugin.testbed.demo import DEMO_RUNS, DemoStep, run_demo
from selfheal_plugin.errors import SelfHealError, UsageError


def _p(x: float | None) -> str:
    """A p-value as stored (rounded to 6 places): 0 means below 0.000001."""
    return "n/a" if x is None else "<1e-06" if x == 0 else format(x, ".3g")


def _workload(out: Any, d: dict[str, Any]) -> None:
    print_line(out, f"  {d['runs']} runs from {for_rich(d['started_at'][:16])} to {for_rich(d['ended_at'][:16])} "
               f"(simulated) in {d['real_seconds']:.1f} s real; {sum(d['calls'].values())} real MCP tool calls, "
               f"{d['crashes']} server crash(es)")
    print_line(out, f"  Success rate: {pct(d['success_rate'])} ({d['completed']} completed, {d['failed']} failed)")
    for pid, n in d["errors"].items():
        print_line(out, f"    {for_rich(pid)}: {n} failed call(s), {pct(d['error_rates'].get(pid))} of that "
                   "tool's calls")


def print_step(s: DemoStep) -> None:
    """One step's findings; a long line wraps under its indent at the terminal's width (print_line)."""
    d = s.data
    out = table_console()
    out.print()
    print_line(out, f"[bold]▶ {for_rich(s.title)}[/]  ({s.seconds:.1f} s)")
    if s.name == "home":
        t = d["timeline"]
        print_line(out, f"  BINKS_HOME={for_rich(d['home'])}")
        print_line(out, f"  Before: {t['before'][0][:16]} → {t['before'][1][:16]}; apply at {t['apply'][:16]}; "
                   f"after: → {t['after'][1][:16]} (UTC, simulated clock)")
    elif s.name.startswith("workload"):
        _workload(out, d)
    elif s.name == "detect":
        print_line(out, f"  {len(d['patterns'])} pattern(s) since {for_rich(d['since'][:16])}:")
        for p in d["patterns"]:
            print_line(out, f"    {for_rich(p['id'])}: {p['occurrences']} occurrences in {len(p['affected_runs'])} "
                       f"runs, failure rate {pct(p['failure_rate'])}, confidence {pct(p['confidence'])}"
                       + (f" — {for_rich(p['suggested_fix'])}" if p.get("suggested_fix") else ""))
    elif s.name == "propose":
        for p in d["proposals"]:
            if "error" in p:
                print_line(out, f"    ⚠️  {for_rich(p['error'])}", hang=4)
                continue
            print_line(out, f"    {for_rich(p['improvement_id'])} ({for_rich(p['strategy'])}, risk "
                       f"{for_rich(p['risk_level'])}): {for_rich(p['description'])}")
            print_line(out, f"      expected: {for_rich(p['expected_impact'])}")
    elif s.name == "test":
        for r in d["tests"]:
            sim = r["simulated_success_rate"]
            line = f"    {for_rich(r['improvement_id'])}: baseline {pct(r['baseline_success_rate'])}"
            if sim is not None:
                lo, hi = r["interval"]["simulated_success_rate"]
                line += f" → simulated {pct(sim)} (95% interval {pct(lo)}–{pct(hi)})"
            print_line(out, line + f": {for_rich(r['recommendation'])}")
            print_line(out, f"      {for_rich(r['reason'])}")
        print_line(out, f"  Chosen: {for_rich(d['chosen'])}")
    elif s.name == "apply":
        print_line(out, f"  Applied {for_rich(d['improvement_id'])} at {for_rich(d['applied_at'])}: commit "
                   f"{d['commit_sha'][:12]} in {for_rich(d['repository'])}")
        click.echo("  " + d["diff"].rstrip("\n").replace("\n", "\n  "))
        print_line(out, "  git log: " + " | ".join(for_rich(line) for line in d["git_log"]))
    elif s.name == "verify":
        m = d["metrics"]
        p = m.get("pattern") or {}
        print_line(out, f"  Success rate: {pct(m['before_success_rate'])} ({m['runs_before']} runs) → "
                   f"{pct(m['after_success_rate'])} ({m['runs_after']} runs), Fisher p={_p(m['p_value'])}")
        if p:
            print_line(out, f"  {for_rich(p['pattern_id'])} error rate: {pct(p['before_error_rate'])} → "
                       f"{pct(p['after_error_rate'])} per call ({p['before_errors']} → {p['after_errors']}; "
                       f"p={_p(p['p_value'])})")
        print_line(out, f"  Actual impact: {for_rich(d['actual_impact'])}")
        print_line(out, f"  Recommendation: {for_rich(d['recommendation'])} ({for_rich(d['verification_status'])}) — "
                   f"{for_rich(d['reason'])}")
    elif s.name == "rules":
        print_rules(d["rules"])
    elif s.name == "detect_week3":
        p = d["proposal"]
        print_line(out, f"  {for_rich(d['pattern_id'])}: {for_rich(p['improvement_id'])} ({for_rich(p['strategy'])}): "
                   f"{for_rich(p['description'])}")
        print_line(out, f"    expected: {for_rich(p['expected_impact'])}")
    elif s.name == "ab_start":
        print_line(out, f"  {for_rich(d['experiment_id'])}: {len(d['arms'])} arms beside a control, commit "
                   f"{d['start_sha'][:12]}")
        for arm in d["arms"]:
            print_line(out, f"    {for_rich(arm['improvement_id'])} ({for_rich(arm.get('strategy'))}): "
                       f"{for_rich(arm.get('description') or '')}")
    elif s.name == "ab_status":
        print_experiment(d)
    elif s.name in ("ab_promote", "ab_drop"):
        applied = d.get("applied") or {}
        print_line(out, f"  {for_rich(d['experiment_id'])} {for_rich(d['status'])}: end commit "
                   f"{(d.get('end_commit_sha') or '')[:12]}"
                   + (f"; {for_rich(applied['improvement_id'])} applied, commit {applied['commit_sha'][:12]}"
                      if applied else ""))
    elif s.name == "dashboard":
        from selfheal_plugin.cli.health import _print_dashboard

        _print_dashboard(d, detailed=False)


class _LiveStatus:
    """A spinner with the running step's title on stderr while it runs (a step can take
    ten seconds of real tool calls); transient, so the printed findings stay as they were.
    Shown only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._status: Any = None

    def start(self, name: str, title: str) -> None:
        if not self.enabled:
            return
        self.stop()
        self._status = err_console.status(f"{title}…")
        self._status.start()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def done(self, then: Callable[[DemoStep], None]) -> Callable[[DemoStep], None]:
        def finished(step: DemoStep) -> None:
            self.stop()
            then(step)
        return finished


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Use this new or empty directory as the demo home, and keep it (default: a temporary one).")
@click.option("--keep", is_flag=True, help="Keep the temporary demo home afterwards (its path is printed).")
@setting_option("runs", "--runs", default=DEMO_RUNS, show_default=True)
@click.option("--second-act", is_flag=True,
              help="Two more weeks: the verified fix kept as a rule, a new pattern it is the prior of, an A/B "
                   "experiment of that pattern's candidate fixes and the winner promoted (about 2 minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def demo(directory: str | None, keep: bool, runs: int, second_act: bool, as_json: bool) -> None:
    """Run the whole loop in a throwaway home: a week of real tool calls, detect, propose,
    test, apply (a git commit), another week, verify and the dashboard."""
    given = {k: v for k, v in (click.get_current_context().obj or {}).items() if v}  # before `demo`
    if given:
        flags = ", ".join(f"--{k}" for k in ("home", "db", "json") if k in given)
        raise OneLineUsageError(f"{flags} before demo does not reach it: the demo makes its own home "
                                "(demo --dir DIR to keep it), and takes --json after demo")
    if not as_json:
        print_line(table_console(), "🩹 selfheal demo: a simulated week of agent runs against real MCP tool servers, "
                   "then the fix", hang=3)
    status = _LiveStatus(enabled=not as_json)
    try:
        result = run_demo(directory, keep=keep, runs=runs, second_act=second_act, on_start=status.start,
                          on_step=None if as_json else status.done(print_step))
    except UsageError as exc:
        raise OneLineUsageError(str(exc)) from None
    except SelfHealError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        status.stop()
    if as_json:
        echo_json(result.to_dict())
        return
    out = table_console()
    out.print()
    print_line(out, f"⏱  Demo finished in {result.seconds:.1f} s", hang=3)
    if result.kept:
        print_line(out, f"📁 Demo home kept at {for_rich(result.home)} (try: agent self-heal --home "
                   f"{for_rich(result.home)} improvements)", hang=3)
    else:
        print_line(out, "🧹 Demo home removed (use --keep to look around)", hang=3)


COMMANDS = [demo]
