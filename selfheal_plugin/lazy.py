"""Heavy third-party libraries imported on first use, not at start-up.

``agent --version`` or a ``detect`` on a small history must not pay for numpy, git or
tomlkit (together most of a second on a busy machine) when they are not needed::

    np = lazy_module("numpy")   # nothing imported yet
    np.asarray(...)             # numpy imported here, once

The first attribute access imports the real module and copies its namespace into the
proxy, so later accesses cost what a module attribute costs. Only for third-party
libraries; selfheal's own modules are imported normally (layers, no cycles).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    """The module itself when it is already imported, else a proxy that imports it on first use."""
    return sys.modules.get(name) or _LazyModule(name)
