"""The one schema of settings and flags: plugin.toml agrees with it, the models built from it
validate every table, its API serves help texts and MCP schemas, and no input raises anything
but a one-line ConfigError/UsageError."""
from __future__ import annotations

import logging
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomlkit
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfheal_plugin.cli.main import agent
from selfheal_plugin.daemon.loop import parse_interval
from selfheal_plugin.errors import ConfigError, UsageError
from selfheal_plugin.history import schema
from selfheal_plugin.history.settings import DEFAULTS, RANGES, Settings, load_settings
from selfheal_plugin.runtime.policy import ToolPolicy
from selfheal_plugin.runtime.toolconfig import (
    CircuitBreakerSettings,
    validate_server_table,
    validate_tool_table,
)

ROOT = Path(__file__).resolve().parents[1]
WHERE = '/h/config.toml: [tools."x"]'


# ------------------------------------------------------------------ one source


def test_plugin_toml_defaults_are_the_schema_defaults():
    manifest = tomllib.loads((ROOT / "plugin.toml").read_text(encoding="utf-8"))["self_heal"]
    assert manifest == schema.defaults("self_heal")
    assert all(type(manifest[k]) is type(v) for k, v in schema.defaults("self_heal").items())
    values, extra = schema.validate_self_heal(manifest, "plugin.toml: [self_heal]")
    assert values == manifest and extra == {}


def test_settings_defaults_and_ranges_come_from_the_schema(tmp_path):
    s = Settings(home=tmp_path, db_path=tmp_path / "db")
    assert {k: getattr(s, k) for k in schema.SELF_HEAL} == schema.defaults("self_heal") == DEFAULTS
    assert RANGES["measurement_window_days"] == schema.bounds("measurement_window_days") == (1, 3650)
    assert "lookback" not in RANGES and schema.bounds("lookback") is None


def test_the_models_publish_the_declarations():
    props = schema.SelfHealConfig.model_json_schema()["properties"]
    for key, sp in schema.SELF_HEAL.items():
        assert props[key]["default"] == sp.default and props[key]["description"] == sp.description
        if sp.bounds:
            assert (props[key]["minimum"], props[key]["maximum"]) == sp.bounds
    tool = schema.ToolConfig.model_json_schema()
    assert set(tool["properties"]) == {*schema.TOOL, "circuit_breaker"}
    assert schema.CircuitBreakerConfig.model_json_schema()["required"] == ["failure_threshold",
                                                                          "timeout_duration_sec"]


def test_the_api_for_help_texts_and_mcp_schemas():
    assert schema.default("min_occurrences") == 3 and schema.default("limit") == 20
    assert schema.describe("lookback").startswith("How far back detection looks")
    assert schema.bounds("confidence_threshold") == (0.0, 1.0)
    assert schema.bounds("circuit_breaker.failure_threshold") == (1, 1_000_000)
    assert schema.help_text("min_occurrences", "Minimum occurrences") == \
        "Minimum occurrences (1-1000000; default: [self_heal] min_occurrences, else 3)."
    assert schema.help_text("window_days").endswith("(1-3650; default: [self_heal] measurement_window_days, "
                                                    "else 7 days).")
    assert schema.field_kwargs("fraction") == {"description": schema.help_text("fraction"), "gt": 0.0, "lt": 1.0}
    with pytest.raises(KeyError):
        schema.spec("no_such_setting")


# ------------------------------------------------------------------ flags and overrides


@pytest.mark.parametrize("name, value, message", [
    ("limit", 10**23, "--limit must be between 1 and 1000000, got 100000000000000000000000"),
    ("window_days", 1e308, "--window_days must be between 1 and 3650, got 1e+308"),
    ("window_days", math.nan, "--window_days must be between 1 and 3650, got nan"),
    ("window_days", 5000, "--window_days must be between 1 and 3650, got 5000"),
    ("fraction", 1.0, "--fraction must be between 0 and 1 (exclusive), got 1.0"),
    ("interval", "999999d", "invalid interval '999999d': it must be at most 30 days"),
    ("interval", math.inf, "invalid interval inf: it must be at most 30 days"),
    ("min_occurrences", True, "--min_occurrences must be an integer between 1 and 1000000, got True"),
    ("lookback", "-7x", "invalid time window '-7x'"),
])
def test_check_is_one_usage_line(name, value, message):
    with pytest.raises(UsageError) as err:
        schema.check(name, value, label=f"--{name}")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_check_returns_the_converted_value():
    assert schema.check("interval", "1.5h") == 5400.0
    assert schema.check("confidence_threshold", 1) == 1.0 and isinstance(schema.check("confidence_threshold", 1), float)
    assert schema.check("window_days", 3650) == 3650


@pytest.mark.parametrize("text", ["999999d", "31d", "1e400", "inf", "nan"])
def test_parse_interval_refuses_what_overflows_the_timers(text):
    with pytest.raises(UsageError, match="invalid interval"):
        parse_interval(text)
    assert parse_interval("30d") == 30 * 86400


