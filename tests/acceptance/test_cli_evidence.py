"""Fixes from evidence, through the installed `agent`: the filesystem server's ENOENT errors,
labelled `connection_refused` by the runtime, get a path_exists preflight, not a restart."""
import json
import re
import tomllib
from pathlib import Path

from ..conftest import run_agent
from ..evidence_data import enoent_history

SINCE = "2026-11-13T12:00:00Z"  # the history ends at evidence_data.NOW
PATTERN = "connection_refused:mcp__filesystem__read_text_file"
TOOL = "mcp__filesystem__read_text_file"
ROOT = Path(__file__).resolve().parents[2]


def test_enoent_labelled_connection_refused_gets_a_preflight_not_a_restart(binks_home, tmp_path):
    enoent_history(binks_home / "conversations.db", tmp_path / "gone")
    home = ["--home", str(binks_home), "--since", SINCE]

    res = run_agent("self-heal", "detect", *home, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    [pattern] = [p for p in out["patterns"] if p["id"] == PATTERN]  # the id keeps the runtime's label
    assert pattern["failure_kind"] == "missing_resource"
    ev = pattern["evidence"]
    assert ev["runtime_label"] == "connection_refused" and ev["codes"]["errno"] == {"ENOENT": 16}
    assert ev["determinism"]["verdict"] == "deterministic"
    assert all(p["exists_now"] is False for p in ev["paths"])
    [proposal] = [p for p in out["proposals"] if p["pattern_id"] == PATTERN]
    assert proposal["strategy"] == "tool_error" and proposal["failure_kind"] == "missing_resource"
    paths = [c["path"] for c in proposal["changes"] if c["kind"] == "config"]
    assert paths == [["tools", TOOL, "preflight"]]  # no health check, restart or retries
    assert pattern["suggested_fix"] == proposal["description"]

    detected = run_agent("self-heal", "detect", *home)
    assert "    Failure kind: missing_resource (runtime label connection_refused; ENOENT ×16; deterministic)" \
        in detected.stdout

    text = run_agent("self-heal", "show", PATTERN, *home)
    assert text.returncode == 0, text.stderr
    assert "Failure kind: missing_resource (runtime label connection_refused; ENOENT ×16; deterministic)" \
        in text.stdout
    assert "does not exist now" in text.stdout

    imp = proposal["improvement_id"]
    tested = json.loads(run_agent("self-heal", "test", imp, "--home", str(binks_home), "--json").stdout)
    assert tested["failure_kind"] == "missing_resource"
    applied = run_agent("self-heal", "apply", imp, "--yes", "--home", str(binks_home), "--json")
    assert applied.returncode == 0, applied.stderr
    config = tomllib.loads((binks_home / "config.toml").read_text())
    assert config["tools"][TOOL]["preflight"] == ["path_exists"]
    assert "servers" not in config


def test_plugins_lists_the_strategy_for_each_failure_kind(binks_home, tmp_path):
    enoent_history(binks_home / "conversations.db", tmp_path / "gone")
    res = run_agent("self-heal", "plugins", "--home", str(binks_home), "--json")
    assert res.returncode == 0, res.stderr
    kinds = {k["kind"]: k["strategy"] for k in json.loads(res.stdout)["kind_strategies"]}
    assert kinds == {"missing_resource": "tool_error", "invalid_arguments": "tool_error",
                     "permission": "permission_denied", "rate_limited": "rate_limited",
                     "transient_upstream": "transport_error", "slow_tail": "timeout", "hang": "timeout",
                     "server_down": "connection_refused"}
    text = run_agent("self-heal", "plugins", "--home", str(binks_home))
    assert "Strategy for each failure kind" in text.stdout and "rate_limited" in text.stdout
    # the pointer names the page that has the section (not the README, which has none)
    where = re.search(r"Strategy for each failure kind \(see ([\w/.]+): ([^)]+)\)", text.stdout)
    assert where, text.stdout
    assert f"**{where.group(2)}.**" in (ROOT / where.group(1)).read_text()
