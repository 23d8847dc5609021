"""Unknown (the runtime wrote no error type): analyse the messages, then fix generically.

Each occurrence's message is classified the way the runtime classifies errors (plus
"permission denied"). When at least 60 % of them agree on a type that has its own
strategy, that strategy proposes the fix (whichever plugin provides it) and a manual
change asks for the errors to be classified at the source. Otherwise: retries when the
same tool usually succeeded later in the same run (that share is the expected impact),
else a manual review of the most common messages. When the strategy for the type the
messages agree on failed to load, nothing is proposed (``strategy … failed to load``):
a generic fix stored now would block the real one later.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.history.connection import classify_error
from selfheal_plugin.plugins.manager import strategy_for
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, recovered_in_run, tool_path,
)

AGREEMENT = 0.6
RETRY_EVIDENCE = 0.5
_PERMISSION = re.compile(r"permission denied|access denied|forbidden|not permitted|eacces|eperm")


def classify(message: str) -> str:
    return "permission_denied" if _PERMISSION.search((message or "").lower()) else classify_error(message)


class UnknownStrategy(ModeledStrategy):
    name = "unknown"
    error_types = ("Unknown",)
    summary = "Classify the errors from their messages, then apply that type's fix or a generic one"

    def _headline(self, pattern: Any) -> str:
        label, share = self._label(pattern)
        if share >= AGREEMENT:
            return f"Treat as {label}: messages of {pattern.tool_name} look like {label}; classify them at the source"
        return f"Analyze the unclassified {pattern.tool_name} errors and add handling for the common messages"

    @staticmethod
    def _label(pattern: Any) -> tuple[str, float]:
        labels = Counter(classify(o["message"]) for o in pattern.occurrences_detail)
        if not labels:
            return "Unknown", 0.0
        label, count = labels.most_common(1)[0]
        return label, count / sum(labels.values())

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        label, share = self._label(pattern)
        classify_change = Change.manual(
            f"Make the runtime record an error_type for {pattern.tool_name} failures "
            f"({pattern.occurrences} call(s) had none; {share:.0%} of their messages read as {label})")
        delegate = strategy_for(label, history.settings, getattr(pattern, "failure_kind", None)) if share >= AGREEMENT else None
        if delegate is not None and delegate is not self and label != "Unknown":
            inner = delegate.propose(dataclasses.replace(pattern, error_type=label), history)
            return self.make_proposal(
                pattern, description=f"{inner.description} (unclassified errors that read as {label})",
                expected_impact=inner.expected_impact, risk_level=inner.risk_level,
                changes=[*inner.changes, classify_change], expected_reduction=inner.expected_reduction,
                evidence={**inner.evidence, "reclassified_as": label, "agreement": round(share, 4),
                          "delegate_strategy": inner.strategy},
                changes_required=[*inner.changes_required, classify_change.describe()],
            )
        recovered, _ = recovered_in_run(pattern, history)
        n = len(pattern.occurrences_detail) or 1
        top = Counter(o["template"] for o in pattern.occurrences_detail).most_common(3)
        evidence = {"labels_agreement": round(share, 4), "top_label": label, "recovered_in_run": recovered}
        deterministic = ((getattr(pattern, "evidence", None) or {}).get("determinism") or {}).get("verdict") \
            == "deterministic"
        evidence["determinism"] = "deterministic" if deterministic else None
        if recovered / n >= RETRY_EVIDENCE and not deterministic:
            reduction = recovered / n
            changes = [Change.config(tool_path(pattern.tool_name, "retry_attempts"), 1),
                       Change.config(tool_path(pattern.tool_name, "retry_backoff_ms"), 1000), classify_change]
            impact = impact_text(reduction, f"unclassified errors on {pattern.tool_name}",
                                 f"{recovered} of {n} failures were followed by a success in the same run")
        else:
            reduction = None
            changes = [Change.manual(f"Analyze the {pattern.tool_name} errors and add handling for: "
                                     + "; ".join(t for t, _ in top)), classify_change]
            impact = impact_text(None, f"unclassified errors on {pattern.tool_name}",
                                 "messages do not point to one cause; the fix needs a person")
        return self.make_proposal(pattern, description=self._headline(pattern), expected_impact=impact,
                                  risk_level="low", changes=changes, expected_reduction=reduction, evidence=evidence)


@hookimpl
def register_strategies(register: Any) -> None:
    register(UnknownStrategy())
