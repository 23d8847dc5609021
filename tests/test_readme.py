"""The README's set-up commands are the ones CI and users actually run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first, second = bash_blocks(text)[:2]
    assert text.index("```bash") < text.index("## ")  # before any section
    assert first.endswith("agent self-heal demo") and "pip install -e ." in first
    assert "pip install -q -e '.[test]'" in second and second.endswith("pytest -q -n auto")  # pytest-xdist: workers as tests/conftest.py counts them


def test_ci_runs_the_readme_test_command():
    second = bash_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci_lines


def test_readme_is_short_with_a_walkthrough_in_order():
    """Issue 15: the README is what a newcomer reads first; the reference lives in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    walk = text[text.index("## Ten minutes"):]
    steps = ["source .venv/bin/activate", "BINKS_HOME", "agent self-heal detect", "agent self-heal show",
             "agent self-heal test", "agent self-heal apply imp-20261127-0df4244f --yes", "git -C",
             "agent self-heal verify imp-20261127-0df4244f  ", "--append --from applied",
             "verify imp-20261127-0df4244f --early", "agent self-heal rollback"]
    at = [walk.index(s) for s in steps]
    assert at == sorted(at), "the walkthrough's steps come in the order a user runs them"
    for page in ("cli", "hooks", "api", "mcp", "runtime", "daemon", "lifecycle", "performance"):
        assert f"(docs/{page}.md)" in text
