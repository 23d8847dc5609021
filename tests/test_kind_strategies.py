"""The fix follows the failure kind read from the evidence, not the runtime's label:
which strategy answers (precedence), what each kind gets, and retries only where the
history says a retry succeeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from selfheal_plugin import hookimpl
from selfheal_plugin.analysis.patterns import get_pattern
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.lifecycle.proposals import history_window, make_proposal
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import Change, Proposal, Strategy, retry_plan
from selfheal_plugin.service import SelfHeal

from .evidence_data import NOW, Call, Run, enoent_history, spread, write_history


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def _propose(db: Path, pattern_id: str) -> tuple[Any, Proposal]:
    s = load_settings(db.parent, db)
    conn = connect(db)
    try:
        pattern = get_pattern(conn, pattern_id, since="-7d", now=NOW)
        return pattern, make_proposal(pattern, history_window(conn, s, "-7d", now=NOW))
    finally:
        conn.close()


def _config(p: Proposal) -> dict[tuple[str, ...], Any]:
    return {tuple(c.path): c.value for c in p.changes if c.kind == "config"}


def test_enoent_labelled_connection_refused_gets_a_path_check_not_a_restart(tmp_path):
    db = enoent_history(tmp_path / "conversations.db", tmp_path / "gone")
    pattern, p = _propose(db, "connection_refused:mcp__filesystem__read_text_file")
    assert pattern.failure_kind == "missing_resource"
    assert p.strategy == "tool_error" and p.failure_kind == "missing_resource"
    assert _config(p) == {("tools", "mcp__filesystem__read_text_file", "preflight"): ["path_exists"]}
    assert p.risk_level == "medium"  # a preflight refuses calls itself (docs/plugin-tutorial.md)
    assert p.pattern_id == "connection_refused:mcp__filesystem__read_text_file"  # ids stay error_type:tool
    assert p.expected_reduction == 1.0
    assert p.evidence["failure"]["kind"] == "missing_resource"
    assert p.evidence["failure"]["determinism"]["verdict"] == "deterministic"


def test_the_missing_paths_a_person_checks_are_named_whole(tmp_path):
    """The manual step names at most three of the missing paths, each whole (a cut at a
    character count split one), and how many more there are."""
    tool = "mcp__filesystem__read_text_file"
    missing = tmp_path / ("gone-" + "x" * 120)
    runs = []
    for i, start in enumerate(spread(40)):
        path = str(missing / f"notes-{i % 5}.md") if i < 10 else f"/srv/docs/readme-{i}.md"
        ok = i >= 10
        runs.append(Run(start, [Call(tool, {"path": path}, ok,
                                     "# readme" if ok else f"ENOENT: no such file or directory, open '{path}'")]))
    db = write_history(tmp_path / "conversations.db", runs)
    _, p = _propose(db, f"connection_refused:{tool}")
    (step,) = [c.text for c in p.changes if c.kind == "manual"]
    assert sum(str(missing / f"notes-{k}.md") in step for k in range(5)) == 3
    assert step.endswith(f"and 2 more (agent self-heal show connection_refused:{tool})")


def test_deterministic_failures_get_no_retries_and_the_model_says_so(tmp_path):
    db = enoent_history(tmp_path / "conversations.db", tmp_path / "gone")
    s = load_settings(db.parent, db)
    conn = connect(db)
    try:
        pattern = get_pattern(conn, "connection_refused:mcp__filesystem__read_text_file", since="-7d", now=NOW)
        plan = retry_plan(pattern, history_window(conn, s, "-7d", now=NOW))
    finally:
        conn.close()
    assert plan.model == "deterministic" and plan.attempts == 0 and plan.reduction == 0.0
    assert plan.changes(pattern.tool_name) == []


def _upstream(tmp_path: Path, recover: bool) -> Path:
    tool = "mcp__fetch__fetch"
    runs = []
    for i, start in enumerate(spread(40)):
        url = f"http://api.example/{i % 4}"
        if i % 2 == 0:
            calls = [Call(tool, {"url": url}, False, f"Failed to fetch {url} - status code 503"),
                     Call(tool, {"url": url}, recover, "body" if recover else f"Failed to fetch {url} - status code 503")]
        else:
            calls = [Call(tool, {"url": f"http://other/{i}"}, True, "body")]
        runs.append(Run(start, calls))
    return write_history(tmp_path / f"up-{recover}.db", runs)


def test_transient_5xx_retries_sized_from_observed_retry_success(tmp_path):
    pattern, p = _propose(_upstream(tmp_path, recover=True), "tool_error:mcp__fetch__fetch")
    assert pattern.failure_kind == "transient_upstream"
    assert p.strategy == "transport_error"
    assert p.evidence["model"] == "observed" and p.evidence["p_retry_succeeds"] == pytest.approx(21 / 22, abs=1e-4)
    cfg = _config(p)
    assert cfg[("tools", "mcp__fetch__fetch", "retry_attempts")] == 2  # (1/22)^2 <= 1 %, 1/22 is not
    assert p.expected_reduction == pytest.approx(1 - (1 / 22) ** 2, abs=1e-4)
    assert not any(c.kind == "manual" and "protocol" in c.text for c in p.changes)


def test_transient_5xx_that_fails_on_every_repeat_gets_no_retries(tmp_path):
    pattern, p = _propose(_upstream(tmp_path, recover=False), "tool_error:mcp__fetch__fetch")
    assert pattern.failure_kind == "transient_upstream"
    assert pattern.evidence["determinism"]["verdict"] == "deterministic"
    assert _config(p) == {} and p.expected_reduction == 0.0
    assert "retries would not help" in p.expected_impact


def _rate_limited(tmp_path: Path, message: str, recover: bool = False) -> Path:
    tool = "mcp__gitlab__search_repositories"
    runs = []
    for i, start in enumerate(spread(24)):
        if i % 3 == 0:
            calls = [Call(tool, {"search": f"q{i}"}, False, message)]
            if recover:
                calls.append(Call(tool, {"search": f"q{i}"}, True, "[]", ms=20_000))
        else:
            calls = [Call(tool, {"search": f"q{i}"}, True, "[]")]
        runs.append(Run(start, calls))
    return write_history(tmp_path / f"rl-{recover}.db", runs)


def test_rate_limits_back_off_for_the_servers_retry_after(tmp_path):
    db = _rate_limited(tmp_path, "GitLab API error: Too Many Requests (Retry-After: 60)")
    pattern, p = _propose(db, "tool_error:mcp__gitlab__search_repositories")
    assert pattern.failure_kind == "rate_limited" and p.strategy == "rate_limited"
    cfg = _config(p)
    assert cfg[("tools", "mcp__gitlab__search_repositories", "retry_backoff_ms")] == 60_000
    assert cfg[("tools", "mcp__gitlab__search_repositories", "retry_attempts")] == 3
    assert p.evidence["wait_source"] == "the server's Retry-After/reset time"
    assert p.expected_reduction is None and "unknown" in p.expected_impact  # no follow-up calls to learn from


def test_rate_limits_without_a_header_back_off_for_the_observed_recovery(tmp_path):
    db = _rate_limited(tmp_path, "Error executing tool: status code 429", recover=True)
    _, p = _propose(db, "tool_error:mcp__gitlab__search_repositories")
    assert p.strategy == "rate_limited"
    wait = p.evidence["wait_ms"]
    assert 20_000 <= wait <= 20_100  # the 20 s until the next call succeeded
    assert _config(p)[("tools", "mcp__gitlab__search_repositories", "retry_backoff_ms")] == 3_000  # 3+6+12 s >= 20 s
    assert p.expected_reduction == 1.0


def _one_kind(tmp_path: Path, tool: str, message: str, label: str | None = None, name: str = "k.db") -> Path:
    runs = [Run(s, [Call(tool, {"id": f"x{i}"}, i % 2 == 1, "ok" if i % 2 else message, label)])
            for i, s in enumerate(spread(20))]
    return write_history(tmp_path / name, runs)


def test_credentials_get_a_manual_proposal_never_retries(tmp_path):
    db = _one_kind(tmp_path, "mcp__gitlab__get_file_contents", "GitLab API error: Unauthorized")
    pattern, p = _propose(db, "tool_error:mcp__gitlab__get_file_contents")
    assert pattern.failure_kind == "permission" and p.strategy == "permission_denied"
    assert all(c.kind == "manual" for c in p.changes)
    assert any("Renew the credential" in c.text for c in p.changes)
    assert p.expected_reduction is None


def test_invalid_arguments_go_to_a_person_or_the_prompt(tmp_path):
    db = _one_kind(tmp_path, "mcp__time__convert_time",
                   "MCP error -32602: Input validation error: Invalid arguments for tool convert_time")
    pattern, p = _propose(db, "tool_error:mcp__time__convert_time")
    assert pattern.failure_kind == "invalid_arguments" and p.strategy == "tool_error"
    assert all(c.kind == "manual" for c in p.changes) and "Retrying will not help" in p.changes[0].text


@pytest.mark.parametrize("verdict", ["deterministic", "transient", "undetermined"])
def test_what_a_missing_resource_fix_says_follows_the_repeats(tmp_path, verdict):
    """"They do not exist" and "retrying will not help" only when the same arguments failed
    again every time; never when they succeeded later, as `show`'s Repeats line says."""
    tool, message = "execute_command", "Command exited with status 127: command not found"
    calls = {  # per run: the call's arguments and whether it succeeded
        "deterministic": [({"command": "mk"}, False)] * 6,
        "transient": [({"command": "mk"}, i % 2 == 1) for i in range(12)],
        "undetermined": [({"command": f"mk{i}"}, False) for i in range(6)],
    }[verdict]
    runs = [Run(s, [Call(tool, args, ok, "ok" if ok else message, None if ok else "tool_error")])
            for s, (args, ok) in zip(spread(len(calls)), calls)]
    db = write_history(tmp_path / "k.db", runs)
    pattern, p = _propose(db, f"tool_error:{tool}")
    assert pattern.failure_kind == "missing_resource" and pattern.evidence["determinism"]["verdict"] == verdict
    text = p.changes[0].text
    if verdict == "deterministic":
        assert p.description.endswith("they do not exist") and "do not exist (" in text
        assert "Retrying will not help: the same arguments failed again every time (5×)." in text
    else:
        assert "do not exist" not in p.description + text and "Retrying will not help" not in text
        assert p.description.endswith("they were not found when called")
    if verdict == "transient":
        assert "The same arguments succeeded later (6×, failed again 0×): the failures did not last" in text
    if verdict == "undetermined":
        assert "No call repeated the same arguments: whether they appear later is not known." in text


