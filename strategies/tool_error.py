"""Tool errors: pick the fix from what the messages say.

Each message template is sorted into one kind — a missing path, a permission problem,
an invalid argument, or something else — and the fix follows the kind that covers most
occurrences (other kinds with at least a fifth of them get their own change too):

* missing path → a pre-flight existence check (``preflight = ["path_exists"]``); expected
  impact: the share of occurrences with a missing path, stopped before the call;
* permission → a manual change: grant access to the resources named in the messages;
* invalid argument → a manual change: validate the argument keys the calls used;
* other → retries when the same tool later succeeded in the same run (the share that
  did is the expected impact), otherwise a manual review of the top messages.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, recovered_in_run, tool_path,
)

_NOT_FOUND = re.compile(r"not found|does not exist|doesn't exist|no such file|cannot find|can't find|enoent|missing file")
_PATHISH = re.compile(r"<path>|\bfile\b|\bpath\b|director|folder")
_PERMISSION = re.compile(r"permission denied|access denied|access is denied|forbidden|not permitted|eacces|eperm|"
                         r"unauthori[sz]ed|read-only|insufficient privileges")
_INVALID = re.compile(r"invalid|must be|expected .* (got|but)|missing required|required (argument|parameter|field)|"
                      r"unknown (argument|parameter|field|option)|validation|bad request|malformed|unexpected argument")
KINDS = ("missing_path", "permission", "invalid_argument", "other")
MINOR_SHARE = 0.2
RETRY_EVIDENCE = 0.5


def template_kind(template: str) -> str:
    t = template.lower()
    if _PERMISSION.search(t):
        return "permission"
    if _NOT_FOUND.search(t) and _PATHISH.search(t):
        return "missing_path"
    if _INVALID.search(t):
        return "invalid_argument"
    return "other"


def kinds_of(pattern: Any) -> Counter:
    return Counter(template_kind(o["template"]) for o in pattern.occurrences_detail)


def _examples(pattern: Any, kind: str, k: int = 3) -> list[str]:
    counts = Counter(o["template"] for o in pattern.occurrences_detail if template_kind(o["template"]) == kind)
    return [t for t, _ in counts.most_common(k)]


class ToolErrorStrategy(ModeledStrategy):
    name = "tool_error"
    error_types = ("tool_error",)
    summary = "Existence checks, permissions or argument validation, chosen from the messages"

    def suggest(self, pattern: Any) -> str:
        kind = kinds_of(pattern).most_common(1)[0][0] if pattern.occurrences_detail else "other"
        return {
            "missing_path": f"Add file existence checks before {pattern.tool_name} calls",
            "permission": f"Grant {pattern.tool_name} the permissions its calls need",
            "invalid_argument": f"Validate {pattern.tool_name} arguments before calling it",
            "other": f"Review the recurring {pattern.tool_name} error messages",
        }[kind]

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        tool = pattern.tool_name
        kinds = kinds_of(pattern)
        n = sum(kinds.values()) or 1
        dominant = kinds.most_common(1)[0][0]
        chosen = [k for k in KINDS if k == dominant or kinds[k] / n >= MINOR_SHARE]
        changes: list[Change] = []
        evidence: dict[str, Any] = {"kinds": dict(kinds)}
        reduction: float | None = None
        retried = False
        risk = "low"
        basis = f"{n} occurrence(s)"
        for kind in chosen:
            share = kinds[kind] / n
            examples = "; ".join(_examples(pattern, kind))
            if kind == "missing_path":
                current = history.tool_setting(tool, "preflight")
                checks = list(current) if isinstance(current, list) else []
                if "path_exists" not in checks:
                    checks.append("path_exists")
                changes.append(Change.config(tool_path(tool, "preflight"), checks))
                changes.append(Change.manual(f"Have the agent verify paths (or fall back to a glob) before "
                                             f"{tool} calls; missing paths seen: {examples}"))
                reduction = (reduction or 0.0) + share
                basis = f"{kinds[kind]} of {n} occurrences name a missing path, caught by the check before the call"
            elif kind == "permission":
                changes.append(Change.manual(f"Grant {tool} the access its calls need (update the permissions "
                                             f"table or the resource's permissions); messages: {examples}"))
                risk = "medium"
            elif kind == "invalid_argument":
                keys = Counter(k for o in pattern.occurrences_detail for k in o.get("arg_keys", []))
                key_text = ", ".join(k for k, _ in keys.most_common(5)) or "its arguments"
                changes.append(Change.manual(f"Validate {key_text} before calling {tool} (prompt or schema); "
                                             f"messages: {examples}"))
            else:
                recovered, _ = recovered_in_run(pattern, history)
                evidence["recovered_in_run"] = recovered
                others = [o for o in pattern.occurrences_detail if template_kind(o["template"]) == "other"]
                share_recovered = recovered / len(pattern.occurrences_detail) if pattern.occurrences_detail else 0
                if others and share_recovered >= RETRY_EVIDENCE:
                    retried = True
                    changes.append(Change.config(tool_path(tool, "retry_attempts"), 1))
                    changes.append(Change.config(tool_path(tool, "retry_backoff_ms"), 1000))
                    reduction = (reduction or 0.0) + share * share_recovered
                    basis = (f"{recovered} of {n} failures were followed by a success of {tool} in the same run")
                else:
                    changes.append(Change.manual(f"Review the recurring {tool} errors and fix their cause: "
                                                 f"{examples}"))
        description = self.suggest(pattern)
        if retried and dominant == "other":
            description = (f"Retry {tool} once: most of its failures were followed by a success "
                           f"in the same run")
        if reduction is None:
            basis = f"{n} occurrence(s); the fix needs a person, no model for its effect"
        return self.make_proposal(
            pattern, description=description,
            expected_impact=impact_text(None if reduction is None else min(1.0, reduction),
                                        f"{tool} errors", basis),
            risk_level=risk, changes=changes,
            expected_reduction=None if reduction is None else min(1.0, reduction), evidence=evidence,
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(ToolErrorStrategy())
