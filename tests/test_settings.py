import math

import pytest

from selfheal_plugin.errors import ConfigError, UsageError
from selfheal_plugin.history.settings import load_settings


def write_config(home, text):
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_defaults_config_and_flags(binks_home):
    assert load_settings(binks_home).min_occurrences == 3
    write_config(binks_home, "[self_heal]\nmin_occurrences = 5\nconfidence_threshold = 1\nextra_key = 'x'\n")
    s = load_settings(binks_home)
    assert (s.min_occurrences, s.confidence_threshold, s.extra) == (5, 1.0, {"extra_key": "x"})
    assert load_settings(binks_home, min_occurrences=9, confidence_threshold=None).min_occurrences == 9


def test_env_home_and_db(tmp_path, monkeypatch):
    monkeypatch.setenv("BINKS_HOME", str(tmp_path / "h"))
    s = load_settings()
    assert s.home == tmp_path / "h" and s.db_path == tmp_path / "h" / "conversations.db"
    assert load_settings(db=tmp_path / "x.db").db_path == tmp_path / "x.db"


@pytest.mark.parametrize("line, message", [
    ("confidence_threshold = 5", "confidence_threshold must be between 0 and 1"),
    ("confidence_threshold = nan", "confidence_threshold must be between 0 and 1"),
    ("min_occurrences = -3", "min_occurrences must be between 1"),
    ("measurement_window_days = -1", "measurement_window_days must be between 1"),
    ("min_occurrences = 'three'", "min_occurrences must be an integer between 1 and 1000000, got 'three'"),
    ("auto_apply_enabled = 1", "auto_apply_enabled must be true or false, got 1"),
    ("lookback = '-7x'", "invalid time window '-7x'"),
    # a TOML date, time or datetime is shown as ISO text, as written, never as Python's repr
    ("lookback = 1979-05-27T07:32:00Z", r"or an ISO date/datetime, got 1979-05-27T07:32:00\+00:00$"),
    ("min_occurrences = 1979-05-27", "min_occurrences must be an integer between 1 and 1000000, got 1979-05-27$"),
    ("cooldown_minutes = 07:32:00", "cooldown_minutes must be an integer between 0 and 525600, got 07:32:00$"),
])
def test_bad_config_values_are_config_errors(binks_home, line, message):
    write_config(binks_home, f"[self_heal]\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(binks_home)


def test_bad_flag_values_are_usage_errors(binks_home):
    with pytest.raises(UsageError, match="confidence_threshold"):
        load_settings(binks_home, confidence_threshold=math.nan)
    with pytest.raises(UsageError, match="invalid time window"):
        load_settings(binks_home, lookback="-7x")


def test_unparsable_and_misshapen_config(binks_home):
    write_config(binks_home, "[self_heal\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(binks_home)
    write_config(binks_home, "self_heal = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_settings(binks_home)


def test_a_misspelled_setting_is_said_once_and_a_plugins_own_key_is_not(binks_home, caplog):
    (binks_home / "config.toml").write_text('[self_heal]\nmin_occurences = 50\nmy_plugin_token = "x"\n')
    with caplog.at_level("WARNING", logger="selfheal.settings"):
        first = load_settings(binks_home)
        load_settings(binks_home)
    told = [r.getMessage() for r in caplog.records if r.name == "selfheal.settings"]
    assert len(told) == 1 and "'min_occurences' (did you mean min_occurrences?" in told[0]
    assert first.min_occurrences == 3 and first.extra == {"min_occurences": 50, "my_plugin_token": "x"}


@pytest.mark.parametrize("bad", ['"abc"', "-5", "0", "true", '"90.5"', "90000.5"])
def test_a_wrong_tool_value_is_refused_by_the_runtime_and_ignored_by_a_reader_with_one_warning(binks_home, caplog,
                                                                                               bad):
    from datetime import UTC, datetime

    from selfheal_plugin.history.connection import connect
    from selfheal_plugin.history.settings import check_tool_tables, read_config
    from selfheal_plugin.plugins.strategy import HistoryWindow
    from selfheal_plugin.runtime.policy import ToolPolicy

    write_config(binks_home, f'[tools."k8s"]\ntimeout_ms = {bad}\nretry_attempts = 2\n'
                             '[servers."k8s"]\ncommand = "k8s-mcp"\nauto_restart = "yes"\n')
    cfg = binks_home / "config.toml"
    checked, problems = check_tool_tables(read_config(cfg), cfg)
    assert checked["tools"] == {"k8s": {"retry_attempts": 2}} and checked["servers"] == {"k8s": {"command": "k8s-mcp"}}
    assert len(problems) == 2 and problems[0].startswith(f'{cfg}: [tools."k8s"] timeout_ms must be ')
    assert problems[1] == f'{cfg}: [servers."k8s"] auto_restart must be true or false, got \'yes\''
    with pytest.raises(ConfigError) as refused:  # the runtime's ToolPolicy reads the same rule
        ToolPolicy(cfg, watch=False)
    assert str(refused.value) == problems[0]
    # what a strategy or the simulation reads: the wrong value left out, each said once
    conn = connect(binks_home / "conversations.db", create=True)
    with caplog.at_level("WARNING", logger="selfheal.settings"):
        for _ in range(2):
            window = HistoryWindow(conn, datetime(2026, 11, 1, tzinfo=UTC), settings=load_settings(binks_home))
            assert window.tool_setting("k8s", "timeout_ms") is None and window.tool_setting("k8s", "retry_attempts") == 2
    told = [r.getMessage() for r in caplog.records if r.name == "selfheal.settings"]
    assert told == [f"{line} (ignored; apply refuses to edit the file until it is fixed)" for line in problems]
