"""selfheal: a plugin that makes an agent runtime heal itself.

The public library API is the functions the CLI and the MCP server call; see README.
Plugins decorate their hook functions with :data:`hookimpl` (see ``hookspecs``).
"""
__version__ = "0.1.0"

from selfheal_plugin.plugins.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