def test_a_closed_connection_labelled_tool_error_gets_health_check_and_restart(tmp_path):
    db = _one_kind(tmp_path, "mcp__everything__echo", "Connection closed")
    pattern, p = _propose(db, "tool_error:mcp__everything__echo")
    assert pattern.failure_kind == "server_down" and p.strategy == "connection_refused"
    cfg = _config(p)
    assert cfg[("servers", "everything", "health_check")] is True and cfg[("servers", "everything", "auto_restart")]


def test_an_unknown_stays_unknown_in_json_test_and_inbox(tmp_path, monkeypatch):
    home = tmp_path / "binks"
    home.mkdir()
    inbox = tmp_path / "inbox"
    monkeypatch.setenv("INBOX_PATH", str(inbox))
    _one_kind(home, "mcp__git__git_status", "Error executing tool git_status: /repo/x", name="conversations.db")
    with SelfHeal(home=home, clock=lambda: NOW) as sh:
        found = sh.detect(propose=True, notify=True)
        [pat] = found["patterns"]
        assert pat["failure_kind"] == "unknown" and pat["evidence"]["kind"] == "unknown"
        [out] = found["proposals"]
        assert out["failure_kind"] == "unknown" and out["expected_reduction"] is None
        assert "unknown" in out["expected_impact"]
        tested = sh.test(out["improvement_id"])
        assert tested["failure_kind"] == "unknown"
        assert tested["simulated_success_rate"] is None  # no model: not a guessed number
    text = "\n".join(p.read_text() for p in inbox.rglob("*") if p.is_file())
    assert "kind unknown" in text


