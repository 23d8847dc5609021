"""Permission denied: a person has to grant access; the proposal says to what.

The resources come from the messages themselves (paths, URLs and quoted names that the
templates masked), most frequent first. No config key grants permissions, so the
change is manual and its effect unknown. It also answers for the failure kind
``permission`` whatever the runtime's label: a credential problem (HTTP 401, a missing,
invalid or revoked token or API key) asks a person to renew the credential in the
server's environment; it never proposes retries or any config change.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import Change, HistoryWindow, Proposal, Strategy, impact_text

_CREDENTIALS = re.compile(r"unauthori[sz]ed|invalid (?:api[ _-]?key|token|credentials)|(?:api[ _-]?key|token) "
                          r"(?:is )?(?:missing|invalid|expired|revoked)|authentication", re.I)
_RESOURCE = re.compile(r"https?://\S+|(?:~|\.{1,2})?(?:/[\w.@+-]+)+/?|'[^']+'|\"[^\"]+\"")


def resources(pattern: Any, k: int = 5) -> list[str]:
    counts = Counter(m.strip("'\"") for o in pattern.occurrences_detail for m in _RESOURCE.findall(o["message"]))
    return [r for r, _ in counts.most_common(k)]


class PermissionDeniedStrategy(Strategy):
    name = "permission_denied"
    error_types = ("permission_denied",)
    kinds = ("permission",)
    summary = "Update the permissions table for the resources the calls were denied"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        found = resources(pattern)
        target = ", ".join(found) if found else "the resources in its error messages"
        templates = Counter(o["template"] for o in pattern.occurrences_detail).most_common(3)
        ev = getattr(pattern, "evidence", None) or {}
        credentials = "401" in (ev.get("codes") or {}).get("http_status", {}) or any(
            _CREDENTIALS.search(o["message"]) for o in pattern.occurrences_detail[:200])
        changes = []
        if credentials:
            changes.append(Change.manual(
                f"Renew the credential {pattern.tool_name}'s server uses (the token or API key in the server's "
                f"environment, where the runtime starts it): the upstream answered 401/unauthorized. "
                f"Retrying will not help."))
        changes += [Change.manual(f"Grant {pattern.tool_name} access to {target} (permissions table or "
                                  f"file/ACL permissions), or stop the agent from requesting them"),
                    Change.manual("Messages: " + "; ".join(t for t, _ in templates))]
        return self.make_proposal(
            pattern, description=f"Update permissions so {pattern.tool_name} can reach {target}",
            expected_impact=impact_text(None, f"permission errors on {pattern.tool_name}",
                                        f"{pattern.occurrences} denial(s); the fix needs a person"),
            risk_level="medium", changes=changes, evidence={"resources": found, "credentials": credentials},
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(PermissionDeniedStrategy())
