"""The dashboard as one self-contained HTML page: inline CSS, inline SVG charts drawn here,
no scripts and no external resources, so the file reads the same offline and in a mail.

Charts: daily success rate (line), error types over time (stacked bars per day), tool
reliability (stacked horizontal bars: success / timeouts / other errors). Every number the
terminal dashboard shows is on the page too.
"""
from __future__ import annotations

import math
import os
import tempfile
from html import escape as _html_escape
from pathlib import Path
from typing import Any

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.text import for_terminal, percent
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow

PALETTE = ("#e377c2", "#1f77b4", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
OK_COLOR, TIMEOUT_COLOR, ERROR_COLOR = "#2ca02c", "#ff9f1c", "#d62728"
# the canonical error types keep one colour everywhere (timeouts orange as in the tool chart)
TYPE_COLORS = {"timeout": TIMEOUT_COLOR, "tool_error": ERROR_COLOR, "connection_refused": "#9467bd",
               "server_crashed": "#8c564b", "transport_error": "#17becf", "permission_denied": "#bcbd22",
               "Unknown": "#7f7f7f"}
TREND_TEXT = {"improving": "↗ improving", "degrading": "↘ degrading", "stable": "→ stable",
              "insufficient_data": "… insufficient data"}
TREND_CLASS = {"improving": "good", "degrading": "bad"}
# Written into every report: `--html` replaces an existing file only when it carries this.
REPORT_MARKER = '<meta name="generator" content="selfheal health report">'
MARKER_SCAN_BYTES = 4096
DB_SIDE_FILES = ("", "-wal", "-shm", "-journal")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header .inner{max-width:1100px;margin:0 auto}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}
main{padding:20px 28px;max-width:1100px;margin:0 auto;box-sizing:border-box}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin-bottom:18px}
.card{flex:1 1 0;background:#fff;border-radius:8px;padding:14px 18px;min-width:190px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#5b6472}
.card .value{font-size:28px;font-weight:600;margin-top:4px}
.card .sub{font-size:12px;color:#5b6472;margin-top:2px}
.good{color:#1e7d32}.warn{color:#b26a00}.bad{color:#c62828}
section{background:#fff;border-radius:8px;padding:14px 18px;margin-bottom:18px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
section h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e3e6ea}
th{background:#f0f2f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
section svg{max-width:100%;height:auto}
svg text{font-family:inherit;font-size:11px;fill:#3b4350}
.legend{display:flex;flex-wrap:wrap;gap:12px;font-size:12px;margin-top:6px}
.legend span.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.muted{color:#5b6472;font-size:12px}
td.id{white-space:nowrap}
.scroll{overflow-x:auto}
@media (max-width:600px){header{padding:12px 14px}main{padding:12px 10px}section{padding:10px}}
"""


def escape(value: Any) -> str:
    """Text for the page: control characters and bidi overrides shown as visible escapes
    (``\\x1b``, ``\\u202e``, as the terminal and the inbox show them), then HTML-escaped.
    Tool names, error types and workflow names come from the history (DESIGN.md, "Trust
    boundaries"): a raw U+202E would reverse what a reader sees."""
    return _html_escape(for_terminal(value))


def local_time(ts: str | None) -> str:
    """An instant as people read it, in this machine's time zone (where the report is made
    and, usually, read): ``27 Nov 2026, 09:30 CET``; the exact UTC instant stays in the
    ``datetime`` attribute of the ``<time>`` element."""
    if not ts:
        return "—"
    try:
        dt = parse_timestamp(ts)
    except ValueError:
        return escape(ts)
    local = dt.astimezone()
    return (f'<time datetime="{escape(format_timestamp(dt))}">{local.strftime("%d %b %Y, %H:%M")} '
            f'{escape(local.tzname() or "")}</time>')


def _pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x * 100:.{digits}f}%"


def _score_class(score: float | None) -> str:
    if score is None:
        return ""
    return "good" if score >= 85 else "warn" if score >= 70 else "bad"


def _nice_max(value: float) -> int:
    if value <= 0:
        return 1
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return max(1, int(math.ceil(step * exp)))
    return int(value)


def _no_data(svg_id: str, width: int, height: int, text: str) -> str:
    return (f'<svg id="{svg_id}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<text class="no-data" x="{width / 2}" y="{height / 2}" text-anchor="middle">{escape(text)}</text></svg>')


def daily_success_svg(daily: list[dict[str, Any]], width: int = 1000, height: int = 260) -> str:
    """Line chart of each day's success rate (0–100 %), one point per day with runs."""
    if not any(d["success_rate"] is not None for d in daily):
        return _no_data("chart-daily-success", width, height, "No finished runs in this window")
    left, right, top, bottom = 46, 14, 12, 38
    pw, ph = width - left - right, height - top - bottom
    n = len(daily)
    xs = [left + (pw * (i + 0.5) / n) for i in range(n)]
    y = lambda rate: top + ph * (1 - rate)  # noqa: E731
    parts = [f'<svg id="chart-daily-success" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="Daily success rate">']
    for g in (0, 0.25, 0.5, 0.75, 1.0):
        gy = y(g)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{g * 100:.0f}%</text>')
    step = max(1, math.ceil(n / 10))
    for i, d in enumerate(daily):
        if i % step == 0 or i == n - 1:
            parts.append(f'<text x="{xs[i]:.1f}" y="{height - bottom + 16}" text-anchor="middle">{d["date"][5:]}</text>')
    segment: list[str] = []
    segments: list[list[str]] = []
    for i, d in enumerate(daily):
        if d["success_rate"] is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        segment.append(f"{xs[i]:.1f},{y(d['success_rate']):.1f}")
    if segment:
        segments.append(segment)
    for seg in segments:
        parts.append(f'<polyline class="line" fill="none" stroke="#1f77b4" stroke-width="2" points="{" ".join(seg)}"/>')
    for i, d in enumerate(daily):
        rate = d["success_rate"]
        if rate is None:
            continue
        parts.append(
            f'<circle class="point" data-date="{d["date"]}" data-rate="{rate}" cx="{xs[i]:.1f}" cy="{y(rate):.1f}" '
            f'r="3.5" fill="#1f77b4"><title>{d["date"]}: {_pct(rate, 1)} of {d["finished_runs"]} finished '
            f'run(s)</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def error_types_svg(series: list[dict[str, Any]], width: int = 1000, height: int = 260) -> tuple[str, str]:
    """Stacked bars of failed calls per day by normalised error type; returns (svg, legend)."""
    types = sorted({t for d in series for t in d["counts"]},
                   key=lambda t: (-sum(d["counts"].get(t, 0) for d in series), t))
    if not types:
        return _no_data("chart-error-types", width, height, "No failed tool calls in this window"), ""
    others = iter(c for c in PALETTE if c not in TYPE_COLORS.values())
    colors = {t: TYPE_COLORS.get(t) or next(others, "#444") for t in types}
    left, right, top, bottom = 46, 14, 12, 38
    pw, ph = width - left - right, height - top - bottom
    n = len(series)
    ymax = _nice_max(max(d["total"] for d in series))
    slot = pw / n
    bar = max(2.0, slot * 0.7)
    parts = [f'<svg id="chart-error-types" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="Error types over time">']
    for g in (0, 0.5, 1.0):
        gy = top + ph * (1 - g)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{ymax * g:g}</text>')
    step = max(1, math.ceil(n / 10))
    for i, d in enumerate(series):
        x = left + slot * i + (slot - bar) / 2
        base = top + ph
        for t in types:
            c = d["counts"].get(t, 0)
            if not c:
                continue
            h = ph * c / ymax
            base -= h
            parts.append(f'<rect class="bar" data-date="{d["date"]}" data-type="{escape(t)}" data-count="{c}" '
                         f'x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colors[t]}">'
                         f'<title>{d["date"]}: {c} × {escape(t)}</title></rect>')
        if i % step == 0 or i == n - 1:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                         f'{d["date"][5:]}</text>')
    parts.append("</svg>")
    legend = '<div class="legend">' + "".join(
        f'<span><span class="sw" style="background:{colors[t]}"></span>{escape(t)} '
        f'({sum(d["counts"].get(t, 0) for d in series)})</span>' for t in types) + "</div>"
    return "".join(parts), legend


def tool_reliability_svg(tools: list[dict[str, Any]], width: int = 1000) -> str:
    """One stacked bar per tool: successful, timed-out and otherwise failed share of calls."""
    if not tools:
        return _no_data("chart-tool-reliability", width, 60, "No tool calls in this window")
    row, left, right, top, axis = 24, 230, 70, 6, 18
    height = top * 2 + row * len(tools) + axis
    pw = width - left - right
    lo = reliability_axis_start(tools)
    scale = pw / (1 - lo)
    parts = [f'<svg id="chart-tool-reliability" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="Tool reliability" data-axis-start="{lo}">']
    base = top + row * len(tools)
    for k in range(5):  # gridlines and labels from the axis start to 100%
        v = lo + (1 - lo) * k / 4
        gx = left + (v - lo) * scale
        parts.append(f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{top}" y2="{base}" stroke="#e3e6ea"/>'
                     f'<text class="axis" x="{gx:.1f}" y="{base + 13}" text-anchor="middle">{_pct(v, 1)}</text>')
    for i, t in enumerate(tools):
        y = top + i * row
        name = t["name"] if len(t["name"]) <= 34 else t["name"][:33] + "…"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(name)}</text>')
        x = float(left)
        # the success segment starts at the axis start; the failures stack after it up to 100%
        for share, color, label in ((t["success_rate"], OK_COLOR, "success"),
                                    (t["timeout_rate"], TIMEOUT_COLOR, "timeouts"),
                                    (t["error_rate"], ERROR_COLOR, "other errors")):
            w = scale * (share - lo if label == "success" else share)
            if w <= 0:
                continue
            parts.append(f'<rect class="tool-bar" data-tool="{escape(t["name"])}" data-kind="{label}" '
                         f'data-rate="{share}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" '
                         f'fill="{color}"><title>{escape(t["name"])}: {_pct(share, 1)} {label} of '
                         f'{t["total_calls"]} calls</title></rect>')
            x += w
        parts.append(f'<text x="{width - right + 6}" y="{y + 15}">{_pct(t["success_rate"], 1)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def reliability_axis_start(tools: list[dict[str, Any]]) -> float:
    """Where the reliability bars' axis starts: below the lowest success rate, in steps of
    5 points, so 93.9% and 99.3% look different (0 when some tool is below 6%)."""
    low = min(t["success_rate"] for t in tools)
    return max(0.0, math.floor((low - 0.01) * 20) / 20)


def _table(table_id: str, headers: list[tuple[str, bool]], rows: list[list[str]], empty: str,
           nowrap: tuple[int, ...] = ()) -> str:
    """A table; the columns in ``nowrap`` (ids, tool names) never wrap, and a table wider
    than a phone scrolls sideways inside its section."""
    if not rows:
        return f'<p class="muted" id="{table_id}-empty">{escape(empty)}</p>'
    head = "".join(f'<th class="{"num" if num else ""}">{escape(h)}</th>' for h, num in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="{"num" if headers[i][1] else "id" if i in nowrap else ""}">{escape(c)}</td>'
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def render_html(d: dict[str, Any], title: str = "selfheal health report") -> str:
    """The whole page for a :func:`health.get_health_dashboard` result (ideally ``detailed``)."""
    score = d["overall_health_score"]
    runs = d["runs"]
    td = d["trend_detail"]
    window = d["window"]
    tools = d.get("tools", d["worst_tools"])
    err_svg, err_legend = error_types_svg(d["error_types_over_time"])
    cards = [
        ("Overall health", f'<span id="overall-score" class="{_score_class(score)}">'
                           f'{"n/a" if score is None else f"{score:.1f}"}</span>',
         f"mean of {runs['scored']} finished run(s), 0–100"),
        ("Success rate", f'<span id="success-rate">{percent(d["success_rate"])}</span>',
         f"{runs['completed']} completed of {runs['finished']} finished; {runs['failed']} failed, "
         f"{runs['cancelled']} cancelled, {runs['running']} running"),
        ("Trend", f'<span id="trend" class="{TREND_CLASS.get(d["trend"], "")}" data-trend="{d["trend"]}">{TREND_TEXT.get(d["trend"], d["trend"])}</span>',
         f"last 7 days {percent(td['recent']['success_rate'])} ({td['recent']['finished_runs']} runs) vs "
         f"30 days before {percent(td['historical']['success_rate'])} ({td['historical']['finished_runs']} runs)"),
        ("Runs in window", f'<span id="run-count">{runs["total"]}</span>',
         f"{local_time(window['start'])} → {local_time(window['end'])}"),
    ]
    built = {"Runs in window"}  # its sub-line is made of <time> elements; the others are text
    cards_html = "".join(f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{value}</div>'
                         f'<div class="sub">{sub if label in built else escape(sub)}</div></div>'
                         for label, value, sub in cards)
    tool_rows = [[t["name"], f"{t['total_calls']:,}", _pct(t["success_rate"], 1), _pct(t["timeout_rate"], 1),
                  _pct(t["error_rate"], 1), _ms(t["avg_duration_ms"]), _ms(t["p95_duration_ms"]),
                  ", ".join(f"{e['error_type']} ({e['count']})" for e in t["top_error_types"]) or "—"]
                 for t in tools]
    agent_rows = [[a["name"], f"{a['total_runs']:,}", percent(a["success_rate"]), str(a["failed_runs"]),
                   str(a["cancelled_runs"]), str(a["running_runs"]),
                   "n/a" if a["avg_duration_seconds"] is None else f"{a['avg_duration_seconds']:.1f}",
                   a["trend"].replace("_", " ")] for a in d.get("agents", [])]
    imp_rows = [[i["id"], i["status"], i.get("kind_evidence") or i.get("failure_kind") or "unknown", i["description"],
                 i.get("expected_impact") or "—", i["impact"]]
                for i in d["recent_improvements"]]
    sections = [
        ("Daily success rate", daily_success_svg(d["daily_success"]), ""),
        ("Error types over time", err_svg + err_legend, ""),
        ("Tool reliability", tool_reliability_svg(tools) +
         f'<div class="legend"><span><span class="sw" style="background:{OK_COLOR}"></span>success</span>'
         f'<span><span class="sw" style="background:{TIMEOUT_COLOR}"></span>timeouts</span>'
         f'<span><span class="sw" style="background:{ERROR_COLOR}"></span>other errors</span>'
         f'<span class="muted">axis from {_pct(reliability_axis_start(tools) if tools else 0.0)} to 100% '
         f'(scaled to the data)</span></div>', ""),
        ("Tools", _table("table-tools", [("tool", False), ("calls", True), ("success", True), ("timeouts", True),
                                         ("other errors", True), ("avg ms", True), ("p95 ms", True),
                                         ("top error types", False)], tool_rows,
                         "No tool calls in this window.", nowrap=(0,)), ""),
        ("Agents", _table("table-agents", [("agent", False), ("runs", True), ("success", True), ("failed", True),
                                           ("cancelled", True), ("running", True), ("avg s", True), ("trend", False)], agent_rows,
                          "No runs in this window."), ""),
        ("Recent improvements", _table("table-improvements", [("id", False), ("status", False),
                                                              ("failure kind", False), ("description", False), ("expected", False),
                                                              ("measured impact", False)], imp_rows,
                                       "No improvements recorded yet.", nowrap=(0, 1)), ""),
        ("A/B experiments", _table("table-ab", [("experiment", False), ("pattern", False), ("arm", False),
                                                ("runs", True), ("error rate", True), ("verdict", False)],
                                   [[e["experiment_id"], e["pattern_id"], a["improvement_id"] or "",
                                     str(a.get("runs") or 0), _pct(a["error_rate"]) if a.get("error_rate") is not None
                                     else "n/a", e.get("verdict") or "not judged yet"]
                                    for e in d.get("experiments") or [] for a in e["arms"]],
                                   "No A/B experiment running.", nowrap=(0, 2)), ""),
    ]
    body = "".join(f"<section><h2>{escape(h)}</h2>{content}</section>" for h, content, _ in sections)
    skipped = d.get("skipped_rows", 0)
    note = f" · {skipped} malformed event row(s) skipped" if skipped else ""
    if d.get("skipped_runs"):
        note += f" · {d['skipped_runs']} malformed run row(s) skipped"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}<title>{escape(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        f"<header><div class=\"inner\"><h1>{escape(title)}</h1><p>window {escape(window['since'])}: "
        f"{local_time(window['start'])} → {local_time(window['end'])} · generated "
        f"{local_time(format_timestamp(utcnow()))}{escape(note)}</p></div></header>"
        f'<main><div class="cards">{cards_html}</div>{body}</main></body></html>\n'
    )


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name the same file: equal once symlinks are resolved, or one inode."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a symlink loop, an unreadable directory
        return False


def is_report(path: Path) -> bool:
    """``path`` is a report this module wrote (its marker is in the first bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(MARKER_SCAN_BYTES)
    except OSError:
        return False
    return REPORT_MARKER.encode() in head


def check_report_target(path: str | os.PathLike, settings: Any = None, *, force: bool = False) -> Path:
    """Refuse a target that would destroy something: the run-history database (or its
    -wal/-shm/-journal files) or ``config.toml`` always; any other existing file that is not
    an earlier report unless ``force``. Returns the path to write; raises SelfHealError."""
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    protected: list[tuple[Path, str]] = []
    if settings is not None:
        dbs = {Path(settings.db_path).expanduser(), Path(settings.home).expanduser() / "conversations.db"}
        protected += [(db.with_name(db.name + suffix), f"the run-history database{f' {suffix} file' if suffix else ''}"
                       f" ({db})") for db in sorted(dbs) for suffix in DB_SIDE_FILES]
        protected.append((Path(settings.config_path).expanduser(), "the runtime's config.toml"))
    for p, what in protected:
        if _same_file(target, p):
            raise SelfHealError(f"refusing to write the HTML report to {target}: that is {what}")
    if target.is_dir():
        raise SelfHealError(f"cannot write {target}: it is a directory")
    if (target.exists() or target.is_symlink()) and not force and not is_report(target):
        raise SelfHealError(f"refusing to overwrite {target}: it is not an earlier selfheal report "
                            "(use --force to replace it)")
    if target.is_symlink():  # replace the file it points to and keep the link
        target = target.resolve()
        parent = target.parent
    if not parent.is_dir():
        raise SelfHealError(f"cannot write {target}: directory {parent} does not exist")
    return target


def write_html_report(d: dict[str, Any], path: str | os.PathLike, settings: Any = None, *,
                      force: bool = False) -> Path:
    """Write the page atomically (temp file + rename) after :func:`check_report_target`;
    a bad or protected path is one clear error and nothing is written."""
    target = check_report_target(path, settings, force=force)
    parent = target.parent if str(target.parent) else Path(".")
    html = render_html(d)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".selfheal-report-", suffix=".html", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(html)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise SelfHealError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target
