"""`test`'s prediction interval: what the next window of as many runs will show with the
change. It must be wider than the replayed window's interval and cover the next window
about 95 % of the time (a few seeds here; benchmarks/bench_prediction.py runs 100), on a
single-tool process and on the closed loop's testbed as a process."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typing import Any

from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.simulation import test_improvement

from .conftest import NOW
from .lifecycle_data import add_improvement, settings_for, timeout_change, timeout_history

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_prediction.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_prediction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("process", ["k8s", "testbed"])
def test_the_next_window_falls_inside_the_prediction_interval(process):
    c = load_bench().coverage(range(16), 150, process)
    assert c["prediction_coverage"] >= 14 / 16, c
    # the replay's own interval is for the window replayed, not the next one: narrower
    assert c["mean_prediction_width"] > 1.3 * c["mean_confidence_width"], c


def test_the_test_result_carries_the_prediction_interval(binks_home):
    db = binks_home / "conversations.db"
    timeout_history(db, NOW, runs=200)
    imp = add_improvement(db, [timeout_change(90_000)])
    conn_settings = settings_for(binks_home)
    conn = connect(db)
    try:
        r = test_improvement(conn, conn_settings, imp.id, now=NOW)
    finally:
        conn.close()
    lo, hi = r["interval"]["next_window_success_rate"]
    clo, chi = r["interval"]["simulated_success_rate"]
    assert r["interval"]["next_window_runs"] == r["runs_replayed"] > 0
    assert lo <= r["simulated_success_rate"] <= hi
    assert lo <= clo and chi <= hi and (hi - lo) > (chi - clo)
