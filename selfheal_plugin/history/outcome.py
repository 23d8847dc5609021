"""What a run's status counts as: the one definition behind every run success rate.

The runtime writes four statuses (spec: ``running``, ``completed``, ``failed``,
``cancelled``). A run is **finished** once it has an outcome — completed, failed or
cancelled; a ``running`` run has none yet and is in no rate. A finished run **succeeded**
only when it completed, so

    success rate = completed / (completed + failed + cancelled)

A cancelled run is finished and not successful (docs/health.md; its health outcome is 0.5,
neither a success nor a failure). It is kept in the denominator on purpose: a change that
turns failures into hangs the user gives up on (a raised timeout) must not look like an
improvement, and the dashboard, ``test``'s baseline and ``verify``'s before-rate of the
same window must be one number. Every reader of run outcomes — health, the report, the
replay, verification, canaries, A/B tests, learning — counts with these names; none keeps
its own list.
"""
from __future__ import annotations

SUCCEEDED = "completed"
FINISHED: tuple[str, ...] = ("completed", "failed", "cancelled")


def finished_sql(column: str = "status") -> str:
    """The SQL condition "this run is finished", on ``column`` (e.g. ``r.status``)."""
    return f"{column} IN ({', '.join(repr(s) for s in FINISHED)})"


def success_rate(completed: int, finished: int, digits: int = 4) -> float | None:
    """Completed over finished runs, rounded as every report stores it; None without runs."""
    return round(completed / finished, digits) if finished else None
