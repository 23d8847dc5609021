"""Errors that reach a user as one clear line.

The CLI maps :class:`UsageError` to exit code 2 and every other :class:`SelfHealError`
to exit code 1; the MCP server turns them into tool errors. Anything else is a bug.
"""


class SelfHealError(Exception):
    """A domain failure a user can act on (unknown id, missing database, ...)."""


class UsageError(SelfHealError):
    """Bad input from the user: a malformed option value such as ``--since -7x``."""


class NotFoundError(SelfHealError):
    """An id (pattern, improvement, run) that does not exist."""


class HistoryError(SelfHealError):
    """The run-history database is missing, not SQLite, or lacks the runtime's tables."""


class ConfigError(SelfHealError):
    """``config.toml`` cannot be read or parsed."""


class LifecycleError(SelfHealError):
    """An improvement is not in a state for this operation, or the operation was refused."""
