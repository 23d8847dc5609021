"""The package as an install leaves it: with bytecode.

``pip install`` of a wheel compiles every module to ``__pycache__``; an editable install
compiles on first import, unless ``PYTHONDONTWRITEBYTECODE`` is set (as it is on some CI and
sandbox machines). There every command would compile selfheal's modules from source again,
about 0.1 s that no user waits for. The benchmarks call :func:`compile_package` first, so
they time what a user's machine runs.
"""
from __future__ import annotations

import compileall
from pathlib import Path


def compile_package() -> None:
    """Write the bytecode of selfheal's modules and its built-in plugins (idempotent)."""
    import selfheal_plugin
    from selfheal_plugin.plugins.manager import builtin_folder

    for folder in (Path(selfheal_plugin.__file__).parent, builtin_folder("strategies"), builtin_folder("hooks")):
        compileall.compile_dir(folder, quiet=1)
