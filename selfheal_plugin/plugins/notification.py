"""What a ``notify`` hook receives: one message for the user."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

PRIORITIES = ("urgent", "high", "normal", "low")


@dataclass
class Notification:
    """A message for the user; every ``notify`` implementation receives it."""

    title: str
    body: str
    source: str = "self-heal"
    tags: list[str] = field(default_factory=list)
    priority: str = "normal"  # urgent | high | normal | low
    created_at: datetime | None = None  # aware; None means now

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat() if self.created_at else None
        return d