def test_overrides_are_usage_errors_and_unknown_ones_a_type_error(binks_home):
    with pytest.raises(UsageError, match=r"^invalid value: min_occurrences must be between 1 and 1000000, got 0$"):
        load_settings(binks_home, min_occurrences=0)
    with pytest.raises(TypeError, match="unknown setting 'bogus'"):
        load_settings(binks_home, bogus=3)
    assert load_settings(binks_home, measurement_window_days=3650).measurement_window_days == 3650


def test_a_bad_flag_is_one_line_before_the_command_runs():
    res = CliRunner().invoke(agent, ["self-heal", "improvements", "--limit", "99999999999999999999999"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "Error: --limit must be between 1 and 1000000, got 99999999999999999999999"


def test_the_common_path_does_not_import_pydantic(binks_home):
    """Startup: no table and no flag to validate, no pydantic; a [self_heal] table is validated."""
    code = ("import sys; from selfheal_plugin.history.settings import load_settings; "
            f"s = load_settings({str(binks_home)!r}); print('pydantic' in sys.modules, s.min_occurrences)")

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()

    assert run() == ["False", "3"]
    (binks_home / "config.toml").write_text("[self_heal]\nmin_occurrences = 4\n")
    assert run() == ["True", "4"]


# ------------------------------------------------------------------ tool and server tables


def test_tool_tables_keep_only_what_they_set(caplog):
    with caplog.at_level(logging.WARNING, logger="selfheal.policy"):
        out = validate_tool_table({"timeout_ms": 5, "colour": "red", "preflight": ["path_exists"],
                                   "circuit_breaker": {"failure_threshold": 2, "timeout_duration_sec": 30,
                                                       "shape": 1}}, WHERE)
    assert out == {"timeout_ms": 5, "preflight": ("path_exists",),
                   "circuit_breaker": CircuitBreakerSettings(2, 30.0, 1)}
    assert "unknown key 'colour' ignored" in caplog.text and "unknown key 'shape' ignored" in caplog.text
    assert validate_server_table({"command": "k8s", "auto_restart": True}, WHERE) == {"auto_restart": True}
    assert validate_tool_table({}, WHERE) == {} and validate_server_table({"command": "x"}, WHERE) == {}


@pytest.mark.parametrize("table, message", [
    ({"circuit_breaker": {"failure_threshold": 2, "timeout_duration_sec": math.inf}},
     '[tools."x".circuit_breaker] timeout_duration_sec must be between 0 and 31536000, got inf'),
    ({"circuit_breaker": {"failure_threshold": 2, "timeout_duration_sec": math.nan}},
     "timeout_duration_sec must be between 0 and 31536000, got nan"),
    ({"timeout_ms": 10**30}, '[tools."x"] timeout_ms must be between 1 and 86400000'),
    ({"retry_attempts": True}, "retry_attempts must be an integer between 0 and 100, got True"),
    ({"preflight": "path_exists"}, "preflight must be a list of check names (path_exists), got 'path_exists'"),
    ({"circuit_breaker": []}, '[tools."x".circuit_breaker] must be a table'),
])
def test_tool_table_errors_name_file_table_and_key(table, message):
    with pytest.raises(ConfigError) as err:
        validate_tool_table(table, WHERE)
    assert message in str(err.value) and str(err.value).startswith("/h/config.toml: ")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ arbitrary config text

toml_scalars = (st.integers() | st.floats() | st.booleans() | st.text(max_size=20)
                | st.datetimes().map(lambda d: d.replace(microsecond=0)) | st.dates())
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(sorted(schema.SELF_HEAL)) | st.text(min_size=1, max_size=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.dictionaries(keys, toml_values, max_size=5))
def test_any_self_heal_table_is_a_value_or_a_config_error(binks_home, section):
    (binks_home / "config.toml").write_text(tomlkit.dumps({"self_heal": section}), encoding="utf-8")
    try:
        s = load_settings(binks_home)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "[self_heal]" in str(exc)
        return
    for key, value in section.items():
        if key in schema.SELF_HEAL:
            assert getattr(s, key) == value
        else:
            assert key in s.extra


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_any_self_heal_text_is_a_value_or_a_config_error(binks_home, text):
    (binks_home / "config.toml").write_text("[self_heal]\n" + text, encoding="utf-8")
    try:
        load_settings(binks_home)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tool=st.dictionaries(st.sampled_from([*schema.TOOL, "circuit_breaker", "x"]), toml_values, max_size=4),
       breaker=st.dictionaries(st.sampled_from([*schema.CIRCUIT_BREAKER, "y"]), toml_values, max_size=4),
       server=st.dictionaries(st.sampled_from([*schema.SERVER, "command"]), toml_values, max_size=3))
def test_any_tool_or_server_table_is_a_value_or_a_config_error(tmp_path, tool, breaker, server):
    tool = {**tool, "circuit_breaker": breaker} if breaker else tool
    path = tmp_path / "config.toml"
    path.write_text(tomlkit.dumps({"tools": {"t": tool}, "servers": {"s": server}}), encoding="utf-8")
    try:
        ToolPolicy(path, watch=False)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
