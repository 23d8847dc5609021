"""``agent self-heal demo``: the whole loop through the installed command."""
from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import run_agent

pytestmark = pytest.mark.closed_loop


def test_the_demo_runs_every_step_and_keeps_its_home(tmp_path):
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


def test_a_non_empty_dir_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    r = run_agent("self-heal", "demo", "--dir", str(target))
    assert r.returncode == 2 and "must be a new or empty directory" in r.stderr
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
