"""``agent self-heal demo``: the whole loop through the installed command."""
from __future__ import annotations

import json
import subprocess
import tomllib

import pytest

from ..conftest import run_agent

pytestmark = pytest.mark.closed_loop


def _text_at_80_columns(result: dict, monkeypatch, capsys) -> str:
    """The demo's text for the steps of its --json result, as a terminal of 80 columns shows them:
    each line fits, and each id (improvement, pattern, experiment) is whole on one line."""
    import re

    from rich.cells import cell_len

    from selfheal_plugin.cli.demo import print_step
    from selfheal_plugin.testbed.demo import DemoStep

    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    for step in result["steps"]:
        data = {k: v for k, v in step.items() if k not in ("name", "title", "seconds")}
        print_step(DemoStep(step["name"], step["title"], data, step["seconds"]))
    text = capsys.readouterr().out
    assert not [line for line in text.splitlines() if cell_len(line) > 80], text
    ids = set(re.findall(r"(?:imp|ab)-\d{8}-[0-9a-f]{8}", json.dumps(result)))
    assert ids and all(re.search(rf"(?<![\w-]){i}(?![\w-])", text) for i in ids), text
    patterns = {p["id"] for s in result["steps"] if s["name"] == "detect" for p in s["patterns"]}
    assert patterns and all(re.search(rf"^ +{re.escape(p)}: ", text, re.M) for p in patterns), text
    return text


def test_the_demo_runs_every_step_and_keeps_its_home(tmp_path, monkeypatch, capsys):
    home = tmp_path / "demo"
    r = run_agent("self-heal", "demo", "--dir", str(home), "--json", timeout=300)  # --dir alone keeps it (issue 15)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    steps = {s["name"]: s for s in d["steps"]}
    assert list(steps) == ["home", "workload_before", "detect", "propose", "test", "apply", "workload_after",
                           "verify", "dashboard"]
    assert d["kept"] and d["home"] == str(home) and (home / "config.toml").exists()
    assert steps["workload_before"]["runs"] == steps["workload_after"]["runs"] == 200
    assert any(p["id"].startswith("timeout:") for p in steps["detect"]["patterns"])
    chosen = steps["test"]["chosen"]
    assert chosen and steps["apply"]["improvement_id"] == chosen
    sha = steps["apply"]["commit_sha"]
    # the commit is real, in the demo home's own repository, and holds the fix
    shown = subprocess.run(["git", "show", "--stat", "--format=%B", sha], cwd=home, capture_output=True, text=True)
    assert shown.returncode == 0 and f"Self-Heal-Improvement: {chosen}" in shown.stdout
    assert "timeout_ms" in (home / "config.toml").read_text()
    v = steps["verify"]
    assert v["recommendation"] == "keep" and v["status"] == "verified"
    assert v["metrics"]["pattern"]["p_value"] < 0.05
    assert steps["apply"]["applied_at"][:16] == steps["home"]["timeline"]["apply"][:16]
    assert steps["dashboard"]["recent_improvements"][0]["id"] == chosen or any(
        i["id"] == chosen for i in steps["dashboard"]["recent_improvements"])
    # the user's inbox was left alone; the demo's own inbox got the notifications
    assert list((home / "inbox").glob("*.md"))
    assert "Recommendation: keep" in _text_at_80_columns(d, monkeypatch, capsys)


def test_a_non_empty_dir_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    r = run_agent("self-heal", "demo", "--dir", str(target))
    assert r.returncode == 2 and "must be a new or empty directory" in r.stderr
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("before", [["--home", "H"], ["--db", "H/x.db"], ["--json"]])
def test_options_before_demo_are_refused_not_ignored(tmp_path, before):
    """``--home``/``--db``/``--json`` before ``demo`` never reached it: the demo ran in a home of
    its own, in text. Now one line, exit 2, and nothing made."""
    args = [a.replace("H", str(tmp_path / "h")) for a in before]
    r = run_agent("self-heal", *args, "demo", "--dir", str(tmp_path / "demo"))
    assert r.returncode == 2 and r.stdout == ""
    assert f"{before[0]} before demo does not reach it" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / "h").exists()


def test_the_second_act_keeps_a_rule_runs_an_ab_experiment_and_promotes_its_winner(tmp_path, monkeypatch, capsys):
    home = tmp_path / "demo2"
    r = run_agent("self-heal", "demo", "--second-act", "--dir", str(home), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    _text_at_80_columns(result, monkeypatch, capsys)
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == ["home", "workload_before", "detect", "propose", "test", "apply", "workload_after",
                           "verify", "rules", "workload_week3", "detect_week3", "ab_start", "workload_week4",
                           "ab_status", "ab_promote", "dashboard"]
    chosen = steps["test"]["chosen"]
    assert steps["verify"]["recommendation"] == "keep"
    # learning from success: act 1's verified fix is a rule, measured here
    (rule,) = steps["rules"]["rules"]
    assert rule["sources"] == ["verified"] and rule["worked"] == 1 and rule["enabled"]
    assert rule["template"][0]["path"] == ["tools", "{tool}", "timeout_ms"]
    # ... and the prior of week 3's new pattern, the slow status service's timeouts
    proposal = steps["detect_week3"]["proposal"]
    assert steps["detect_week3"]["pattern_id"] == "timeout:mcp__flaky__query_status"
    assert proposal["expected_impact"].endswith(f"a learned rule {rule['summary']}")
    # the experiment: the strategy's two candidates beside a control, a real commit
    started = steps["ab_start"]
    arms = {a["improvement_id"]: a for a in started["arms"]}
    assert len(arms) == 2 and proposal["improvement_id"] in arms
    section = subprocess.run(["git", "show", started["start_sha"]], cwd=home, capture_output=True, text=True).stdout
    assert f'+[ab.{started["experiment_id"]}]' in section
    # the judge: the raised limit wins (about a third of the control's calls time out, the
    # raised limit lets nearly all finish: a margin no run-to-arm assignment can erase)
    verdict = steps["ab_status"]["verdict"]
    assert verdict["verdict"] == "winner" and verdict["winner"] == proposal["improvement_id"]
    assert "timeout" in arms[verdict["winner"]]["description"].lower()
    promoted = steps["ab_promote"]
    assert promoted["status"] == "promoted" and promoted["applied"]["improvement_id"] == verdict["winner"]
    log = subprocess.run(["git", "log", "--format=%s"], cwd=home, capture_output=True, text=True).stdout
    assert log.splitlines()[0].startswith("selfheal: Increase the timeout of mcp__flaky__query_status")
    config = tomllib.loads((home / "config.toml").read_text())
    assert "timeout_ms" in config["tools"]["mcp__flaky__query_status"] and "ab" not in config
    improvements = run_agent("self-heal", "--home", str(home), "improvements", "--json")
    statuses = {i["id"]: i["status"] for i in json.loads(improvements.stdout)["improvements"]}
    assert statuses[chosen] == "verified" and statuses[verdict["winner"]] == "applied"
    assert [statuses[a] for a in arms if a != verdict["winner"]] == ["ab_lost"]
