"""Deliver notifications to the inbox-mcp Markdown files (``$INBOX_PATH`` or ~/.notes/inbox).

A built-in ``notify`` implementation; other plugins can add their own sinks through the
same hook (every implementation receives every notification).
"""
from __future__ import annotations

from selfheal_plugin import hookimpl
from selfheal_plugin.history.settings import Settings, inbox_dir
from selfheal_plugin.plugins.inbox import append_notification
from selfheal_plugin.plugins.manager import Notification


@hookimpl
def notify(notification: Notification, settings: Settings | None) -> str:
    folder = settings.inbox_dir if settings is not None else inbox_dir()
    return str(append_notification(notification, folder, settings=settings))
