"""``agent self-heal dashboard`` and ``agent self-heal health``: thin shells over
:mod:`selfheal_plugin.analysis.health` (terminal rendering with rich, HTML via :mod:`health_report`)."""
from __future__ import annotations

from typing import Any

import click

from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.cli.common import (common_options, echo_json, err_console, open_service, pct, print_line,
                                        scan_progress, table_console, warn_bad_rows)
from selfheal_plugin.cli.options import setting_option
from selfheal_plugin.analysis.report import TREND_TEXT, check_report_target, write_html_report
from selfheal_plugin.history.text import for_rich
from selfheal_plugin.lazy import lazy_module

rich_box, rich_table = lazy_module("rich.box"), lazy_module("rich.table")  # imported when printing

SPARK = "▁▂▃▄▅▆▇█"
SPARK_DAYS = 60


def sparkline(values: list[float | None]) -> str:
    """Unicode blocks scaled between the series' min and max; a gap (·) where a value is missing."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    out = []
    for v in values:
        if v is None:
            out.append("·")
        elif hi == lo:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1))])
    return "".join(out)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


@click.command()
@click.option("--detailed", is_flag=True, help="Include per-agent and per-tool tables.")
@setting_option("lookback", "--since", help="Window start")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report (charts and numbers) to FILE.")
@click.option("--force", is_flag=True,
              help="Let --html replace an existing file that is not an earlier report (never the database "
                   "or config.toml).")
@common_options
def dashboard(home: str | None, db: str | None, as_json: bool, detailed: bool = False, since: str | None = None,
              html_path: str | None = None, force: bool = False) -> None:
    """Show the system health dashboard: score, trend, worst tools, improvements."""
    settings = load_settings(home, db, lookback=since)
    if html_path:  # a target that would destroy a file fails before the history is even opened
        check_report_target(html_path, settings, force=force)
    with open_service(home, db, settings=settings) as sh:
        with scan_progress(not as_json, "Scanning run history") as progress:
            data = sh.dashboard(detailed=detailed or bool(html_path), progress=progress,
                                improvements_limit=20 if html_path else 5)
    if html_path:
        path = write_html_report(data, html_path, sh.settings, force=force)
        err_console.print(f"📄 HTML report written to {path}", highlight=False)
    if not detailed:
        data.pop("agents", None)
        data.pop("tools", None)
        data["recent_improvements"] = data["recent_improvements"][:5]
    if as_json:
        echo_json(data)
        return
    _print_dashboard(data, detailed)


def _print_dashboard(d: dict[str, Any], detailed: bool) -> None:
    out = table_console()
    w = d["window"]
    out.print(f"🩺 Health dashboard (since {w['since']}: {w['start'][:16].replace('T', ' ')} → "
              f"{w['end'][:16].replace('T', ' ')} UTC)")
    out.print()
    runs = d["runs"]
    score = d["overall_health_score"]
    style = "green" if score is not None and score >= 85 else "yellow" if score is not None and score >= 70 else "red"
    print_line(out, f"  Overall health: [bold {style}]{'n/a' if score is None else f'{score:.1f}'}[/] / 100"
               + (f"   (mean of {runs['scored']} finished run(s))" if score is not None
                  else "   (no finished runs in the window)"))
    print_line(out, f"  Success rate:   {pct(d['success_rate'])} ({runs['completed']} of {runs['finished']} "
               f"finished runs; {runs['failed']} failed, {runs['cancelled']} cancelled, {runs['running']} running)")
    td = d["trend_detail"]
    print_line(out, f"  Trend:          {TREND_TEXT.get(d['trend'], d['trend'])} (last 7 days "
               f"{pct(td['recent']['success_rate'])} of {td['recent']['finished_runs']} runs vs "
               f"{pct(td['historical']['success_rate'])} of {td['historical']['finished_runs']} in the 30 days "
               f"before; ±{td['threshold'] * 100:.0f} points)")
    daily = d["daily_success"][-SPARK_DAYS:]
    rates = [x["success_rate"] for x in daily]
    known = [r for r in rates if r is not None]
    if known:
        print_line(out, f"  Daily success:  {sparkline(rates)}  ({daily[0]['date']} … {daily[-1]['date']}; "
                   f"min {pct(min(known))}, max {pct(max(known))})")
    warn_bad_rows(d["skipped_rows"], d.get("skipped_runs", 0))
    out.print()
    if d["worst_tools"]:
        out.print(_tools_table("Worst tools", d["worst_tools"]))
    else:
        out.print("  No tool with enough calls in the window.")
    out.print()
    imps = d["recent_improvements"]
    if imps:
        t = rich_table.Table(title="Recent improvements", title_justify="left", box=rich_box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False)
        t.add_column("id", no_wrap=True, min_width=21)
        t.add_column("status", no_wrap=True)
        t.add_column("description, expected → measured impact", ratio=1)
        for i in imps:
            t.add_row(for_rich(i["id"]), for_rich(i["status"]),
                      f"{for_rich(i['description'])}\n[dim]kind: {for_rich(i.get('failure_kind') or 'unknown')}\n"
                      f"expected: {for_rich(i.get('expected_impact') or '—')}\n"
                      f"measured: {for_rich(i['impact'])}[/]")
        out.print(t)
    else:
        out.print("  No improvements recorded yet (agent self-heal detect finds what to improve).")
    for e in d.get("experiments") or []:  # running A/B experiments (agent self-heal ab status ID)
        out.print()
        t = rich_table.Table(title=f"A/B {for_rich(e['experiment_id'])}: {for_rich(e['pattern_id'])} — "
                             f"{for_rich(e.get('verdict') or 'not judged yet')}", title_justify="left",
                             box=rich_box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        t.add_column("arm", no_wrap=True, min_width=21)
        t.add_column("runs", justify="right")
        t.add_column("errors", justify="right")
        t.add_column("fix", ratio=1)
        for a in e["arms"]:
            t.add_row(for_rich(a["improvement_id"]), str(a.get("runs") or 0),
                      "n/a" if a.get("error_rate") is None else pct(a["error_rate"]),
                      for_rich(a.get("description") or ""))
        out.print(t)
    if detailed:
        out.print()
        a = rich_table.Table(title="Agents", title_justify="left", box=rich_box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col, just in (("agent", "left"), ("runs", "right"), ("success", "right"), ("failed", "right"),
                          ("cancelled", "right"), ("running", "right"), ("avg s", "right"), ("trend", "left")):
            a.add_column(col, justify=just)
        for x in d.get("agents", []):
            a.add_row(for_rich(x["name"]), str(x["total_runs"]), pct(x["success_rate"]), str(x["failed_runs"]),
                      str(x["cancelled_runs"]), str(x["running_runs"]),
                      "n/a" if x["avg_duration_seconds"] is None else f"{x['avg_duration_seconds']:.1f}",
                      x["trend"].replace("_", " "))
        out.print(a)
        out.print()
        out.print(_tools_table("Tools", d.get("tools", [])))


def _tools_table(title: str, tools: list[dict[str, Any]]) -> Any:
    """Each tool's numbers and its top error types, each type whole with its count on a line of
    its own: in a column where that fits the terminal, else under the tool's name (a narrow
    column cut ``permission_de…`` and put its count on the next line)."""
    from rich.cells import cell_len

    t = rich_table.Table(title=title, title_justify="left", box=rich_box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              padding=(0, 1, 0, 0))
    width = table_console().width
    wide = width >= 110  # a narrow terminal drops the average (p95 stays)
    headers = ("calls", "ok", "timeout", "error", *(("avg ms",) if wide else ()), "p95 ms")
    rows = [[for_rich(x["name"]), f"{x['total_calls']:,}", f"{x['success_rate'] * 100:.1f}%",
             f"{x['timeout_rate'] * 100:.1f}%", f"{x['error_rate'] * 100:.1f}%",
             *((_ms(x["avg_duration_ms"]),) if wide else ()), _ms(x["p95_duration_ms"])] for x in tools]
    errors = [[f"{for_rich(e['error_type'])} {e['count']}" for e in x["top_error_types"]] or ["—"] for x in tools]
    used = [max([cell_len(h), *(cell_len(r[i]) for r in rows)]) + 1 for i, h in enumerate(("tool", *headers))]
    longest = max([cell_len("top error types"), *(cell_len(e) for es in errors for e in es)])
    beside = sum(used) + longest <= width
    # a name to paste into config.toml: never wrapped; neither is an error type
    t.add_column("tool" if beside else "tool (top error types under it)", no_wrap=True)
    for col in headers:
        t.add_column(col, justify="right", no_wrap=True)
    if beside:
        t.add_column("top error types", no_wrap=True, min_width=longest)
    for row, es in zip(rows, errors):
        if beside:
            t.add_row(*row, "\n".join(es))
        else:
            t.add_row(row[0] + "".join(f"\n[dim]  {e}[/]" for e in es), *row[1:])
    return t


@click.command("health")
@click.argument("run_id")
@common_options
def run_health(run_id: str, home: str | None, db: str | None, as_json: bool) -> None:
    """Health score and issues of one run (RUN_ID may be a unique prefix)."""
    with open_service(home, db) as sh, scan_progress(not as_json) as progress:
        result = sh.run_health(run_id, progress=progress)
    if as_json:
        echo_json(result)
        return
    out = table_console()
    print_line(out, f"🩺 Run {for_rich(result['run_id'])} ({for_rich(result['workflow_name'])}, {for_rich(result['status'])}, "
               f"started {result['started_at']})")
    basis = {"reweighted": " (re-weighted: some components unknown)",
             "no_data": " (neutral: nothing measurable yet)"}.get(result["score_basis"], "")
    print_line(out, f"  Health score: [bold]{result['health_score']:.1f}[/] / 100{basis}")
    for name, c in result["components"].items():
        value = "unknown" if c["score"] is None else f"{c['score'] * 100:.0f}%"
        out.print(f"    {name.replace('_', ' '):<20} {value:>8}  ({_weight(c)})")
    out.print()
    if not result["issues"]:
        out.print("  ✅ No issues found.")
        return
    out.print(f"  Issues ({len(result['issues'])}):")
    colors = {"high": "red", "medium": "yellow", "low": "cyan"}
    for issue in result["issues"]:
        print_line(out, f"    [{colors[issue['severity']]}]\\[{issue['severity'].upper()}][/] {for_rich(issue['description'])}")
        print_line(out, f"        → {for_rich(issue['recommendation'])}")


def _weight(component: dict[str, Any]) -> str:
    """The weight the score used (``effective_weight`` in --json), and the nominal one beside it
    when re-weighting changed it: ``weight 0.625, nominally 0.5``."""
    nominal = component["weight"]
    used = component.get("effective_weight", nominal)
    return f"weight {used:g}" if used == nominal else f"weight {used:g}, nominally {nominal:g}"


COMMANDS = [dashboard, run_health]
