"""Help pages of the two console scripts (``agent``, ``self-healing-mcp``) that wrap at spaces
only. Outside the layers: the shells (cli, mcp) both use it and may not import each other."""
from __future__ import annotations

from typing import Any

import click

_HELD_HYPHEN = "\u2011"  # a non-breaking hyphen: one column, and no place for textwrap to break


class WholeWordsFormatter(click.HelpFormatter):
    """Help text wrapped at spaces only. click's textwrap also breaks after a hyphen, which cut
    an option (``--token-`` / ``file``) or a command (``self-`` / ``heal``) in two, so a pasted
    one failed: each hyphen is held while the text wraps and put back in the page."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _HELD_HYPHEN))

    def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(term, text.replace("-", _HELD_HYPHEN)) for term, text in rows], col_max, col_spacing)

    def getvalue(self) -> str:
        return super().getvalue().replace(_HELD_HYPHEN, "-")


class WholeWordsContext(click.Context):
    """A context whose help page is written by :class:`WholeWordsFormatter`."""

    formatter_class = WholeWordsFormatter
