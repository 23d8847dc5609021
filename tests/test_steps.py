"""What a message says to do next: the CLI's words for a person, the MCP tool for an agent."""
from __future__ import annotations

import threading

from selfheal_plugin.steps import TOOLS, for_agent, option, step


def test_a_person_is_told_the_command():
    assert step("verify", "imp-1", early=True) == "agent self-heal verify imp-1 --early"
    assert step("test", "imp-1", mode="canary") == "agent self-heal test imp-1 --mode canary"
    assert step("canary promote|drop", "imp-1") == "agent self-heal canary promote|drop imp-1"
    assert step("detect", since="-30d") == "agent self-heal detect --since -30d"
    assert step("learn --rules") == "agent self-heal learn --rules"


def test_an_agent_is_told_the_tool_when_there_is_one():
    with for_agent():
        assert step("verify", "imp-1", early=True) == 'verify_improvement(improvement_id="imp-1", early=true)'
        assert step("test", "imp-1", mode="canary") == 'test_improvement(improvement_id="imp-1", mode="canary")'
        assert step("canary promote|drop", "imp-1") == ('canary_promote(improvement_id="imp-1") or '
                                                        'canary_drop(improvement_id="imp-1")')
        assert step("ab status") == "ab_status()"
        assert step("detect", since="-30d") == 'detect_failure_patterns(since="-30d")'
        assert step("learn --rules") == "list_rules()"
        # no tool does these: the command stays, for an agent with a shell
        assert step("rollback", "imp-1") == "agent self-heal rollback imp-1"
        assert step("sync", remote="URL") == "agent self-heal sync --remote URL"
    assert step("verify", "imp-1") == "agent self-heal verify imp-1"  # back to a person's words after it


def test_an_id_with_quotes_stays_one_argument():
    with for_agent():
        assert step("apply", 'imp-"x"') == 'apply_improvement(improvement_id="imp-\\"x\\"")'


def test_the_tools_named_are_the_servers_tools():
    from .mcp_helpers import TOOLS as SERVER_TOOLS

    assert {tool for tool, _ in TOOLS.values()} <= set(SERVER_TOOLS)


def test_the_audience_is_the_callers_alone():
    """One caller's for_agent does not change what another thread is told."""
    seen: list[str] = []
    inside, done = threading.Event(), threading.Event()

    def person() -> None:
        inside.wait()
        seen.append(step("verify", "imp-1"))
        done.set()

    t = threading.Thread(target=person)
    t.start()
    with for_agent():
        inside.set()
        done.wait()
    t.join()
    assert seen == ["agent self-heal verify imp-1"]


def test_an_option_of_the_command_at_hand_is_said_as_the_reader_passes_it():
    assert (option("force"), option("changes_made", "TEXT")) == ("--force", "--changes-made TEXT")
    with for_agent():
        assert (option("force"), option("changes_made", "TEXT")) == ("force=true", "the changes_made argument")


def test_a_verb_only_mcp_has_names_what_a_person_runs_instead():
    """The CLI proposes through detect; an agent calls propose_improvement for one pattern."""
    assert step("propose", "timeout:x") == "agent self-heal detect"
    with for_agent():
        assert step("propose", "timeout:x") == 'propose_improvement(pattern_id="timeout:x")'
