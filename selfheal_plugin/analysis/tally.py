"""A signature's failures in a window as columns: what detection and the evidence read of each.

Detection groups the window's failed calls by signature (error type, tool) into contexts
and runs; a pattern's evidence reads, for each of its occurrences, the kind and codes of its
message and the argument it names, what came after it, its instant and its duration. A
:class:`Tally` holds those as parallel lists, oldest first, the distinct contexts and kinds
in tables the lists point into, read for the whole window in one query
(``patterns._read_tallies``). Grouping and evidence are then a few passes over short
integer lists (``Counter`` of a list keeps the order of first appearance, which their ties
follow) rather than one Python step per occurrence and field.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# (kind, reason), codes, named argument: what a failure's message and its call's arguments say
Known = tuple[tuple[str, str], dict[str, Any], dict[str, Any] | None]
# template, argument keys, workflow, step: what makes a failure's context
ContextKey = tuple[str, tuple[str, ...], Any, Any]

NOT_READ = -1  # a failure whose kind is not read yet (a signature no pattern needed the evidence of)
EXAMPLE_CHARS = 300  # what the evidence quotes of a template's first message


def tallies_of(rows: Iterable[dict[str, Any]], followups: dict[int, Any] | None = None) -> dict[tuple[str, str], Tally]:
    """The rows (oldest first) as one tally per signature; ``followups``: event id → its
    :class:`~selfheal_plugin.analysis.evidence.Followup` (the columns stay empty without)."""
    out: dict[tuple[str, str], Tally] = {}
    for row in rows:
        sig = (row["error_type"], row["tool_name"])
        t = out.get(sig)
        if t is None:
            t = out[sig] = Tally(*sig)
        f = followups.get(row["event_id"]) if followups is not None else None
        if f is None:
            t.add(row)
        else:
            t.add(row, f.follow, f.repeat, f.repeat_run)
    return out


@dataclass
class Tally:
    """One signature's failures, oldest first (ids ascending), as parallel columns."""

    error_type: str
    tool_name: str
    ids: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    durations: list[int | None] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)  # into context_keys
    kinds: list[int] = field(default_factory=list)  # into kind_values, NOT_READ while not read
    named: list[dict[str, Any] | None] = field(default_factory=list)  # the argument the message names
    follow: list[int | None] = field(default_factory=list)  # a Followup's three answers
    repeat: list[int | None] = field(default_factory=list)
    repeat_run: list[int | None] = field(default_factory=list)
    context_keys: list[ContextKey] = field(default_factory=list)
    kind_values: list[tuple[tuple[str, str], dict[str, Any]]] = field(default_factory=list)  # (kind, reason), codes
    messages: dict[int, str] = field(default_factory=dict, repr=False)  # event id -> message
    _context_at: dict[ContextKey, int] = field(default_factory=dict, repr=False)
    _kind_at: dict[tuple[tuple[str, str], int], int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, row: dict[str, Any], follow: int | None = None, repeat: int | None = None,
            repeat_run: int | None = None) -> int:
        """Append one failure given as an ``occurrences_detail`` row (newer than every one held)."""
        return self.append(row["event_id"], row["ts"], row["run_id"], row["duration_ms"],
                           (row["template"], tuple(row.get("arg_keys", ())), row.get("workflow"), row.get("step_index")),
                           row["message"], follow, repeat, repeat_run)

    def append(self, event_id: int, ts: float, run_id: str, duration_ms: int | None, context: ContextKey,
               message: str, follow: int | None, repeat: int | None, repeat_run: int | None) -> int:
        """Append one failure (newer than every one held); its position."""
        at = self._context_at.get(context)
        if at is None:
            at = self._context_at[context] = len(self.context_keys)
            self.context_keys.append(context)
        self.ids.append(event_id)
        self.ts.append(ts)
        self.runs.append(run_id)
        self.durations.append(duration_ms)
        self.contexts.append(at)
        self.kinds.append(NOT_READ)
        self.named.append(None)
        self.follow.append(follow)
        self.repeat.append(repeat)
        self.repeat_run.append(repeat_run)
        self.messages[event_id] = message
        return len(self.ids) - 1

    def know(self, position: int, known: Known) -> None:
        """Set what the failure at ``position`` says (its kind, codes and named argument).
        Kinds are told apart by their codes object (the readers share one per distinct text):
        two entries of equal value count as one wherever the evidence sums them."""
        kind_reason, codes, named = known
        key = (kind_reason, id(codes))
        at = self._kind_at.get(key)
        if at is None:
            at = self._kind_at[key] = len(self.kind_values)
            self.kind_values.append((kind_reason, codes))
        self.kinds[position] = at
        self.named[position] = named

    def first_positions(self, start: int) -> dict[str, int]:
        """Template → the position of its first failure at or after ``start``."""
        first: dict[str, int] = {}
        seen: set[int] = set()
        keys = self.context_keys
        for i in range(start, len(self.contexts)):
            c = self.contexts[i]
            if c not in seen:
                seen.add(c)
                first.setdefault(keys[c][0], i)
        return first
