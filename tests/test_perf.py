"""What makes a warm detect fast gives what the plain computation gives: the stored evidence
(analysis/evidencecache.py) against evidence read fresh, and when it goes stale; the
bisection in determinism and server streaks against the plain scans they replaced."""
from __future__ import annotations

import bisect
import json
import random
import sqlite3
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from selfheal_plugin.analysis import evidence as E
from selfheal_plugin.analysis import patterns as P
from selfheal_plugin.history import errorindex
from selfheal_plugin.history.connection import SELFHEAL_SCHEMA, connect
from selfheal_plugin.history.errorindex import args_key

from .evidence_data import NOW, Call, Run, spread, write_history

SINCE = (NOW - timedelta(days=7)).isoformat()

# ---------------------------------------------------------------- the plain scans, as they were


def plain_determinism(occ: list[dict[str, Any]], calls: list[E._Call], args: dict[int, Any]) -> dict[str, Any]:
    by_run: dict[str, list[E._Call]] = {}
    for c in calls:
        by_run.setdefault(c.run_id, []).append(c)
    same_failed = same_ok = retried = retry_ok = follow = follow_ok = 0
    for o in occ:
        key = args.get(o["event_id"])
        later = [c for c in calls if c.event_id > o["event_id"]]
        in_run = [c for c in by_run.get(o["run_id"], ()) if c.event_id > o["event_id"]]
        if in_run:
            follow += 1
            follow_ok += in_run[0].ok
        if key is None:
            continue
        same = [c for c in later if c.args_key == key]
        if same:
            nxt = same[0]
            same_ok += nxt.ok
            same_failed += not nxt.ok
            if nxt.run_id == o["run_id"]:
                retried += 1
                retry_ok += nxt.ok
    return {"same_args_failed_again": same_failed, "same_args_succeeded_later": same_ok, "retried_in_run": retried,
            "retry_succeeded_in_run": retry_ok, "followed_in_run": follow, "follow_up_succeeded": follow_ok}


def plain_streak(conn: sqlite3.Connection, tool: str, occ: list[dict[str, Any]]) -> dict[str, Any]:
    server = tool.split("__")[1]
    times = sorted(o["ts"] for o in occ)
    prefix = f"mcp__{server}__"
    errors = conn.execute("SELECT ts, tool_name FROM selfheal_errors WHERE ts >= ? AND ts <= ? "
                          "AND substr(tool_name, 1, ?) = ?", (times[0] - E.STREAK_SECONDS,
                                                              times[-1] + E.STREAK_SECONDS, len(prefix), prefix))
    others = sorted((ts, name) for ts, name in errors if name != tool)
    other_ts = [ts for ts, _ in others]
    together = 0
    for t in times:
        i = bisect.bisect_left(other_ts, t - E.STREAK_SECONDS)
        if i < len(other_ts) and other_ts[i] <= t + E.STREAK_SECONDS:
            together += 1
    return {"server": server, "other_tools_failing": len({name for _, name in others}),
            "occurrences_with_server_streak": together, "streak_share": round(together / len(times), 4)}


@pytest.mark.parametrize("seed", range(20))
def test_determinism_by_bisection_counts_what_the_plain_scan_counts(seed: int) -> None:
    rng = random.Random(seed)
    runs, keys = [f"r{i}" for i in range(rng.randint(1, 8))], [None, '{"a": 1}', '{"a": 2}', '{"b": 3}']
    calls = [E._Call(eid, rng.choice(runs), rng.random() < 0.5, rng.choice(keys))
             for eid in sorted(rng.sample(range(1, 400), rng.randint(0, 120)))]
    failed = [c for c in calls if not c.ok] or calls[:1]
    occ = [{"event_id": c.event_id, "run_id": c.run_id} for c in failed]
    args = {c.event_id: c.args_key for c in calls if rng.random() < 0.9}
    calls += [E._Call(1000 + i, run, True, None) for i, run in enumerate((None, b"r1", 7))]  # not text
    got = E.determinism(occ, calls, args)
    assert {k: v for k, v in got.items() if k != "verdict"} == plain_determinism(occ, calls, args)
    assert E.determinism(occ, calls, args, E.call_index(calls)) == got  # the index shared by a tool's patterns


