"""The docs site (issue 15): `mkdocs build --strict` passes, and the reference pages are
generated from the code (hookspecs, the MCP tool schemas, the CLI, the service), so they
cannot drift from it."""
from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import anyio
import pytest

from selfheal_plugin.mcp.server import build_server
from selfheal_plugin.plugins import hookspecs
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.service import SelfHeal

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def text_of(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html).replace("&#39;", "'").replace("&quot;", '"')


def test_hooks_reference_is_generated_from_hookspecs(site):
    html = text_of(page(site, "hooks"))
    for name in plugins.hook_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert name in html
        first_line = inspect.getdoc(getattr(hookspecs, name)).splitlines()[0]
        assert first_line.split("``")[0].strip() in html, f"{name}'s docstring is on the page"
        for param in params.split(", "):
            assert param in html
    # the source page is a mkdocstrings directive, not a copy
    assert "::: selfheal_plugin.plugins.hookspecs" in (DOCS / "hooks.md").read_text()


def test_mcp_tools_page_is_generated_from_the_tool_schemas(site):
    tools = anyio.run(build_server().list_tools)
    html = text_of(page(site, "mcp"))
    source = (DOCS / "mcp.md").read_text()
    assert "<!-- generated: mcp-tools -->" in source
    for t in tools:
        assert t.name in html
        assert " ".join(t.description.split())[:60] in html
        for param in t.input_schema.get("properties", {}):
            assert param in html
        assert f"`{t.name}`" not in source or source.count(t.name) <= 2, "no hand-written tool table"


def test_python_api_and_cli_reference_come_from_the_code(site):
    api = text_of(page(site, "api"))
    for name, member in inspect.getmembers(SelfHeal, inspect.isfunction):
        if not name.startswith("_") and member.__doc__:
            assert name in api, f"SelfHeal.{name} on the API page"
    cli = text_of(page(site, "cli"))
    for command in ("agent self-heal detect", "agent self-heal apply", "agent self-heal canary promote",
                    "agent self-heal-daemon", "self-healing-mcp"):
        assert command in cli
    assert "Usage: agent self-heal verify" in cli


def test_every_page_is_in_the_nav_and_readme_links_resolve(site):
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[\w./-]+\.md)[^)]*\)", readme):
        assert (ROOT / link).is_file(), link
    for md in DOCS.glob("*.md"):
        assert (site / ("" if md.stem == "index" else md.stem) / "index.html").is_file(), md.name


def test_docs_extra_has_lower_bounds_and_ci_builds_strict():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    names = {re.split(r"[\[>=<]", r)[0] for r in extra}
    assert {"mkdocs", "mkdocstrings", "mkdocs-material"} <= names
    assert all(">=" in r for r in extra)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    tests_at = next(i for i, line in enumerate(ci) if "pytest -q" in line)
    docs_at = next(i for i, line in enumerate(ci) if "mkdocs build --strict" in line)
    assert docs_at > tests_at and "'.[docs]'" in ci[docs_at]


def test_every_option_of_the_mcp_server_is_on_its_page():
    from selfheal_plugin.mcp.server import cli

    source = (DOCS / "mcp.md").read_text()
    options = [opt for p in cli.params for opt in p.opts if opt.startswith("--") and opt != "--version"]
    assert "--read-only" in options
    for opt in options:
        assert f"`{opt}" in source, f"{opt} is not documented in docs/mcp.md"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_every_python_name_the_docs_give_exists():
    """A snippet a reader copies (`from selfheal_plugin.x import y`) and a name the prose
    gives (`selfheal_plugin.x.y`) must import: a moved function leaves no stale path."""
    wrong = []
    for md in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        text = md.read_text(encoding="utf-8")
        for m in re.finditer(r"selfheal_plugin(?:\.[A-Za-z_]\w*)+", text):
            try:
                _resolve(m.group(0))
            except (ImportError, AttributeError):
                wrong.append(f"{md.name}: {m.group(0)}")
        for m in re.finditer(r"^\s*from (selfheal_plugin[\w.]*) import \(?([\w, ]+)", text, re.M):
            module = importlib.import_module(m.group(1))
            names = [n.split()[0] for n in m.group(2).split(",") if n.strip()]  # `a as b` is a
            wrong += [f"{md.name}: {m.group(0).strip()}" for n in names if not hasattr(module, n)]
    assert not wrong, wrong
