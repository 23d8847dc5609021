"""What a strategy is given: one failure pattern, a recurring ``(error_type, tool_name)``
signature of failed tool calls, as detection (:mod:`selfheal_plugin.analysis.patterns`)
found it. It lives in the plugin layer with ``Change`` and ``Proposal`` because it is part of
the plugin API; detection builds it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Pattern:
    id: str
    error_type: str
    tool_name: str
    occurrences: int
    correlation_score: float
    confidence: float
    affected_runs: list[str]
    first_seen: str
    last_seen: str
    failure_rate: float
    suggested_fix: str | None = None
    # "proposal" when suggested_fix is the stored open proposal's description (its id in
    # improvement_id), "strategy" when it is that of the proposal its strategy makes now
    suggested_by: str | None = None
    improvement_id: str | None = None
    # that open proposal's status: "applied" says the fix is in force already (being verified);
    # "rejected" (with suggested_fix None): a person's rejection of that row still stands
    improvement_status: str | None = None
    # that open proposal's note when the same change was rolled back or rejected before
    # (lifecycle.cooldown.undone_before: improvement_id, status, note), else None
    same_change_undone: dict[str, Any] | None = None
    # why suggested_fix is None: the rejection that stands, or the strategy's error
    no_fix_reason: str | None = None
    # what the failures are, read from the evidence (analysis.evidence): the runtime's label
    # is one input; strategies follow the kind (see plugins.manager.resolve_strategy)
    failure_kind: str | None = None
    evidence: dict[str, Any] | None = field(default=None, repr=False)
    # what detection knew, for strategies and `show`; not part of the JSON result
    occurrences_detail: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self, detail: bool = False, runs_limit: int | None = None) -> dict[str, Any]:
        """The JSON-ready fields (a shallow copy: no deep copy of the occurrences).

        ``affected_run_count`` is the number of affected runs; ``runs_limit`` keeps only the
        latest that many of them in ``affected_runs`` (oldest first), None keeps all."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "occurrences_detail"}
        runs = self.affected_runs
        d["affected_runs"] = list(runs[-runs_limit:] if runs_limit is not None and runs_limit > 0 else runs)
        d["affected_run_count"] = len(runs)
        if detail:
            d["occurrences_detail"] = list(self.occurrences_detail)
        return d