@pytest.mark.parametrize("seed", range(10))
def test_server_streak_by_bisection_counts_what_the_plain_scan_counts(seed: int) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(":memory:")
    conn.executescript(SELFHEAL_SCHEMA)
    tools = [f"mcp__s{rng.randint(0, 1)}__t{i}" for i in range(5)]
    rows = []
    for eid in range(1, 300):
        ts = round(rng.uniform(0, 3000), rng.choice([0, 1, 3]))  # ties and exact 60 s gaps happen
        rows.append((eid, "r", 0, ts, "t", rng.choice(tools), "timeout", None, "m", "m", None, ""))
    conn.executemany("INSERT INTO selfheal_errors VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    shared = {s: E.server_errors(conn, s, -1e9, 1e9) for s in ("s0", "s1")}
    for tool in tools:
        occ = [{"ts": r[3]} for r in rows if r[5] == tool]
        if occ:
            want = plain_streak(conn, tool, occ)
            assert E.server_streak(conn, tool, [o["ts"] for o in occ]) == want
            assert E.server_streak(conn, tool, [o["ts"] for o in occ], shared[tool.split("__")[1]]) == want


def plain_sums(occ: list[dict[str, Any]], known: list[Any]) -> dict[str, Any]:
    """The evidence's sums taken one occurrence at a time, as the evidence once did."""
    votes: Counter = Counter()
    reasons: Counter = Counter()
    codes = {"errno": Counter(), "http_status": Counter(), "jsonrpc": Counter()}
    templates: dict[str, dict[str, Any]] = {}
    named: Counter = Counter()
    paths: dict[str, dict[str, Any]] = {}
    retry, resets = [], []
    for o, ((kind, reason), c, arg) in zip(occ, known):
        votes[kind] += 1
        reasons[f"{kind}: {reason}"] += 1
        codes["errno"].update(c["errno"])
        codes["http_status"].update(str(x) for x in c["http_status"])
        codes["jsonrpc"].update(str(x) for x in c["jsonrpc"])
        if c["retry_after_s"] is not None:
            retry.append(c["retry_after_s"])
        if c["reset_at"] is not None:
            resets.append(c["reset_at"] - o["ts"])
        t = templates.setdefault(o["template"], {"template": o["template"], "count": 0, "kind": kind,
                                                 "example": o["message"][:300]})
        t["count"] += 1
        if arg:
            named[arg["type"]] += 1
            if arg["type"] == "path":
                p = paths.setdefault(arg["value"], {"path": arg["value"], "argument": arg["key"], "count": 0,
                                                    "exists_now": None})
                p["count"] += 1
    return {"kind_votes": dict(votes.most_common()), "reasons": [r for r, _ in reasons.most_common(3)],
            "templates": sorted(templates.values(), key=lambda t: -t["count"])[:10],
            "codes": {k: dict(v.most_common()) for k, v in codes.items()},
            "named_arguments": dict(named.most_common()), "paths": sorted(paths.values(), key=lambda p: -p["count"])[:10],
            "path_occurrences": sum(p["count"] for p in paths.values()),
            "retry_after_s": max(retry) if retry else None, "reset_in_s": round(max(resets), 3) if resets else None}


@pytest.mark.parametrize("seed", range(30))
def test_the_evidence_summed_per_kind_and_context_is_what_summing_each_occurrence_gives(seed: int) -> None:
    """Sums per distinct kind and context keep the order of first appearance that ties
    follow (votes, reasons, codes, templates, named arguments and paths), as counting one
    occurrence at a time does; kinds of equal value held as two entries count as one."""
    rng = random.Random(seed)
    conn = sqlite3.connect(":memory:")
    conn.executescript(SELFHEAL_SCHEMA)
    shared = [E.message_codes(m) for m in ("ENOENT here", "HTTP 429 Too Many Requests, retry-after: 5",
                                            "status code 503 ECONNRESET", "MCP error -32602", "quiet",
                                            "rate limit reset at 1800000000")]
    tally = E.Tally("tool_error", "tool")
    occ, known = [], []
    for i in range(rng.randint(1, 60)):
        o = {"event_id": i + 1, "run_id": f"r{rng.randint(0, 5)}", "ts": 1000.0 + rng.choice([0, 1, 5]) * i,
             "template": rng.choice(["t1 <n>", "t2 <path>", "t3"]), "message": f"m{rng.randint(0, 3)} " * 100,
             "duration_ms": rng.choice([None, 100, 30000])}
        codes = rng.choice(shared)
        codes = dict(codes) if rng.random() < 0.3 else codes  # equal value, another object
        arg = rng.choice([None, None, {"key": rng.choice(["path", "file", None]), "value": f"/p/{rng.randint(0, 4)}",
                                       "type": "path"}, {"key": "url", "value": "https://x", "type": "url"}])
        k = ((rng.choice(["unknown", "missing_resource", "rate_limited", "slow_tail"]), rng.choice(["a", "b"])), codes,
             arg)
        tally.add(o, rng.choice([None, 0, 1]), rng.choice([None, 0, 1]), rng.choice([None, 0, 1]))
        tally.know(i, k)
        occ.append(o)
        known.append(k)
    start = rng.randint(0, len(occ) - 1)
    got, _ = E.evidence_of(conn, tally, start, "tool_error", check_paths=False)
    want = plain_sums(occ[start:], known[start:])
    assert {k: got[k] for k in want if k != "reasons"} == {k: v for k, v in want.items() if k != "reasons"}
    assert got["reasons"][:len(want["reasons"])] == want["reasons"] and got["sampled_occurrences"] == len(occ) - start


# ---------------------------------------------------------------- stored evidence

FS = "mcp__filesystem__read_text_file"
LIST = "mcp__filesystem__list_directory"
SEARCH = "mcp__search__web_search"


def history(db: Path, missing: Path) -> Path:
    """ENOENT reads retried in the run, a listing of the same server failing alongside,
    searches timing out and sometimes recovering, successes in between."""
    runs = []
    for i, start in enumerate(spread(60)):
        path = str(missing / f"notes-{i % 4}.md")
        if i % 3 == 0:
            msg = f"ENOENT: no such file or directory, open '{path}'"
            calls = [Call(FS, {"path": path}, False, msg), Call(FS, {"path": path}, False, msg),
                     Call(LIST, {"path": str(missing)}, False, f"ENOENT: no such file or directory, scandir '{missing}'")]
        elif i % 3 == 1:
            calls = [Call(SEARCH, {"query": f"q{i % 5}"}, False, "Tool mcp__search__web_search timed out after 30s",
                          ms=30000), Call(SEARCH, {"query": f"q{i % 5}"}, i % 2 == 0, "ok", ms=900)]
        else:
            calls = [Call(FS, {"path": f"/srv/docs/readme-{i}.md"}, True, "# readme")]
        runs.append(Run(start, calls))
    return write_history(db, runs)


def detect(conn: sqlite3.Connection, counted: list[str] | None = None,
           monkeypatch: pytest.MonkeyPatch | None = None) -> list[dict[str, Any]]:
    if monkeypatch is not None and counted is not None:
        real = E.evidence_of

        def counting(conn: Any, tally: Any, *args: Any, **kwargs: Any) -> Any:
            counted.append(tally.tool_name)
            return real(conn, tally, *args, **kwargs)
        monkeypatch.setattr(P, "evidence_of", counting)
    found = P.detect_failure_patterns(conn, since=SINCE, min_occurrences=3, confidence_threshold=0.0, now=NOW,
                                      lazy_detail=True)
    if monkeypatch is not None:
        monkeypatch.setattr(P, "evidence_of", E.evidence_of)
    return [p.to_dict() for p in found.patterns]


def fresh(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Detect with nothing stored: the window grouped and every evidence read again."""
    conn.execute("DELETE FROM selfheal_evidence")
    conn.execute("DELETE FROM selfheal_signatures")
    conn.execute("DELETE FROM selfheal_error_kinds")
    conn.execute("DELETE FROM selfheal_followups")
    conn.commit()
    return detect(conn)


def append(db: Path, *calls: Call, at: float = 1.0) -> None:
    """One more run, ``at`` hours before NOW, in the runtime's format."""
    write_history(db, [Run(NOW - timedelta(hours=at), list(calls))])


def test_a_warm_detect_reads_no_evidence_and_finds_what_a_fresh_one_does(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    first_reads: list[str] = []
    first = detect(conn, first_reads, monkeypatch)
    assert {p["id"].split(":", 1)[1] for p in first} == {FS, LIST, SEARCH} and len(first_reads) == len(first)
    assert conn.execute("SELECT count(*) FROM selfheal_evidence").fetchone()[0] == len(first)
    warm_reads: list[str] = []
    warm = detect(conn, warm_reads, monkeypatch)
    assert warm_reads == [] and warm == first
    assert fresh(conn) == first
    assert {p["id"]: p["failure_kind"] for p in first}[f"connection_refused:{FS}"] == "missing_resource"
    kinds = conn.execute("SELECT count(*) FROM selfheal_error_kinds").fetchone()[0]
    assert kinds == sum(p["occurrences"] for p in first)  # each message's kind, kept for the next reading


def test_the_kinds_of_messages_read_before_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    detect(conn)
    path = str(tmp_path / "missing" / "notes-0.md")
    append(db, Call(FS, {"path": path}, False, f"ENOENT: no such file or directory, open '{path}' (new)"))
    read: list[str] = []
    named: list[str] = []  # the messages whose call's arguments were parsed for the argument they name
    real, real_named = E.message_kind, E.named_argument

    def counting(message: str, *args: Any) -> Any:
        read.append(message)
        return real(message, *args)

    def counting_named(message: str, args: Any) -> Any:
        named.append(message)
        return real_named(message, args)
    monkeypatch.setattr(E, "message_kind", counting)
    monkeypatch.setattr(E, "named_argument", counting_named)
    E._kind_and_codes.cache_clear()
    after = detect(conn)
    assert [m for m in read if m.endswith("(new)")] == read and len(read) == 1
    assert [m for m in named if m.endswith("(new)")] == named and len(named) == 1
    assert after == fresh(conn)  # what was kept gives what reading every message again does
    conn.execute("UPDATE selfheal_error_kinds SET kind = 'bogus'")
    conn.execute("UPDATE selfheal_state SET value = 'another' WHERE key = 'error_kinds_code'")
    conn.execute("DELETE FROM selfheal_evidence")
    conn.commit()
    assert detect(conn) == after  # kinds read by another evidence code are dropped, not used


@pytest.mark.parametrize("change", ["failure", "success", "other tool of the server", "path now exists",
                                    "malformed row", "index rebuilt"])
def test_stored_evidence_goes_stale_with_what_it_was_read_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               change: str) -> None:
    missing = tmp_path / "missing"
    db = history(tmp_path / "h.db", missing)
    conn = connect(db)
    before = detect(conn)
    path = str(missing / "notes-0.md")
    if change == "failure":
        append(db, Call(FS, {"path": path}, False, f"ENOENT: no such file or directory, open '{path}'"))
    elif change == "success":  # the same arguments succeed now: the determinism counts change
        append(db, Call(FS, {"path": path}, True, "# notes"))
    elif change == "other tool of the server":
        append(db, Call(LIST, {"path": str(missing)}, False, f"ENOENT: no such file or directory, scandir '{missing}'"),
               at=24 * 6.5)
    elif change == "path now exists":
        missing.mkdir()
        for i in range(4):
            (missing / f"notes-{i}.md").write_text("notes")
    elif change == "malformed row":
        c = sqlite3.connect(db)
        rid = c.execute("SELECT id FROM runs LIMIT 1").fetchone()[0]
        with c:
            c.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES "
                      "(?, 9, 'tool_complete', ?, ?)", (rid, json.dumps({"name": FS, "is_error": False,
                                                                         "duration": 1e300}), NOW.isoformat()))
        c.close()
    else:
        conn.execute("UPDATE selfheal_state SET value = 'old' WHERE key = 'errors_index_version'")
        conn.commit()
    reads: list[str] = []
    after = detect(conn, reads, monkeypatch)
    assert after == fresh(conn)  # what is used is what a fresh read gives
    if change in ("failure", "success", "path now exists"):
        assert FS in reads and SEARCH not in reads
    elif change == "other tool of the server":
        assert {FS, LIST} <= set(reads) and SEARCH not in reads
    else:  # a malformed row may be any tool's call; a rebuilt index holds new rows
        assert sorted(reads) == sorted(p["tool_name"] for p in before)
    if change in ("failure", "success", "path now exists"):
        assert after != before


def test_evidence_of_another_code_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfheal_plugin.analysis import evidencecache

    conn = connect(history(tmp_path / "h.db", tmp_path / "missing"))
    first = detect(conn)
    conn.execute("UPDATE selfheal_evidence SET evidence = json_set(evidence, '$.kind', 'bogus')")
    conn.commit()
    monkeypatch.setattr(evidencecache, "_CODE_KEY", "another")
    reads: list[str] = []
    assert all(p["failure_kind"] != "bogus" for p in detect(conn, reads, monkeypatch)) and len(reads) == len(first)


def test_a_file_we_cannot_write_keeps_no_evidence_and_detect_still_answers(tmp_path: Path) -> None:
    from selfheal_plugin.analysis import evidencecache

    conn = connect(history(tmp_path / "h.db", tmp_path / "missing"))
    first = detect(conn)
    conn.execute("DELETE FROM selfheal_evidence")
    conn.commit()
    conn.execute("PRAGMA query_only = 1")
    evidencecache.store(conn, [("x:y", "[]", {"kind": "unknown"}, [])])  # refused, not raised
    assert conn.execute("SELECT count(*) FROM selfheal_evidence").fetchone()[0] == 0
    conn.execute("PRAGMA query_only = 0")
    assert detect(conn) == first


@pytest.mark.parametrize("change", ["nothing", "failure", "new run", "window moved", "filter"])
def test_the_stored_grouping_of_the_window_is_used_only_for_the_same_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    since, kwargs = SINCE, {}
    detect(conn)
    if change == "failure":
        append(db, Call(SEARCH, {"query": "q1"}, False, "Tool mcp__search__web_search timed out after 30s", ms=30000))
    elif change == "new run":  # a run with no tool call: the runs the failures join may have changed
        append(db)
    elif change == "window moved":  # the oldest failures leave the window
        since = (NOW - timedelta(days=4)).isoformat()
    elif change == "filter":
        kwargs = {"tool_name": SEARCH}
    grouped: list[int] = []
    real = P._signature_of

    def counting(*args: Any) -> Any:
        grouped.append(1)
        return real(*args)
    monkeypatch.setattr(P, "_signature_of", counting)

    def run() -> list[dict[str, Any]]:
        found = P.detect_failure_patterns(conn, since=since, min_occurrences=3, confidence_threshold=0.0, now=NOW,
                                          lazy_detail=True, **kwargs)
        return [p.to_dict() for p in found.patterns]
    got = run()
    assert bool(grouped) == (change != "nothing")
    grouped.clear()
    assert run() == got and grouped == []  # stored again: used next time
    conn.execute("DELETE FROM selfheal_signatures")
    conn.execute("DELETE FROM selfheal_evidence")
    conn.commit()
    assert run() == got


def test_the_failed_calls_arguments_are_read_by_their_ids(tmp_path: Path) -> None:
    conn = connect(history(tmp_path / "h.db", tmp_path / "missing"))
    P.detect_failure_patterns(conn, since=SINCE, now=NOW)  # the index
    failed = [eid for (eid,) in conn.execute("SELECT event_id FROM selfheal_calls WHERE ok = 0 AND tool_name IN (?, ?)",
                                             (FS, SEARCH))]
    keys, texts = E.failed_calls(conn, [*failed, 10**9])  # an id of no call: none
    assert len(failed) > 5 and set(keys) == set(texts) == set(failed)
    assert all(keys[eid] == args_key(texts[eid]) for eid in failed)
    assert all(json.loads(t) in ({"path": str(tmp_path / "missing" / f"notes-{i}.md")} for i in range(4))
               or "query" in json.loads(t) for t in texts.values())
    assert E.failed_calls(conn, []) == ({}, {})


def test_the_follow_ups_kept_by_the_index_give_what_every_call_gives(tmp_path: Path) -> None:
    """The index keeps, for each failure, the outcome of the next call of its tool in its
    run and with its arguments; they, the same read from the calls, and determinism from
    them, are what every call of the tool gives, and so are the durations SQLite sums."""
    db = history(tmp_path / "h.db", tmp_path / "missing")
    append(db, Call(SEARCH, {"query": "only the run is shared"}, False, "Request timed out after 30 s", "timeout"),
           Call(SEARCH, {"query": "a follow-up"}))
    conn = connect(db)
    found = P.detect_failure_patterns(conn, since=SINCE, now=NOW, confidence_threshold=0.0, min_occurrences=1)
    checked = 0
    for p in found.patterns:
        occ = E.recent(p.occurrences_detail)
        rows = conn.execute("SELECT event_id, run_id, ok, duration, args_key FROM selfheal_calls WHERE tool_name = ? "
                            "ORDER BY event_id", (p.tool_name,)).fetchall()
        every = [E._Call(eid, run, bool(ok), key) for eid, run, ok, _, key in rows]
        keys, _ = E.failed_calls(conn, [o["event_id"] for o in occ])
        kept = conn.execute("SELECT count(*) FROM selfheal_followups WHERE event_id IN (SELECT value FROM json_each(?))",
                            (json.dumps([o["event_id"] for o in occ]),)).fetchone()[0]
        assert kept == len(occ)  # every failure's, from the index
        from_index, from_calls = E.read_followups(conn, occ), E.followups_from_calls(conn, occ)
        assert from_index == from_calls and E.determinism_of(from_index.values()) == E.determinism(occ, every, keys)
        ok = [float(d) for eid, _, good, d, _ in rows if good and d is not None and eid >= occ[0]["event_id"]]
        for limit in (1.0, 500.0, 10_000.0):
            summed = E.timeout_durations(conn, p.tool_name, [limit], occ[0]["event_id"])
            assert (summed["successes"], summed["successes_near_limit"], summed["success_ms_max"]) == (
                len(ok), sum(d >= E.HANG_SHARE * limit for d in ok), max(ok) if ok else None)
        checked += 1
    assert checked >= 3
    answered = conn.execute("SELECT count(follow), count(repeat) FROM selfheal_followups").fetchone()
    assert answered[0] > 0 and answered[1] > 0  # both questions answered somewhere: the test can fail


@pytest.mark.parametrize("damaged", [False, True])
def test_follow_ups_kept_open_are_answered_by_later_calls(tmp_path: Path, damaged: bool) -> None:
    """A failure's follow-ups are kept; a later call that repeats its arguments answers
    one still open, and the evidence then is what reading every call at once gives. A kept
    row of another shape is not believed: the calls are read for it instead."""
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    detect(conn)
    eid, text = conn.execute(
        "SELECT f.event_id, c.arguments FROM selfheal_followups f JOIN selfheal_calls c USING (event_id) "
        "WHERE f.repeat IS NULL AND c.tool_name = ? ORDER BY f.event_id DESC LIMIT 1", (SEARCH,)).fetchone()
    if damaged:
        conn.execute("UPDATE selfheal_followups SET repeat_run = 'x' WHERE event_id = ?", (eid,))
        conn.commit()
    append(db, Call(SEARCH, json.loads(text)), at=0.5)  # the same search succeeds, in another run
    after = detect(conn)
    assert tuple(conn.execute("SELECT repeat, repeat_run FROM selfheal_followups WHERE event_id = ?",
                              (eid,)).fetchone()) == ((None, "x") if damaged else (1, 0))
    assert E.read_followups(conn, [{"event_id": eid, "tool_name": SEARCH, "run_id": conn.execute(
        "SELECT run_id FROM selfheal_errors WHERE event_id = ?", (eid,)).fetchone()[0]}])[eid].repeat == 1
    assert after == fresh(conn)


def test_the_calls_index_is_the_same_ingested_at_once_or_in_pieces(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A call takes the latest tool_start of its run and tool at most START_LOOKBACK_IDS
    ids before it, each start once: the same calls however the history was cut into scans."""
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    t = (NOW - timedelta(hours=2)).isoformat()

    def event(run: str, etype: str, name: Any, **data: Any) -> tuple[str, int, str, str, str]:
        return (run, 0, etype, json.dumps({"type": etype, "name": name, **data}), t)
    extra = [event("A", "tool_start", FS, arguments={"path": "/a"}),
             event("B", "tool_start", FS, arguments={"path": "/b"}),
             event("B", "tool_complete", FS, is_error=False, duration=5),
             event("A", "tool_complete", FS, is_error=True, result="ENOENT a", error_type="connection_refused"),
             event("A", "tool_complete", FS, is_error=False, duration=7),  # its start was taken by the one before
             event("C", "tool_start", SEARCH, arguments={"query": "far"}),
             *[event("D", "tool_start", LIST, arguments={"path": f"/d{i}"}) for i in range(4)],
             event("C", "tool_complete", SEARCH, is_error=False, duration=9),  # 5 ids after its start
             ("E", 0, "tool_complete", "{not json", t)]
    conn.executemany("INSERT INTO runs VALUES (?, 'files', 'task', 'completed', 'm', ?, ?, 1, NULL, NULL, NULL)",
                     [(run, t, t) for run in "ABCDE"])
    conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)",
                     extra)
    conn.commit()
    conn.close()
    monkeypatch.setattr(errorindex, "START_LOOKBACK_IDS", 4)
    tables = {}
    for chunk in (1_000_000, 3, 1):
        copy = tmp_path / f"copy-{chunk}.db"
        copy.write_bytes(db.read_bytes())
        monkeypatch.setattr(errorindex, "CHUNK_IDS", chunk)
        c = connect(copy)
        errorindex.refresh(c)
        tables[chunk] = [[tuple(r) for r in c.execute(f"SELECT * FROM {name} ORDER BY 1, 2")]
                         for name in ("selfheal_calls", "selfheal_tool_hours", "selfheal_errors", "selfheal_followups")]
        tables[chunk].append(tuple(c.execute("SELECT value FROM selfheal_state WHERE key = 'bad_rows'").fetchone()))
        c.close()
    assert tables[1_000_000] == tables[3] == tables[1]
    calls = {r[0]: r for r in tables[1][0]}
    last = max(calls)
    a_fail, a_ok, c_far = calls[last - 7], calls[last - 6], calls[last]
    assert (a_fail[4], a_fail[6], a_fail[7], a_fail[8]) == (0, "connection_refused", args_key('{"path":"/a"}'),
                                                             '{"path":"/a"}')
    assert calls[last - 8][7] == args_key('{"path":"/b"}') and calls[last - 8][8] is None  # a success keeps no text
    assert a_ok[7] is None and c_far[7] is None and c_far[5] == 9
    assert tables[1][4] == ("1",)  # the row that is not JSON
    followups = {r[0]: r for r in tables[1][3]}
    assert followups[last - 7][3:] == (args_key('{"path":"/a"}'), 1, None, None)  # A's next call succeeded


@pytest.mark.parametrize("most", [1, 3, 500])
def test_the_oldest_occurrence_the_evidence_reads_is_found_in_sql_as_in_python(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                most: int) -> None:
    monkeypatch.setattr(P, "MAX_OCCURRENCES", most)
    conn = connect(history(tmp_path / "h.db", tmp_path / "missing"))
    P.detect_failure_patterns(conn, since=SINCE, now=NOW)  # the index
    since = (NOW - timedelta(days=7)).timestamp()
    window = P._Window(conn, since, None, None)
    for (etype, tool), t in P.tallies_of(P._error_rows(conn, since, None, None, None)).items():
        sig = P._signature_of(t)
        ids = sorted(r["event_id"] for r in P._error_rows(conn, since, None, etype, tool))
        assert P._recent_first(conn, sig, window, etype, tool) == ids[-most:][0]


@pytest.mark.parametrize("damage", [
    "UPDATE selfheal_evidence SET evidence = '{\"kind\": \"bogus\"}'",
    "UPDATE selfheal_evidence SET evidence = '[1, 2]', paths = '{}'",
    "UPDATE selfheal_evidence SET paths = '[{\"nopath\": 1}]'",
    "UPDATE selfheal_evidence SET evidence = 'not json'",
    "UPDATE selfheal_signatures SET value = '[{\"error_type\": \"x\"}]'",
    "UPDATE selfheal_signatures SET value = '[{\"error_type\": \"x\", \"tool_name\": \"y\", \"n\": \"3\", \"runs\": [], "
    "\"first_ts\": 0, \"last_ts\": 0, \"min_id\": 0, \"max_id\": 0, \"sum_ids\": 0, \"correlation\": 0}]'",
    "UPDATE selfheal_signatures SET value = 'null'",
    "UPDATE selfheal_error_kinds SET codes = '{\"errno\": [{}]}'",
    "UPDATE selfheal_error_kinds SET kind = 'bogus'",
    "UPDATE selfheal_error_kinds SET named = 'not json'",
    "UPDATE selfheal_error_kinds SET named = '{\"key\": 1, \"value\": \"/x\", \"type\": \"path\"}'",
    "UPDATE selfheal_followups SET follow = 7",
    "UPDATE selfheal_followups SET args_key = 5, repeat_run = 'x'",
    "DELETE FROM selfheal_followups",
    "UPDATE selfheal_followups SET run_id = x'07', follow = 1 - coalesce(follow, 0)",  # answers of no run
])
def test_stored_rows_of_another_shape_are_read_again_not_used(tmp_path: Path, damage: str) -> None:
    """Our tables live in a file another program writes: a damaged row is a miss, not a crash."""
    db = history(tmp_path / "h.db", tmp_path / "missing")
    conn = connect(db)
    first = detect(conn)
    conn.execute(damage)
    if "error_kinds" in damage or "followups" in damage:
        conn.execute("DELETE FROM selfheal_evidence")
    conn.commit()
    assert detect(conn) == first
