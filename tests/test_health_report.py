"""The HTML report, opened in headless Chromium: its DOM holds the charts and the numbers,
and a screenshot (kept under $SELFHEAL_ARTIFACTS or tests/artifacts) shows them drawn."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selfheal_plugin.analysis.health import get_health_dashboard
from selfheal_plugin.analysis.report import (ERROR_COLOR, OK_COLOR, TIMEOUT_COLOR, local_time, reliability_axis_start,
                                             render_html, tool_reliability_svg, write_html_report)
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.errors import SelfHealError

from .conftest import NOW

ARTIFACTS = Path(os.environ.get("SELFHEAL_ARTIFACTS") or Path(__file__).parent / "artifacts")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("headless Chromium is needed for the HTML report tests: apt-get install -y chromium")
    return exe


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class DomIndex(HTMLParser):
    """Elements by id, and every element's tag/attributes/text in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self.stack: list[dict] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": [e["attrs"].get("id") for e in self.stack]}
        self.elements.append(el)
        if tag not in ("meta", "link", "br", "img", "input"):
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def by_id(self, id_: str) -> dict:
        found = [e for e in self.elements if e["attrs"].get("id") == id_]
        assert len(found) == 1, f"#{id_} found {len(found)} times"
        return found[0]

    def within(self, id_: str, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if id_ in e["parents"] and e["tag"] == tag
                and (cls is None or cls in e["attrs"].get("class", "").split())]


