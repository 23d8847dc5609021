"""The inbox-mcp file format: one Markdown file per local day in ``$INBOX_PATH``.

A new file is ``# Inbox - YYYY-MM-DD``, a blank line, the first entry and a newline;
each later entry is appended as ``\\n---\\n\\n`` + entry + ``\\n``. An entry is::

    ## 2026-01-30 02:09:03 [self-heal] #self-heal #patterns *[HIGH]*

    Detected 4 failure pattern(s). View details: agent self-heal improvements

with PRIORITY ``**[URGENT]**``, ``*[HIGH]*``, nothing (normal) or ``[LOW]``. Several
processes append to the same files, so every append holds a :mod:`filelock` lock and
writes the whole entry with one ``O_APPEND`` ``write``. The lock file is
``BINKS_HOME/selfheal/locks/inbox.lock``, never in the user's inbox folder, which holds
only the day files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from selfheal_plugin.plugins.manager import Notification
from selfheal_plugin.history.settings import lock_dir, resolve_home
from selfheal_plugin.history.text import for_terminal

PRIORITY_MARKS = {"urgent": "**[URGENT]**", "high": "*[HIGH]*", "normal": "", "low": "[LOW]"}
LOCK_TIMEOUT_S = 30
LOCK_POLL_S = 0.005  # appends hold the lock for microseconds: poll often
_HEADER = re.compile(r"^## (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) \[([^\]]*)\](.*)$")


def _local(dt: datetime | None) -> datetime:
    return (dt.astimezone() if dt.tzinfo else dt) if dt else datetime.now().astimezone()


def _clean_tag(tag: str) -> str:
    return re.sub(r"[\s#\[\]*]+", "-", tag.strip()).strip("-")


_HEADING = re.compile(r"^( {0,3})(#|=+\s*$)")  # an ATX heading, or a setext underline
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")  # what would open a raw HTML tag or comment


def _clean_body(body: str) -> str:
    """The body as it is written: no line can start an entry or a heading, no raw HTML.

    Hooks escape the history's text they quote (``history.text.markdown_inline``); this
    is the sink's own guard for any notifier's body: a line that is exactly ``---`` would
    split the entry when the file is read back, a line starting with ``#`` (or made only
    of ``=``) would be a heading such as a forged ``## … [security-team] **[URGENT]**``,
    and ``<`` before a letter, ``/``, ``!`` or ``?`` would open HTML. Control characters
    (an escape sequence for whoever runs ``cat`` on the file) are written as visible escapes.
    """
    lines = []
    for line in body.strip("\n").splitlines():
        if line.strip() == "---":
            line = "- - -"
        line = _HEADING.sub(lambda m: m.group(1) + "\\" + m.group(2), line)
        lines.append(for_terminal(_HTML_START.sub("&lt;", line)))
    return "\n".join(lines)


def format_entry(notification: Notification, when: datetime | None = None) -> str:
    """One entry (header line, blank line, body), without the separator."""
    when = _local(when or notification.created_at)
    tags = " ".join(f"#{t}" for t in (_clean_tag(t) for t in notification.tags) if t)
    source = notification.source.replace("[", "(").replace("]", ")").strip() or "self-heal"
    parts = [f"## {when.strftime('%Y-%m-%d %H:%M:%S')}", f"[{source}]", tags, PRIORITY_MARKS[notification.priority]]
    header = " ".join(p for p in parts if p)
    return f"{header}\n\n{_clean_body(notification.body)}"


def day_file(inbox_dir: Path, when: datetime) -> Path:
    return Path(inbox_dir) / f"{_local(when).strftime('%Y-%m-%d')}.md"


def lock_file(settings: Any = None) -> Path:
    """The appends' lock: ``BINKS_HOME/selfheal/locks/inbox.lock`` (``settings.home``, else
    ``$BINKS_HOME`` or ``~/.binks``); its folder is created. One file for every day: an
    append holds it for microseconds, and no lock file piles up per day."""
    return lock_dir(settings.home if settings is not None else resolve_home()) / "inbox.lock"


def append_notification(notification: Notification, inbox_dir: Path, when: datetime | None = None,
                        settings: Any = None) -> Path:
    """Append one entry to the day's file (created with its header when new); returns the file.

    The lock is :func:`lock_file` under ``settings.home`` (BINKS_HOME), not in ``inbox_dir``."""
    when = _local(when or notification.created_at)
    inbox_dir = Path(inbox_dir)
    inbox_dir.mkdir(parents=True, exist_ok=True)
    path = day_file(inbox_dir, when)
    entry = format_entry(notification, when)
    from filelock import FileLock  # only when an entry is written: a detect with nothing new does not import it

    with FileLock(str(lock_file(settings)), timeout=LOCK_TIMEOUT_S).acquire(poll_interval=LOCK_POLL_S):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > 0:
                data = f"\n---\n\n{entry}\n"
            else:
                data = f"# Inbox - {when.strftime('%Y-%m-%d')}\n\n{entry}\n"
            os.write(fd, data.encode("utf-8"))
        finally:
            os.close(fd)
    return path


@dataclass
class InboxEntry:
    timestamp: str  # "YYYY-MM-DD HH:MM:SS", local time
    source: str
    tags: list[str] = field(default_factory=list)
    priority: str = "normal"
    body: str = ""


def parse_inbox(text: str) -> list[InboxEntry]:
    """Entries of one day file, read the way inbox-mcp reads them (split on ``\\n---\\n``)."""
    entries = []
    for section in text.split("\n---\n"):
        lines = section.split("\n")
        idx = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
        if idx is None:
            continue
        m = _HEADER.match(lines[idx])
        if not m:
            continue
        rest = m.group(3)
        if "**[URGENT]**" in rest:
            priority = "urgent"
        elif "*[HIGH]*" in rest:
            priority = "high"
        elif "[LOW]" in rest:
            priority = "low"
        else:
            priority = "normal"
        tags = [w[1:] for w in rest.split() if w.startswith("#") and "[" not in w]
        body = "\n".join(lines[idx + 1:]).strip("\n")
        entries.append(InboxEntry(m.group(1), m.group(2), tags, priority, body))
    return entries
