"""Tool errors: pick the fix from what the messages say.

Each message template is sorted into one kind — a missing path, a permission problem,
an invalid argument, or something else — and the fix follows the kind that covers most
occurrences (other kinds with at least a fifth of them get their own change too):

* missing path → a pre-flight existence check (``preflight = ["path_exists"]``, risk
  medium: the check refuses calls itself); expected impact: the share of occurrences with a
  missing path, stopped before the call;
* permission → a manual change: grant access to the resources named in the messages;
* invalid argument → a manual change: validate the argument keys the calls used;
* other → retries when the same tool later succeeded in the same run (the share that
  did is the expected impact), otherwise a manual review of the top messages; never
  retries when the evidence says the failures are deterministic (the same arguments
  failed again every time they were repeated).

It also answers for the failure kinds ``missing_resource`` and ``invalid_arguments``
(whatever the runtime's label, e.g. an ``ENOENT`` labelled ``connection_refused``), from
the pattern's evidence: a missing resource named by a *path* argument gets the pre-flight
check (expected impact: the share of occurrences whose message names a path argument);
missing ids, refs or URLs, and invalid arguments, go to a person or the prompt: no
config change, no retries, impact unknown. What the text says about the resources and about
retrying follows the evidence's determinism verdict: "do not exist" and "retrying will not
help" only when the same arguments failed again every time they were repeated, never when
they succeeded later.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, percent, recovered_in_run, tool_path,
)

_NOT_FOUND = re.compile(r"not found|does not exist|doesn't exist|no such file|cannot find|can't find|enoent|missing file")
_PATHISH = re.compile(r"<path>|\bfile\b|\bpath\b|director|folder")
_PERMISSION = re.compile(r"permission denied|access denied|access is denied|forbidden|not permitted|eacces|eperm|"
                         r"unauthori[sz]ed|read-only|insufficient privileges")
_INVALID = re.compile(r"invalid|must be|expected .* (got|but)|missing required|required (argument|parameter|field)|"
                      r"unknown (argument|parameter|field|option)|validation|bad request|malformed|unexpected argument")
KINDS = ("missing_path", "permission", "invalid_argument", "other")
MINOR_SHARE = 0.2
# A pre-flight check changes what callers see (the policy refuses a call the tool might have
# served: a path it creates, one that exists only on the server's side), so it is medium, as
# docs/plugin-tutorial.md rates it: auto-apply never takes it, a person decides.
PREFLIGHT_RISK = "medium"
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
    kinds = ("missing_resource", "invalid_arguments")
    summary = "Existence checks, permissions or argument validation, chosen from the messages"

    def _headline(self, pattern: Any) -> str:
        fk = getattr(pattern, "failure_kind", None)
        if fk == "missing_resource":
            if _path_share(pattern) > 0:
                return f"Add file existence checks before {pattern.tool_name} calls"
            return _lookup_headline(pattern)
        if fk == "invalid_arguments":
            return f"Validate {pattern.tool_name} arguments before calling it"
        kind = kinds_of(pattern).most_common(1)[0][0] if pattern.occurrences_detail else "other"
        return {
            "missing_path": f"Add file existence checks before {pattern.tool_name} calls",
            "permission": f"Grant {pattern.tool_name} the permissions its calls need",
            "invalid_argument": f"Validate {pattern.tool_name} arguments before calling it",
            "other": f"Review the recurring {pattern.tool_name} error messages",
        }[kind]

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        fk = getattr(pattern, "failure_kind", None)
        if fk in ("missing_resource", "invalid_arguments") and getattr(pattern, "evidence", None):
            return self._from_kind(pattern, history, fk)
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
                risk = PREFLIGHT_RISK
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
                deterministic = _verdict(pattern) == "deterministic"
                evidence["determinism"] = _verdict(pattern)
                if others and share_recovered >= RETRY_EVIDENCE and not deterministic:
                    retried = True
                    changes.append(Change.config(tool_path(tool, "retry_attempts"), 1))
                    changes.append(Change.config(tool_path(tool, "retry_backoff_ms"), 1000))
                    reduction = (reduction or 0.0) + share * share_recovered
                    basis = (f"{recovered} of {n} failures were followed by a success of {tool} in the same run")
                else:
                    changes.append(Change.manual(f"Review the recurring {tool} errors and fix their cause: "
                                                 f"{examples}"))
        description = self._headline(pattern)
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


    def _from_kind(self, pattern: Any, history: HistoryWindow, kind: str) -> Proposal:
        tool = pattern.tool_name
        ev = pattern.evidence
        n = pattern.occurrences
        examples = "; ".join(t["template"] for t in ev.get("templates", [])[:3])
        paths = ev.get("paths") or []
        evidence = {"failure_kind": kind, "paths": paths, "named_arguments": ev.get("named_arguments", {}),
                    "determinism": _verdict(pattern)}
        if kind == "missing_resource" and paths:
            share = _path_share(pattern)
            current = history.tool_setting(tool, "preflight")
            checks = list(current) if isinstance(current, list) else []
            if "path_exists" not in checks:
                checks.append("path_exists")
            gone = [p["path"] for p in paths if p.get("exists_now") is not True]
            missing = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more (agent self-heal show {pattern.id})"
                                             if len(gone) > 3 else "") if gone else "see show"
            changes = [Change.config(tool_path(tool, "preflight"), checks),
                       Change.manual(f"Have the agent check paths (or list the folder) before {tool} calls; "
                                     f"paths that do not exist now: {missing}")]
            return self.make_proposal(
                pattern, description=f"Add file existence checks before {tool} calls",
                expected_impact=impact_text(share, f"missing-path errors on {tool}",
                                            f"{percent(share)} of {n} failures name a path argument that did not "
                                            f"exist; the check stops them before the call"),
                risk_level=PREFLIGHT_RISK, changes=changes, expected_reduction=share, evidence=evidence)
        if kind == "missing_resource":
            found = "do not exist" if _verdict(pattern) == "deterministic" else "were not found when called"
            unrepeated = "No call repeated the same arguments: whether they appear later is not known."
            text = (f"The resources {tool} was asked for {found} ({examples}); have the agent look them up "
                    f"(list, search) before using them, or correct the ids in the prompt. "
                    f"{_repeats(pattern, unrepeated)}")
            description = _lookup_headline(pattern)
        else:
            keys = Counter(k for o in pattern.occurrences_detail for k in o.get("arg_keys", []))
            key_text = ", ".join(k for k, _ in keys.most_common(5)) or "its arguments"
            unrepeated = "Retrying will not help: the tool refused the arguments as invalid."
            text = (f"Validate {key_text} before calling {tool} (state the tool's schema in the prompt, or "
                    f"validate before the call); messages: {examples}. {_repeats(pattern, unrepeated)}")
            description = f"Validate {tool} arguments before calling it"
        return self.make_proposal(
            pattern, description=description,
            expected_impact=impact_text(None, f"{tool} errors", f"{n} occurrence(s) of {kind.replace('_', ' ')}; "
                                        "the fix needs a person, no model for its effect"),
            risk_level="low", changes=[Change.manual(text)], evidence=evidence)


def _path_share(pattern: Any) -> float:
    ev = getattr(pattern, "evidence", None) or {}
    named = ev.get("path_occurrences") or sum(p.get("count", 0) for p in ev.get("paths") or [])
    return min(1.0, named / max(1, ev.get("sampled_occurrences") or pattern.occurrences or 1))


def _verdict(pattern: Any) -> str | None:
    return ((getattr(pattern, "evidence", None) or {}).get("determinism") or {}).get("verdict")


def _lookup_headline(pattern: Any) -> str:
    """The fix for resources that were not found, saying they do not exist only when the
    evidence says so (the same arguments failed again every time they were repeated)."""
    found = "they do not exist" if _verdict(pattern) == "deterministic" else "they were not found when called"
    return f"Look up the resources {pattern.tool_name} names before calling it: {found}"


def _repeats(pattern: Any, unrepeated: str) -> str:
    """Whether a retry can help, as the evidence's determinism verdict says (see
    :func:`selfheal_plugin.analysis.evidence.determinism_counts`); ``unrepeated``: what to say
    when no call repeated the same arguments (the messages are all there is)."""
    det = (getattr(pattern, "evidence", None) or {}).get("determinism") or {}
    failed, ok = det.get("same_args_failed_again", 0), det.get("same_args_succeeded_later", 0)
    return {
        "deterministic": f"Retrying will not help: the same arguments failed again every time ({failed}×).",
        "transient": f"The same arguments succeeded later ({ok}×, failed again {failed}×): the failures did not "
                     "last, so look at what differed when they succeeded (a step that had to run first, something "
                     "created later).",
        "mixed": f"The same arguments failed again {failed}× and succeeded later {ok}×: some failures did not last.",
    }.get(det.get("verdict"), unrepeated)


@hookimpl
def register_strategies(register: Any) -> None:
    register(ToolErrorStrategy())
