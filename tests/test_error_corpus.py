"""The corpus of real MCP servers' error messages (tests/data/mcp_error_corpus.jsonl) is
well-formed: every line parses, has its fields, uses the allowed kinds, stores the runtime's
own label for its message, comes from at least four real server packages, leaks no path of
the machine it was collected on, and tests/data/README.md quotes its current baseline."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from selfheal_plugin.history.connection import classify_error

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "mcp_error_corpus.jsonl"
SCRIPT = Path(__file__).parent.parent / "benchmarks" / "collect_error_corpus.py"

KINDS = {"missing_resource", "permission", "rate_limited", "transient_upstream", "slow_tail", "hang",
         "server_down", "invalid_arguments", "unknown"}
CHANNELS = {"result", "jsonrpc_error", "exception", "connect"}
FIELDS: dict[str, type] = {
    "id": str, "server": str, "tool": str, "runtime_tool": str, "arguments": dict, "provoked": str,
    "channel": str, "message": str, "is_error": bool, "label": str, "expected_kind": str,
}
OPTIONAL: dict[str, type] = {"note": str, "server_stderr": str, "sdk": str}
# package@version, npm scoped or not: "@modelcontextprotocol/server-memory@2026.8.31", "mcp-server-git@2026.10.19"
PACKAGE = re.compile(r"^(@[a-z0-9][\w.-]*/)?[a-z0-9][\w.-]*@\d[\w.+-]*$")
# Where a collecting machine's own paths would show; /tmp/corpus and /opt/mcp-servers are the placeholders.
MACHINE_PATH = re.compile(r"/work/|/root\b|/home/|/usr/|site-packages|/tmp/(?!corpus(?:[/'\"\s]|$))")


def problems(row: Any) -> list[str]:
    """What is wrong with one corpus line (empty when nothing is)."""
    if not isinstance(row, dict):
        return ["not a JSON object"]
    out = [f"field {k!r} missing or not {t.__name__}" for k, t in FIELDS.items() if not isinstance(row.get(k), t)]
    out += [f"field {k!r} not {t.__name__}" for k, t in OPTIONAL.items() if k in row and not isinstance(row[k], t)]
    out += [f"unexpected field {k!r}" for k in row if k not in FIELDS and k not in OPTIONAL]
    if out:
        return out
    if row["expected_kind"] not in KINDS:
        out.append(f"kind {row['expected_kind']!r} not one of {sorted(KINDS)}")
    if row["channel"] not in CHANNELS:
        out.append(f"channel {row['channel']!r} not one of {sorted(CHANNELS)}")
    if row["label"] != classify_error(row["message"]):
        out.append(f"label {row['label']!r} is not classify_error(message) = {classify_error(row['message'])!r}")
    if row["channel"] != "result" and not row["is_error"]:
        out.append("a call that raised must be is_error")
    if not row["message"].strip() and row["channel"] != "result":
        out.append("empty message from a raised error")
    if not row["runtime_tool"].startswith("mcp__") or not row["runtime_tool"].endswith(f"__{row['tool']}"):
        out.append(f"runtime_tool {row['runtime_tool']!r} is not mcp__<server>__{row['tool']}")
    text = json.dumps([row["message"], row["arguments"], row.get("server_stderr", "")])
    if MACHINE_PATH.search(text):
        out.append(f"a path of the collecting machine: {MACHINE_PATH.search(text).group(0)!r}")
    return out


def load() -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(CORPUS.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"line {n} is empty"
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            pytest.fail(f"line {n} does not parse: {exc}")
    return rows


def real_servers(rows: list[dict[str, Any]]) -> set[str]:
    return {r["server"] for r in rows if PACKAGE.match(r["server"])}


def test_every_line_is_a_well_formed_case():
    rows = load()
    bad = {r.get("id", n) if isinstance(r, dict) else n: p for n, r in enumerate(rows, 1) if (p := problems(r))}
    assert not bad, bad


def test_ids_are_unique():
    ids = [r["id"] for r in load()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_at_least_forty_cases_from_at_least_four_real_servers():
    rows = load()
    assert len(rows) >= 40
    servers = real_servers(rows)
    assert len(servers) >= 4, servers
    # ... and not one server's dozens: at least four servers give at least three cases each.
    per = {s: sum(r["server"] == s for r in rows) for s in servers}
    assert sum(n >= 3 for n in per.values()) >= 4, per


def test_every_kind_but_unknown_has_a_real_case():
    kinds = {r["expected_kind"] for r in load()}
    assert KINDS - {"unknown"} <= kinds, sorted(KINDS - kinds)


@pytest.mark.parametrize("change, complaint", [
    ({"label": "timeout"}, "is not classify_error"),
    ({"expected_kind": "flaky"}, "not one of"),
    ({"is_error": "yes"}, "'is_error' missing or not bool"),
    ({"message": "ENOENT: no such file or directory, open '/root/notes.md'"}, "a path of the collecting machine"),
    ({"message": "failed: /tmp/corpus-x1y2/files/a.txt"}, "a path of the collecting machine"),
    ({"runtime_tool": "read_text_file"}, "runtime_tool"),
    ({"channel": "jsonrpc_error", "is_error": False}, "must be is_error"),
    ({"colour": "red"}, "unexpected field"),
])
def test_the_checks_catch_a_broken_line(change, complaint):
    good = load()[0]
    assert problems(good) == []
    broken = {**good, **change}
    if "message" in change and "label" not in change:
        broken["label"] = classify_error(broken["message"])
    assert any(complaint in p for p in problems(broken)), problems(broken)


def test_the_placeholder_paths_are_not_flagged():
    good = load()[0]
    for message in ("ENOENT: no such file or directory, open '/tmp/corpus/files/a.md'",
                    "Cannot find module '/opt/mcp-servers/node_modules/x/dist/main.js'", "/tmp/corpus"):
        row = {**good, "message": message, "label": classify_error(message)}
        assert problems(row) == [], message


def load_script() -> Any:
    """benchmarks/collect_error_corpus.py as a module (its report, not its collection)."""
    spec = importlib.util.spec_from_file_location("collect_error_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_readme_quotes_the_corpus_baseline():
    module = load_script()
    assert set(module.KINDS) == KINDS
    rows = load()
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    table = module.report(rows)
    assert table in readme, table
    assert f"{len(rows)} failed tool calls" in readme
    for server in real_servers(rows):
        count = sum(r["server"] == server for r in rows)
        assert re.search(rf"`{re.escape(server)}`[^|]*\| {count} \|", readme), (server, count)


def test_reading_the_baseline_leaves_no_top_level_plugin_modules():
    """The report reads tool_error's sorting without making strategies/ a top-level module
    (test_plugins checks the engine never does; this test module must not either)."""
    load_script().report(load())
    assert "strategies" not in sys.modules and "strategies.tool_error" not in sys.modules
