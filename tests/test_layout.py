"""The layering of selfheal_plugin is a contract, not a habit: import-linter checks that each
layer imports only the layers below it and that no modules of one layer import each other in
a loop (pyproject.toml [tool.importlinter])."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_the_public_api_loads_lazily():
    code = ("import sys, selfheal_plugin as s; assert 'selfheal_plugin.service' not in sys.modules; "
            "from selfheal_plugin import SelfHeal, hookimpl, Change, Strategy, ModeledStrategy, Proposal, "
            "HistoryWindow, ToolCall; assert SelfHeal.__module__ == 'selfheal_plugin.service'; print(s.__version__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == __import__("selfheal_plugin").__version__


def test_the_package_is_typed():
    assert (ROOT / "selfheal_plugin" / "py.typed").exists()
