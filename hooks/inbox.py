"""Deliver notifications to the inbox-mcp Markdown files (``$INBOX_PATH`` or ~/.notes/inbox).

A built-in ``notify`` implementation; other plugins can add their own sinks through the
same hook (every implementation receives every notification).
"""
from __future__ import annotations

from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.inbox import append_notification
from selfheal_plugin.history.settings import inbox_dir


@hookimpl
def notify(notification: Any, settings: Any) -> str:
    folder = settings.inbox_dir if settings is not None else inbox_dir()
    return str(append_notification(notification, folder, settings=settings))
