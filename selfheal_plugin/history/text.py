"""Text read from the run history, made safe where it lands.

The history is written by another program and may be damaged or hostile (DESIGN.md,
"Trust boundaries"): a tool name, a message or a workflow name can hold newlines,
escape sequences, Markdown or HTML. Nothing here changes what is stored or compared;
these functions are applied where text is *rendered*:

* :func:`for_terminal` — control characters (C0, DEL, C1, bidi overrides, line
  separators) become visible escapes such as ``\\x1b``, so ``\\x1b[2J`` cannot clear the
  screen and a newline cannot forge an output line. :func:`for_rich` also escapes Rich
  markup (``[red]``, ``[link=…]``) for text passed to a Rich console or table.
* :func:`markdown_inline` — one line of Markdown text: control characters escaped as
  above (so no newline can start a ``## …`` heading), HTML (``<``, ``>``, ``&``) as
  entities and Markdown punctuation backslash-escaped.
* :func:`commit_line` — one line of a git commit message: no newline, so history text
  cannot add a trailer such as ``Self-Heal-Improvement: imp-x``.

:func:`first_control` finds the first of those characters, for input that is refused
rather than escaped (a plugin's description, a fix pack's evidence text).

:func:`format_p` words a p-value the one way every shell and notification prints it.

:func:`decode_text` is the connections' text factory: invalid UTF-8 is decoded with
U+FFFD replacement characters into an :class:`Undecodable` string, so a reader never
fails on it and can count the row as malformed (``isinstance(value, Undecodable)``).
"""
from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any


# C0 controls, DEL, C1 controls, bidi embeddings/overrides/isolates and marks, and the
# Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MARKDOWN_PUNCT = re.compile(r"([\\`*\[\]|~])")


def _visible(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def for_terminal(value: Any) -> str:
    """``value`` as text for a terminal: every control character shown as an escape."""
    return _CONTROL.sub(_visible, _text(value))


def first_control(value: Any, allowed: str = "") -> str | None:
    """The first control character in ``value`` (the ones :func:`for_terminal` escapes) that
    is not in ``allowed``, written as its visible escape (``\\r``, ``\\x1b``), or None: for
    text a plugin gives, which is refused rather than escaped when it must be plain lines."""
    for match in _CONTROL.finditer(_text(value)):
        if match.group(0) not in allowed:
            return _visible(match)
    return None


def for_rich(value: Any) -> str:
    """:func:`for_terminal`, then Rich markup escaped (for ``Console.print`` and tables)."""
    from rich.markup import escape  # only where rich prints: start-up does not pay for it

    return escape(for_terminal(value))


def markdown_inline(value: Any) -> str:
    """``value`` as one line of Markdown that renders as the literal text.

    Backslashes and Markdown punctuation are escaped, ``&``, ``<`` and ``>`` become
    entities (no raw HTML), control characters become visible escapes (no line break, so
    no heading, list or thematic break can be forged) and a leading ``#`` is escaped.
    Underscores are kept: CommonMark does not emphasise inside words, and tool names
    (``mcp__server__tool``) stay readable in the file.
    """
    text = _MARKDOWN_PUNCT.sub(r"\\\1", _text(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _CONTROL.sub(_visible, text)
    stripped = text.lstrip(" ")
    if stripped.startswith("#"):
        text = text[:len(text) - len(stripped)] + "\\" + stripped
    return text


class TerminalFormatter(logging.Formatter):
    """A log formatter whose messages pass through :func:`for_terminal`: log lines quote
    tool names, run ids and workflow names, and a newline or an escape sequence in one
    must not forge a log line or drive the terminal (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 — logging's name
        record.message = for_terminal(record.message)
        return super().formatMessage(record)


def commit_line(value: Any) -> str:
    """``value`` as one line of a commit message (control characters escaped)."""
    return _CONTROL.sub(_visible, _text(value))


def bounded(value: Any, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, marking the cut with ``…``."""
    text = _text(value)
    if len(text) <= limit:
        return text
    return text[:max(0, limit - 1)] + "…"


def percent(x: float | None) -> str:
    """A rate as every view shows it — terminal, inbox, HTML report: whole percent (``93%``),
    ``n/a`` when unknown. One helper, so the same figure never reads 93% in one place and
    93.1% in another."""
    return "n/a" if x is None else f"{x * 100:.0f}%"


def format_p(p: float | None) -> str:
    """A p-value as people read one: ``p < 0.001`` or two significant digits."""
    if p is None:
        return "p n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {float(format(p, '.2g')):g}"


class Undecodable(str):
    """Text of a column that held invalid UTF-8, decoded with replacement characters."""

    __slots__ = ()


def decode_text(data: bytes) -> str:
    """The text factory of our connections: UTF-8, or an :class:`Undecodable`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(data.decode("utf-8", "replace"))


def is_decode_error(exc: BaseException) -> bool:
    """Whether ``exc`` is sqlite3's failure to decode a TEXT value as UTF-8."""
    return isinstance(exc, sqlite3.OperationalError) and "could not decode" in str(exc).lower()
