"""selfheal: a plugin that makes an agent runtime heal itself.

The public library API is the functions the CLI and the MCP server call; see README.
Plugins decorate their hook functions with :data:`hookimpl` (see ``hookspecs``).
"""
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # `from selfheal_plugin import hookimpl` loads pluggy then, not every `import selfheal_plugin`
    # (`agent --version` starts without it).
    if name == "hookimpl":
        from selfheal_plugin.plugins.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
