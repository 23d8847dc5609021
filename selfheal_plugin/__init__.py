"""selfheal: a plugin that makes an agent runtime heal itself.

The public library API is the functions the CLI and the MCP server call; see README.
"""
__version__ = "0.1.0"