# ---------------------------------------------------------------- precedence


class _ByKind(Strategy):
    name = "third_party_missing"
    kinds = ("missing_resource",)
    summary = "third-party fix for missing resources"

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description="third party", expected_impact="unknown",
                                  risk_level="low", changes=[Change.manual("x")])


class _ByType(_ByKind):
    name = "third_party_refused"
    kinds = ()
    error_types = ("connection_refused",)


class _Plugin:
    def __init__(self, strategy):
        self.strategy = strategy

    @hookimpl
    def register_strategies(self, register):
        register(self.strategy)


def _resolve(kind: str | None, etype: str = "connection_refused") -> str:
    return plugins.resolve_strategy(etype, None, kind)[0].name


def test_precedence_of_kinds_and_error_types():
    assert _resolve("missing_resource") == "tool_error"  # a built-in for the kind beats a wrong label
    assert _resolve("server_down") == "connection_refused"  # the label's strategy lists the kind
    assert _resolve("server_down", "server_crashed") == "server_crashed"
    assert _resolve("server_down", "tool_error") == "connection_refused"  # the later built-in for the kind
    assert _resolve("unknown") == "connection_refused" and _resolve(None) == "connection_refused"
    assert _resolve("missing_resource", "Unknown") == "unknown"  # it delegates by kind itself
    by_type = _Plugin(_ByType())
    plugins.register(by_type, "third-party-type")
    try:  # an existing third-party replacement for a type keeps its patterns
        assert _resolve("missing_resource") == "third_party_refused"
        by_kind = _Plugin(_ByKind())
        plugins.register(by_kind, "third-party-kind")
        try:
            assert _resolve("missing_resource") == "third_party_missing"
            assert _resolve("missing_resource", "timeout") == "third_party_missing"
            assert _resolve("slow_tail", "timeout") == "timeout"
            kinds = {k["kind"]: k["strategy"] for k in plugins.describe()["kind_strategies"]}
            assert kinds["missing_resource"] == "third_party_missing" and kinds["rate_limited"] == "rate_limited"
        finally:
            plugins.unregister(by_kind)
    finally:
        plugins.unregister(by_type)