def png_rows(path: Path) -> tuple[int, int, list[list[bytes]]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of RGB pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows: list[list[bytes]] = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([bytes(line[i:i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return width, height, rows


def png_pixels(path: Path) -> tuple[int, int, Counter]:
    """A PNG's size and colour histogram."""
    width, height, rows = png_rows(path)
    colours: Counter = Counter()
    for row in rows:
        colours.update(row)
    return width, height, colours


def _hex(colour: str) -> bytes:
    return bytes.fromhex(colour.lstrip("#"))


@pytest.fixture
def report(history_copy, tmp_path):
    path, _ = history_copy
    with connect(path) as c:
        ImprovementStore(c).insert(Improvement(
            id="imp-report", status="verified", description="Raise the k8s pods_list timeout",
            expected_impact="+7% success rate", actual_impact="+9% success rate",
            applied_at="2026-11-14T12:00:00Z", verified_at="2026-11-19T12:00:00Z"))
        d = get_health_dashboard(c, detailed=True, since="-7d", now=NOW, improvements_limit=20)
    out = write_html_report(d, tmp_path / "report.html")
    return d, out


def test_report_is_self_contained(report):
    d, path = report
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert "url(" not in html and "<script" not in html and "@import" not in html
    assert html.count("<svg") == 3


def test_report_in_chromium_has_charts_and_numbers(report, tmp_path):
    d, path = report
    proc = run_chromium(tmp_path, "--dump-dom", path.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = DomIndex()
    dom.feed(proc.stdout)
    assert dom.by_id("overall-score")["text"] == f"{d['overall_health_score']:.1f}"
    # the terminal's figure, rounded the same way (history.text.percent)
    assert dom.by_id("success-rate")["text"] == f"{d['success_rate'] * 100:.0f}%"
    assert dom.by_id("trend")["attrs"]["data-trend"] == d["trend"]
    assert dom.by_id("run-count")["text"] == str(d["runs"]["total"])
    # daily success: one point per day with finished runs, carrying its rate
    points = dom.within("chart-daily-success", "circle", "point")
    want = {x["date"]: x["success_rate"] for x in d["daily_success"] if x["success_rate"] is not None}
    assert {p["attrs"]["data-date"]: float(p["attrs"]["data-rate"]) for p in points} == want
    assert dom.within("chart-daily-success", "polyline")
    # error types over time: bar segments add up to the failed calls of each day and type
    bars = dom.within("chart-error-types", "rect", "bar")
    got = Counter()
    for b in bars:
        got[(b["attrs"]["data-date"], b["attrs"]["data-type"])] += int(b["attrs"]["data-count"])
    assert got == Counter({(x["date"], t): c for x in d["error_types_over_time"] for t, c in x["counts"].items()})
    # tool reliability: a success bar per tool, with that tool's rate
    success = {b["attrs"]["data-tool"]: float(b["attrs"]["data-rate"])
               for b in dom.within("chart-tool-reliability", "rect", "tool-bar") if b["attrs"]["data-kind"] == "success"}
    assert success == {t["name"]: t["success_rate"] for t in d["tools"]}
    # the numbers in the tables
    rows = dom.within("table-tools", "tr")[1:]
    assert [r["text"] for r in rows][0].startswith(d["tools"][0]["name"])
    assert len(rows) == len(d["tools"])
    assert len(dom.within("table-agents", "tr")) == len(d["agents"]) + 1
    assert "+9% success rate" in dom.by_id("table-improvements")["text"]


def test_report_screenshot_shows_the_charts(report, tmp_path):
    d, path = report
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "health-report.png"
    shot.unlink(missing_ok=True)
    proc = run_chromium(tmp_path, "--window-size=1200,2200", f"--screenshot={shot}", path.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    shutil.copy(path, ARTIFACTS / "health-report.html")
    width, height, colours = png_pixels(shot)
    assert (width, height) == (1200, 2200)
    # the tool-reliability bars are drawn in their three colours (tools with timeouts and other
    # errors exist in the generated history), and the error-type chart in the palette's first colour
    for colour in (OK_COLOR, TIMEOUT_COLOR, ERROR_COLOR):
        assert colours[_hex(colour)] > 500, colour


def test_empty_report_renders(tmp_path, binks_home):
    c = connect(binks_home / "conversations.db", create=True)
    d = get_health_dashboard(c, detailed=True, now=NOW)
    html = render_html(d)
    assert "No finished runs in this window" in html and "No tool calls in this window" in html
    assert 'id="overall-score" class="">n/a<' in html


def test_report_into_missing_directory_is_one_clear_error(report, tmp_path):
    d, _ = report
    with pytest.raises(SelfHealError, match="does not exist"):
        write_html_report(d, tmp_path / "nope" / "r.html")
    assert not (tmp_path / "nope").exists()


def test_report_escapes_names(report):
    d, _ = report
    d = {**d, "tools": [{**d["tools"][0], "name": "<script>alert(1)</script>"}]}
    html = render_html(d)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_report_shows_control_characters_and_bidi_overrides_as_visible_escapes(report):
    """As the terminal and the inbox do: a U+202E in a tool name would reverse what the reader
    sees, an ESC would reach whatever renders the page's text."""
    d, _ = report
    hostile = "evil\u202etxt.exe\x1b[31m\u2066x"
    tool = {**d["tools"][0], "name": hostile,
            "top_error_types": [{"error_type": "time\x1bout\u202e", "count": 2}]}
    d = {**d, "tools": [tool], "worst_tools": [tool]}
    html = render_html(d)
    assert not any(ch in html for ch in "\x1b\u202e\u2066")
    assert "evil\\u202etxt.exe\\x1b[31m\\u2066x" in html and "time\\x1bout\\u202e" in html


# ---------------------------------------------------------------- layout (issue 15)

PAGE = bytes.fromhex("f4f5f7")


def _margins(rows: list[list[bytes]], y: int) -> tuple[int, int]:
    """Left and right page margins (background pixels) on row ``y``."""
    row = rows[y]
    left = next(i for i, px in enumerate(row) if px != PAGE)
    right = next(i for i, px in enumerate(reversed(row)) if px != PAGE)
    return left, right


@pytest.mark.parametrize("width", [1400, 390])
def test_report_is_centred_and_fits_desktop_and_phone(report, tmp_path, width):
    """Screenshots at a desktop's and a phone's width (kept as test artifacts): the page is
    centred, and on a phone the sections fit the screen."""
    d, path = report
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"health-report-{width}.png"
    shot.unlink(missing_ok=True)
    proc = run_chromium(tmp_path, f"--window-size={width},1800", f"--screenshot={shot}", path.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    w, h, rows = png_rows(shot)
    assert (w, h) == (width, 1800)
    # below the header, rows that cross a card or section have a margin on both sides
    crossing = [y for y in range(150, h, 10) if any(px != PAGE for px in rows[y])
                and rows[y][0] == PAGE and rows[y][-1] == PAGE]
    assert len(crossing) > 20
    for y in crossing[:40]:
        left, right = _margins(rows, y)
        assert abs(left - right) <= 3, (y, left, right)  # centred
        if width == 1400:
            assert left >= 140  # max-width 1100 px, the rest split on both sides
        else:
            assert left <= 20  # a phone uses the width


def test_ids_do_not_wrap_and_times_are_human(report):
    d, path = report
    html = path.read_text(encoding="utf-8")
    assert "td.id{white-space:nowrap}" in html
    dom = DomIndex()
    dom.feed(html)
    first = dom.within("table-improvements", "td")[0]
    assert first["text"] == "imp-report" and "id" in first["attrs"]["class"].split()
    tool_cell = dom.within("table-tools", "td")[0]
    assert "id" in tool_cell["attrs"]["class"].split()
    times = [e for e in dom.elements if e["tag"] == "time"]
    assert len(times) >= 4
    for t in times:
        assert re.fullmatch(r"\d\d [A-Z][a-z]{2} \d{4}, \d\d:\d\d \S+", t["text"]), t["text"]
        assert t["attrs"]["datetime"].endswith("Z")
    header = dom.elements[[e["tag"] for e in dom.elements].index("header")]["text"]
    assert not re.search(r"\d{2}:\d{2}:\d{2}\.\d", header), "no raw ISO instants with fractions"


def test_local_time_follows_the_machine_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert ">20 Nov 2026, 07:00 EST</time>" in local_time("2026-11-20T12:00:00Z")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_reliability_bars_are_scaled_to_the_datas_range():
    tools = [{"name": name, "success_rate": sr, "timeout_rate": 1 - sr, "error_rate": 0.0, "total_calls": 100}
             for name, sr in (("a", 0.939), ("b", 0.993))]
    assert reliability_axis_start(tools) == 0.9
    svg = tool_reliability_svg(tools)
    widths = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'data-tool="(\w)" data-kind="success" data-rate="[\d.]+" x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg)}
    assert widths["b"] / widths["a"] > 2  # on a 0-100% axis they differed by 6%
    assert "90.0%" in svg and "100.0%" in svg
    low = [{"name": "c", "success_rate": 0.03, "timeout_rate": 0.97, "error_rate": 0.0, "total_calls": 10}]
    assert reliability_axis_start(low) == 0.0
