"""selfheal: a plugin that makes an agent runtime heal itself.

The Python API is the one service every shell uses (the CLI, the MCP server, the daemon)::

    from selfheal_plugin import SelfHeal

    with SelfHeal(home="~/.binks") as sh:
        for pattern in sh.detect()["patterns"]:
            print(pattern["id"], pattern["suggested_fix"])

Plugin authors import :data:`hookimpl` and the strategy types (:class:`Strategy`,
:class:`ModeledStrategy`, :class:`Change`, :class:`Proposal`, :class:`HistoryWindow`)
from here too. Names are loaded on first use, so ``agent --version`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "selfheal_plugin.plugins.hookspecs",
    "SelfHeal": "selfheal_plugin.service",
    "Change": "selfheal_plugin.plugins.strategy",
    "HistoryWindow": "selfheal_plugin.plugins.strategy",
    "ModeledStrategy": "selfheal_plugin.plugins.strategy",
    "Proposal": "selfheal_plugin.plugins.strategy",
    "Strategy": "selfheal_plugin.plugins.strategy",
    "ToolCall": "selfheal_plugin.plugins.strategy",
}

__all__ = ["Change", "HistoryWindow", "ModeledStrategy", "Proposal", "SelfHeal", "Strategy", "ToolCall", "__version__",
           "hookimpl"]

if TYPE_CHECKING:
    from selfheal_plugin.plugins.hookspecs import hookimpl
    from selfheal_plugin.plugins.strategy import Change, HistoryWindow, ModeledStrategy, Proposal, Strategy, ToolCall
    from selfheal_plugin.service import SelfHeal


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'selfheal_plugin' has no attribute {name!r}")
