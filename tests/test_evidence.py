"""Evidence per pattern and the failure kind read from it (selfheal_plugin.analysis.evidence):
codes and phrases in messages, the real MCP error corpus (accuracy per kind, quoted in the
README), and the history-based parts (arguments, paths, repeats, server streaks, timeouts)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from selfheal_plugin.analysis.evidence import (
    gather,
    message_codes,
    message_kind,
    named_argument,
)
from selfheal_plugin.analysis.patterns import detect_failure_patterns, get_pattern
from selfheal_plugin.history.connection import connect

from .evidence_data import NOW, Call, Run, enoent_history, spread, write_history

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "mcp_error_corpus.jsonl"
README = ROOT / "README.md"
ORDER = ("missing_resource", "permission", "rate_limited", "transient_upstream", "slow_tail", "hang", "server_down",
         "invalid_arguments", "unknown")


def corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy_table(rows: list[dict]) -> str:
    """Per expected kind: cases, how many the message (and the runtime's label) alone is
    read as that kind, and what the rest were read as."""
    cases: Counter = Counter()
    right: Counter = Counter()
    wrong: dict[str, Counter] = {}
    for r in rows:
        kind, _ = message_kind(r["message"], r["label"])
        cases[r["expected_kind"]] += 1
        if kind == r["expected_kind"]:
            right[kind] += 1
        else:
            wrong.setdefault(r["expected_kind"], Counter())[kind] += 1
    lines = ["| expected kind | cases | read right | read as instead |", "| --- | ---: | ---: | --- |"]
    for k in ORDER:
        if cases[k]:
            instead = ", ".join(f"{w} {c}" for w, c in sorted(wrong.get(k, Counter()).items()))
            lines.append(f"| {k} | {cases[k]} | {right[k]} | {instead} |")
    total = sum(cases.values())
    lines.append(f"| all | {total} | {sum(right.values())} ({sum(right.values()) / total:.0%}) | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the corpus


def test_the_kinds_read_from_real_messages_are_mostly_right():
    rows = corpus()
    got = {r["id"]: message_kind(r["message"], r["label"])[0] for r in rows}
    per_kind = Counter(r["expected_kind"] for r in rows)
    right = Counter(r["expected_kind"] for r in rows if got[r["id"]] == r["expected_kind"])
    # every kind a message can show is read right at least 90 % of the time ...
    for kind in ORDER:
        if kind == "hang":
            continue  # a single "timed out" cannot tell a hang from a slow tail: history decides (below)
        assert right[kind] >= 0.9 * per_kind[kind], (kind, right[kind], per_kind[kind])
    # ... and where the runtime's label misroutes, the kind does not
    enoent = [r for r in rows if r["message"].startswith("ENOENT") and r["label"] == "connection_refused"]
    assert enoent and all(got[r["id"]] == "missing_resource" for r in enoent)
    assert all(got[r["id"]] == "rate_limited" for r in rows if r["expected_kind"] == "rate_limited")


def test_the_readme_quotes_the_accuracy_table():
    table = accuracy_table(corpus())
    assert table in README.read_text(encoding="utf-8"), "\n" + table


# ---------------------------------------------------------------- codes and phrases


@pytest.mark.parametrize("message, field, value", [
    ("ENOENT: no such file or directory, open '/x/a.md'", "errno", ["ENOENT"]),
    ("connect ECONNREFUSED 127.0.0.1:5432", "errno", ["ECONNREFUSED"]),
    ("[Errno 13] Permission denied: '/etc/shadow'", "errno", ["EACCES"]),
    ("[Errno 110] Connection timed out", "errno", ["ETIMEDOUT"]),
    ("Failed to fetch http://h/x - status code 503", "http_status", [503]),
    ("GitLab API error: Too Many Requests", "http_status", [429]),
    ("HTTP/1.1 401 Unauthorized", "http_status", [401]),
    ("Command exited with status 127: command not found", "http_status", []),  # an exit status is no HTTP status
    ("MCP error -32602: Input validation error", "jsonrpc", [-32602]),
    ("MCP error -32603: Internal error", "jsonrpc", [-32603]),
    ("429 Too Many Requests. Retry-After: 60", "retry_after_s", 60.0),
    ("rate limited, try again in 1500ms", "retry_after_s", 1.5),
    ("quota exceeded; rate limit resets at 2026-11-20T12:00:00Z", "reset_at", 1795176000.0),
])
def test_codes_in_messages(message, field, value):
    assert message_codes(message)[field] == value


@pytest.mark.parametrize("message, label, kind", [
    ("ENOENT: no such file or directory, stat '/data/x'", "connection_refused", "missing_resource"),
    ("Failed to fetch https://a/b - status code 404", "tool_error", "missing_resource"),
    ("EACCES: permission denied, open '/x'", "tool_error", "permission"),
    ("Request failed with status code 401", "tool_error", "permission"),
    ("API key is missing", "tool_error", "permission"),
    ("Error: 429 Too Many Requests", "tool_error", "rate_limited"),
    ("You have exceeded your rate limit", "tool_error", "rate_limited"),
    ("upstream returned HTTP 502 Bad Gateway", "tool_error", "transient_upstream"),
    ("connect ECONNRESET 10.0.0.1:443", "server_crashed", "transient_upstream"),
    ("MCP error -32602: Invalid params", "tool_error", "invalid_arguments"),
    ("Unknown tool: frobnicate", "tool_error", "invalid_arguments"),
    ("Connection closed", "tool_error", "server_down"),
    ("spawn mcp-server-x ENOENT", "connection_refused", "server_down"),
    ("Request 'tools/call' timed out", "timeout", "slow_tail"),
    ("Additional properties are not allowed ('colour' was unexpected)", "tool_error", "invalid_arguments"),
    ("Additional property colour is not allowed", "tool_error", "invalid_arguments"),
    ("Error: Cannot find module '/opt/servers/dist/index.js'", "tool_error", "server_down"),
    ("EROFS: read-only file system, open '/data/x'", "tool_error", "permission"),
    ("something odd happened", "timeout", "slow_tail"),  # the label, when the message says nothing
    ("something odd happened", "tool_error", "unknown"),  # tool_error says nothing either: an honest unknown
])
def test_kind_of_a_message(message, label, kind):
    assert message_kind(message, label)[0] == kind


@pytest.mark.parametrize("message, kind", [
    ("PERMISSION DENIED for /x", "permission"), ("Too Many Requests", "rate_limited"),
    ("Deadline Exceeded", "slow_tail"), ("Spawn MCP-Server-X ENOENT", "server_down"),
    ("Invalid Arguments: Field Required", "invalid_arguments"), ("Bad Gateway", "transient_upstream"),
])
def test_the_phrase_rules_read_any_case(message, kind):
    # the rules are written in lower case and read the lowercased message
    assert message_kind(message, "tool_error")[0] == kind


def test_the_argument_a_message_names():
    assert named_argument("ENOENT: no such file or directory, open '/srv/a.md'", {"path": "/srv/a.md"}) == \
        {"key": "path", "value": "/srv/a.md", "type": "path"}
    assert named_argument("Failed to fetch http://h/x - status code 404", {"url": "http://h/x"})["type"] == "url"
    assert named_argument("Entity with name Apollo not found",
                          {"observations": [{"entityName": "Apollo"}]})["key"] == "observations[0].entityName"
    assert named_argument("Project not found", {"project_id": "acme/app"}) is None


# ---------------------------------------------------------------- from the history


def _pattern(db: Path, pattern_id: str):
    conn = connect(db)
    try:
        return get_pattern(conn, pattern_id, since="-7d", now=NOW)
    finally:
        conn.close()


def test_enoent_labelled_connection_refused_is_a_missing_path_that_fails_every_time(tmp_path):
    db = enoent_history(tmp_path / "c.db", tmp_path / "gone")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "notes-0.md").write_text("now it exists")
    p = _pattern(db, "connection_refused:mcp__filesystem__read_text_file")
    ev = p.evidence
    assert p.failure_kind == ev["kind"] == "missing_resource"
    assert ev["runtime_label"] == "connection_refused" and ev["codes"]["errno"] == {"ENOENT": 16}
    assert ev["named_arguments"] == {"path": 16} and ev["path_occurrences"] == 16
    exists = {Path(x["path"]).name: x["exists_now"] for x in ev["paths"]}
    assert exists == {"notes-0.md": True, "notes-1.md": False, "notes-2.md": False}
    det = ev["determinism"]
    assert det["verdict"] == "deterministic" and det["same_args_succeeded_later"] == 0
    assert det["retried_in_run"] == 8 and det["retry_succeeded_in_run"] == 0
    assert "ENOENT" in ev["summary"] and "deterministic" in ev["summary"]


def test_a_retry_that_succeeds_makes_upstream_errors_transient(tmp_path):
    tool = "mcp__fetch__fetch"
    runs = []
    for i, start in enumerate(spread(30)):
        url = f"http://api/{i}"
        calls = [Call(tool, {"url": url}, False, f"Failed to fetch {url} - status code 503"),
                 Call(tool, {"url": url}, True, "body")] if i % 2 == 0 else [Call(tool, {"url": url}, True, "body")]
        runs.append(Run(start, calls))
    db = write_history(tmp_path / "t.db", runs)
    p = _pattern(db, "tool_error:" + tool)
    assert p.failure_kind == "transient_upstream"
    assert p.evidence["codes"]["http_status"] == {"503": 15}
    det = p.evidence["determinism"]
    assert det["verdict"] == "transient" and det["retry_succeeded_in_run"] == det["retried_in_run"] == 15


def test_all_tools_of_a_server_failing_together_is_the_server_down(tmp_path):
    runs = []
    for i, start in enumerate(spread(20)):
        if i % 4 == 0:  # the database behind the server refuses: every tool of it fails in that run
            msg = "connect ECONNREFUSED 127.0.0.1:5432"
            calls = [Call("mcp__pg__query", {"sql": "select 1"}, False, msg),
                     Call("mcp__pg__list_tables", {}, False, msg), Call("mcp__pg__describe", {"t": "a"}, False, msg)]
        else:
            calls = [Call("mcp__pg__query", {"sql": "select 1"}, True, "1")]
        runs.append(Run(start, calls))
    db = write_history(tmp_path / "s.db", runs)
    p = _pattern(db, "tool_error:mcp__pg__query")
    assert p.evidence["kind_votes"] == {"transient_upstream": 5}  # each message alone reads as upstream
    assert p.evidence["server"]["other_tools_failing"] == 2 and p.evidence["server"]["streak_share"] == 1.0
    assert p.failure_kind == "server_down"


def _timeouts(tmp_path: Path, ok_ms: float) -> Path:
    tool = "mcp__web__get"
    runs = []
    for i, start in enumerate(spread(40)):
        ok = i % 5 != 0
        runs.append(Run(start, [Call(tool, {"url": f"http://w/{i}"}, ok, "page" if ok else
                                     "Request 'tools/call' timed out", ms=ok_ms if ok else 30_000)]))
    return write_history(tmp_path / f"t{ok_ms:.0f}.db", runs)


def test_timeouts_are_a_hang_when_no_call_comes_close_and_a_slow_tail_when_some_do(tmp_path):
    hang = _pattern(_timeouts(tmp_path, 200), "timeout:mcp__web__get")
    assert hang.failure_kind == "hang" and hang.evidence["durations"]["successes_near_limit"] == 0
    slow = _pattern(_timeouts(tmp_path, 25_000), "timeout:mcp__web__get")
    assert slow.failure_kind == "slow_tail" and slow.evidence["durations"]["successes_near_limit"] == 32
    runs = [Run(s, [Call("mcp__web__stuck", {}, False, "Request 'tools/call' timed out", ms=30_000)])
            for s in spread(5)]
    never = _pattern(write_history(tmp_path / "never.db", runs), "timeout:mcp__web__stuck")
    assert never.failure_kind == "hang" and never.evidence["durations"]["successes"] == 0


def test_rate_limits_carry_retry_after_and_spacing(tmp_path):
    tool = "mcp__gh__search"
    runs = [Run(s, [Call(tool, {"q": "x"}, False, "HTTP 429 Too Many Requests; Retry-After: 30")]) for s in spread(6)]
    db = write_history(tmp_path / "r.db", runs)
    p = _pattern(db, "tool_error:" + tool)
    assert p.failure_kind == "rate_limited" and p.evidence["retry_after_s"] == 30.0
    assert p.evidence["spacing_s"]["median"] > 0


def test_detect_and_gather_agree_and_an_empty_pattern_is_unknown(tmp_path):
    db = enoent_history(tmp_path / "c.db", tmp_path / "gone")
    conn = connect(db)
    try:
        found = detect_failure_patterns(conn, since="-7d", now=NOW, confidence_threshold=0.0)
        d = found.patterns[0].to_dict()
        assert d["failure_kind"] == "missing_resource" and d["evidence"]["kind"] == "missing_resource"
        assert gather(conn, "x", "tool_error", [])["kind"] == "unknown"
    finally:
        conn.close()


def test_no_rule_names_a_server_or_a_corpus_message():
    """The rules are codes and phrases: no server package, tool or host of the corpus."""
    source = (ROOT / "selfheal_plugin" / "analysis" / "evidence.py").read_text(encoding="utf-8")
    for r in corpus():
        package = re.sub(r"@[\d.]+$", "", r["server"]).rsplit("/", 1)[-1]
        assert package not in source, package
    for needle in ("gitlab", "robots", "127.0.0.1", "/tmp/corpus", "zod"):
        assert needle not in source.lower(), needle


def _path_only_history(db: Path, repo: Path) -> Path:
    """mcp-server-git's real message for a repo_path it cannot open: only the path
    (``Error executing tool git_log: /srv/x``, tests/data/mcp_error_corpus.jsonl)."""
    tool = "mcp__git__git_log"
    runs = []
    for i, start in enumerate(spread(24)):
        if i % 2:
            runs.append(Run(start, [Call(tool, {"repo_path": str(repo)}, False,
                                         f"Error executing tool git_log: {repo}")]))
        else:
            runs.append(Run(start, [Call(tool, {"repo_path": "/srv/ok"}, True, "Commit history: ...")]))
    return write_history(db, runs)


def test_a_message_that_is_only_a_missing_path_argument_is_a_missing_resource(tmp_path):
    db = _path_only_history(tmp_path / "c.db", tmp_path / "nowhere")
    p = _pattern(db, "tool_error:mcp__git__git_log")
    assert message_kind(f"Error executing tool git_log: {tmp_path / 'nowhere'}", "tool_error")[0] == "unknown"
    assert p.failure_kind == "missing_resource"
    assert p.evidence["paths"][0]["argument"] == "repo_path" and p.evidence["paths"][0]["exists_now"] is False
    assert any("does not exist now" in r for r in p.evidence["reasons"])


def test_a_message_that_is_only_a_path_that_exists_stays_unknown(tmp_path):
    (tmp_path / "plain").mkdir()  # a folder that is there but not a repository: the message cannot say why
    db = _path_only_history(tmp_path / "c.db", tmp_path / "plain")
    assert _pattern(db, "tool_error:mcp__git__git_log").failure_kind == "unknown"