def test_a_strategy_with_an_unknown_kind_is_refused():
    class Bad(_ByKind):
        name = "bad"
        kinds = ("flaky",)

    assert "unknown failure kind(s) flaky" in plugins._strategy_problem(Bad())
    assert plugins._strategy_problem(_ByKind()) is None  # kinds alone are enough


# ---------------------------------------------------------------- carried by the MCP tools and the dashboard


def test_mcp_tools_and_the_dashboard_carry_the_kind_and_its_evidence(tmp_path):
    import anyio
    from mcp import Client

    from selfheal_plugin.mcp.server import build_server

    home = tmp_path / "binks"
    home.mkdir()
    enoent_history(home / "conversations.db", tmp_path / "gone")
    (home / "config.toml").write_text('[self_heal]\nlookback = "2026-11-13T12:00:00Z"\n')

    async def go():
        async with Client(build_server(home)) as client:
            found = await client.call_tool("detect_failure_patterns", {})
            proposed = await client.call_tool("propose_improvement", {
                "pattern_id": "connection_refused:mcp__filesystem__read_text_file"})
            return found, proposed

    found, proposed = anyio.run(go)
    assert not found.is_error and not proposed.is_error
    [pattern] = found.structured_content["patterns"]
    assert pattern["failure_kind"] == "missing_resource"
    assert pattern["evidence"]["codes"]["errno"] == {"ENOENT": 16}
    out = proposed.structured_content
    assert out["failure_kind"] == "missing_resource" and out["strategy"] == "tool_error"
    with SelfHeal(home=home, clock=lambda: NOW) as sh:
        [imp] = sh.dashboard()["recent_improvements"]
    assert imp["failure_kind"] == "missing_resource"
    assert imp["kind_evidence"].startswith("missing_resource (runtime label connection_refused; ENOENT")


def test_timeouts_cut_below_the_limit_in_force_now_are_covered_by_it(tmp_path):
    """A window that spans the change that raised a tool's limit: its timeouts stopped at the
    old 20 s, config.toml says 40 s now and the calls' p99 fits under it. The fix is in force
    already; a retry 'because the timeouts look like hangs' (the p99 under the current limit)
    would be the wrong conclusion."""
    import random

    tool = "mcp__search__web_search"
    rng = random.Random(7)
    runs = []
    for i, start in enumerate(spread(120)):
        if i < 6:  # before the change: cut at the old limit
            call = Call(tool, {"q": f"q{i}"}, False, f"Tool {tool} timed out after 20s", "timeout", 20_000)
        else:  # after it, the long calls finish
            call = Call(tool, {"q": f"q{i}"}, True, "ok", ms=rng.uniform(3_000, 10_000) if i % 10 else
                        rng.uniform(20_000, 30_000))
        runs.append(Run(start, [call]))
    db = write_history(tmp_path / "conversations.db", runs)
    (tmp_path / "config.toml").write_text(f'[tools."{tool}"]\ntimeout_ms = 40000\n')
    _, p = _propose(db, f"timeout:{tool}")
    assert p.evidence["p99_ms"] <= 42_000  # the model's p99 fits under today's limit
    assert p.description.startswith(f"Keep the timeout of {tool} at 40 s") and "cut at 20 s" in p.description
    assert _config(p) == {} and [c.kind for c in p.changes] == ["manual"]
