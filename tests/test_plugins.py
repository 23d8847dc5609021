"""The plugin manager: load order, entry points, user plugins, isolation of failures,
and the hook reference (every hookspec documented in its docstring, rendered in docs/hooks.md)."""
from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from selfheal_plugin import hookimpl
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.plugins import hookspecs
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.manager import Notification

ROOT = Path(__file__).resolve().parent.parent
TEST_DIST = ROOT / "tests" / "plugins" / "selfheal_test_strategy"
BUILTIN_TYPES = ("tool_error", "timeout", "connection_refused", "server_crashed", "permission_denied",
                 "transport_error", "rate_limited", "Unknown")


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="session")
def test_strategy_site(tmp_path_factory) -> Path:
    """The third-party test strategy installed by pip into a folder of its own: a real
    distribution with a ``.dist-info`` and an entry point in the ``selfheal`` group."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(TEST_DIST)], check=True)
    assert list(target.glob("selfheal_test_strategy-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture
def with_test_strategy(test_strategy_site, monkeypatch):
    monkeypatch.syspath_prepend(str(test_strategy_site))
    importlib.invalidate_caches()
    yield test_strategy_site
    sys.modules.pop("selfheal_test_strategy", None)


def test_builtins_answer_for_every_error_type():
    table = plugins.strategies()
    assert set(BUILTIN_TYPES) <= set(table)
    for etype in BUILTIN_TYPES:
        strategy, plugin = table[etype]
        assert plugin.startswith("selfheal.strategies.")
    # any spelling finds the same strategy; unknown types fall back to Unknown's
    assert plugins.strategy_for("ConnectionRefused") is table["connection_refused"][0]
    assert plugins.strategy_for("quota_exceeded") is table["Unknown"][0]
    assert plugins.strategy_for(None) is table["Unknown"][0]


def test_builtins_are_not_top_level_modules():
    plugins.load_plugins()
    assert "strategies" not in sys.modules and "hooks" not in sys.modules
    names = [p["name"] for p in plugins.get_plugins()]
    assert "selfheal.hooks.inbox" in names and "selfheal.hooks.notifications" in names


def test_entry_point_strategy_overrides_builtin(with_test_strategy):
    table = plugins.strategies()
    strategy, plugin = table["server_crashed"]
    assert strategy.name == "restart-only" and plugin == "test_strategy"
    assert table["timeout"][0].name == "timeout"  # the others stay built-in
    listed = {p["name"]: p for p in plugins.get_plugins()}
    assert listed["test_strategy"]["source"] == "entrypoint"
    assert listed["test_strategy"]["version"] == "0.3.1"
    assert listed["test_strategy"]["hooks"] == ["register_strategies"]
    desc = plugins.describe()
    row = next(r for r in desc["strategies"] if r["error_type"] == "server_crashed")
    assert row == {"error_type": "server_crashed", "strategy": "restart-only", "plugin": "test_strategy",
                   "summary": "Restart the crashed server, nothing else"}


def test_entry_points_can_be_restricted(with_test_strategy, monkeypatch, caplog):
    monkeypatch.setenv("SELFHEAL_LOAD_PLUGINS", "")
    assert plugins.strategies()["server_crashed"][0].name == "server_crashed"
    plugins.reset()
    # the name `plugins` shows (the entry point's), not the distribution's
    monkeypatch.setenv("SELFHEAL_LOAD_PLUGINS", "test_strategy")
    assert plugins.strategies()["server_crashed"][0].name == "restart-only"
    assert "SELFHEAL_LOAD_PLUGINS" not in caplog.text


def test_unknown_names_in_load_plugins_warn_in_one_line(with_test_strategy, monkeypatch, caplog):
    monkeypatch.setenv("SELFHEAL_LOAD_PLUGINS", "selfheal_test_strategy, nosuch")
    assert plugins.strategies()["server_crashed"][0].name == "server_crashed"  # nothing matched
    (warning,) = [r.getMessage() for r in caplog.records if "SELFHEAL_LOAD_PLUGINS" in r.getMessage()]
    assert "\n" not in warning
    assert "'nosuch'" in warning and "'selfheal_test_strategy' (a distribution; its plugins: test_strategy)" in warning
    assert "installed: test_strategy" in warning


def test_user_plugin_folder_loads_last_and_wins(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "my_timeouts.py").write_text(
        "from selfheal_plugin import hookimpl\n"
        "from selfheal_plugin.plugins.strategy import Change, Strategy\n"
        "class Mine(Strategy):\n"
        "    name = 'mine'\n"
        "    error_types = ('timeout',)\n"
        "    def propose(self, pattern, history):\n"
        "        return self.make_proposal(pattern, description='d', expected_impact='unknown',\n"
        "                                  risk_level='low', changes=[Change.manual('x')])\n"
        "@hookimpl\n"
        "def register_strategies(register):\n"
        "    register(Mine())\n")
    strategy, plugin = plugins.strategies(s)["timeout"]
    assert (strategy.name, plugin) == ("mine", "user:my_timeouts")
    assert next(p for p in plugins.get_plugins(s) if p["name"] == "user:my_timeouts")["source"] == "user"


def test_syntax_error_plugin_is_reported_and_skipped(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "broken.py").write_text("def register_strategies(register)\n    pass\n")
    (s.plugins_dir / "fine.py").write_text(
        "from selfheal_plugin import hookimpl\n"
        "seen = []\n"
        "@hookimpl\n"
        "def notify(notification, settings):\n"
        "    seen.append(notification.title)\n"
        "    return 'fine'\n")
    info = plugins.describe(s)
    errors = [e for e in info["errors"] if e["plugin"] == "user:broken"]
    assert len(errors) == 1
    assert errors[0]["phase"] == "load" and errors[0]["error"].startswith("SyntaxError")
    assert errors[0]["path"].endswith("broken.py")
    names = [p["name"] for p in info["plugins"]]
    assert "user:broken" not in names and "user:fine" in names
    assert len(info["strategies"]) == len(BUILTIN_TYPES)  # the rest keeps working
    results = plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)
    assert "fine" in results
    assert sys.modules["selfheal_user_plugins.fine"].seen == ["t"]


class Raising:
    @hookimpl
    def notify(self, notification, settings):
        raise RuntimeError("sink is down")

    @hookimpl
    def register_strategies(self, register):
        raise KeyError("no table")


class Recording:
    def __init__(self):
        self.got = []

    @hookimpl
    def notify(self, notification, settings):
        self.got.append(notification.title)
        return "recorded"


def test_raising_hook_is_isolated_and_reported(binks_home, caplog):
    s = load_settings(binks_home)
    raising, recording = Raising(), Recording()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(raising, "raising")
    plugins.register(recording, "recording")
    try:
        results = plugins.fire("notify", notification=Notification(title="hello", body="world"), settings=s)
        assert "recorded" in results and recording.got == ["hello"]
        assert list(Path(s.inbox_dir).glob("*.md"))  # the built-in inbox sink still wrote
        errs = [e for e in plugins.errors() if e.plugin == "raising"]
        assert [(e.phase, e.hook, e.error) for e in errs] == [("hook", "notify", "RuntimeError: sink is down")]
        assert "plugin raising failed in hook notify" in caplog.text
        # a strategy hook that raises costs only that plugin's strategies
        table = plugins.strategies(s)
        assert set(BUILTIN_TYPES) <= set(table)
        assert any(e.plugin == "raising" and e.hook == "register_strategies" for e in plugins.errors())
        assert any(e["plugin"] == "raising" for e in plugins.describe(s)["errors"])
    finally:
        plugins.unregister(raising)
        plugins.unregister(recording)


def test_invalid_strategy_registration_is_reported():
    class Bad:
        @hookimpl
        def register_strategies(self, register):
            register(object())

    bad = Bad()
    plugins.register(bad, "bad-strategy")
    try:
        assert set(BUILTIN_TYPES) <= set(plugins.strategies())
        assert any(e.plugin == "bad-strategy" and e.phase == "register" for e in plugins.errors())
    finally:
        plugins.unregister(bad)


def test_fire_rejects_unknown_hook():
    with pytest.raises(ValueError, match="unknown hook 'no_such_hook'"):
        plugins.fire("no_such_hook")


def test_notification_priority_is_validated():
    with pytest.raises(ValueError, match="priority"):
        Notification(title="t", body="b", priority="critical")


# ---------------------------------------------------------------- hook reference

EXPECTED_HOOKS = {
    "register_strategies": ["register"],
    "run_failed": ["run", "settings"],
    "history_changed": ["new_runs", "new_event_count", "settings"],
    "patterns_detected": ["patterns", "found", "settings"],
    "improvement_proposed": ["improvement", "settings"],
    "improvement_tested": ["improvement", "result", "settings"],
    "improvement_applied": ["improvement", "settings"],
    "improvement_verified": ["improvement", "verification", "settings"],
    "improvement_rolled_back": ["improvement", "settings"],
    "notify": ["notification", "settings"],
    "ab_verdict": ["experiment", "settings"],
    "ab_finished": ["experiment", "settings"],
}


def test_hook_names_and_arguments_are_the_contract():
    assert plugins.hook_names() == sorted(EXPECTED_HOOKS)
    for name, params in EXPECTED_HOOKS.items():
        assert list(inspect.signature(getattr(hookspecs, name)).parameters) == params


@pytest.mark.parametrize("name", sorted(EXPECTED_HOOKS))
def test_every_hookspec_is_documented(name):
    func = getattr(hookspecs, name)
    doc = inspect.getdoc(func) or ""
    assert doc.splitlines()[0].endswith("."), "a one-line summary first"
    for param in inspect.signature(func).parameters:
        assert f":param {param}:" in doc
    assert ":returns:" in doc
    assert "Fires" in doc, "say when the hook fires"


def test_hooks_reference_is_generated_from_the_hookspecs():
    """docs/hooks.md renders hookspecs.py (mkdocstrings), so it lists exactly the hooks that
    exist; tests/test_docs.py builds the site and checks each one is on the page."""
    page = (ROOT / "docs" / "hooks.md").read_text()
    assert "::: selfheal_plugin.plugins.hookspecs" in page
    assert not re.findall(r"^\| `(\w+)\(", page, re.MULTILINE), "no hand-written hook table"


# ---------------------------------------------------------------- containment (issue 14 item 4)


def _quick(settings, seconds: float = 1.0):
    """Settings whose plugin calls may take ``seconds``."""
    return settings.with_overrides(plugin_timeout_seconds=seconds)


def test_hooks_go_through_pluggy_and_hookimpls_stay_as_registered(binks_home):
    s = load_settings(binks_home)
    raising, recording = Raising(), Recording()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(raising, "raising")
    plugins.register(recording, "recording")
    calls: list[tuple[str, list[str]]] = []
    undo = plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])), lambda *a: None)
    try:
        before = {i.plugin_name: i.function for i in plugins.pm.hook.notify.get_hookimpls()}
        results = plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)
        after = {i.plugin_name: i.function for i in plugins.pm.hook.notify.get_hookimpls()}
        assert after == before  # the very functions the plugins defined, not wrappers of ours
        assert before["raising"].__func__ is Raising.notify
        assert "recorded" in results
        # pluggy made every call, one plugin at a time, last registered first
        notify_calls = [impls for name, impls in calls if name == "notify"]
        assert notify_calls == [["recording"], ["raising"], ["selfheal.hooks.inbox"]]
    finally:
        undo()
        plugins.unregister(raising)
        plugins.unregister(recording)


def test_a_wrapper_plugin_wraps_each_plugins_call(binks_home):
    s = load_settings(binks_home)

    class Wrapping:
        seen: ClassVar[list] = []

        @hookimpl(wrapper=True)
        def notify(self, notification, settings):
            result = yield
            self.seen.append(list(result))
            return result

    wrapping, recording = Wrapping(), Recording()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(wrapping, "wrapping")
    plugins.register(recording, "recording")
    try:
        plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)
        assert ["recorded"] in wrapping.seen and len(wrapping.seen) == 2  # recording's call and the inbox's
    finally:
        plugins.unregister(wrapping)
        plugins.unregister(recording)


class Exiting:
    @hookimpl
    def notify(self, notification, settings):
        sys.exit(3)


class Interrupting:
    @hookimpl
    def notify(self, notification, settings):
        raise KeyboardInterrupt


def test_base_exceptions_from_hooks_are_contained(binks_home):
    s = load_settings(binks_home)
    exiting, interrupting, recording = Exiting(), Interrupting(), Recording()
    plugins.load_plugins(s.plugins_dir)
    for plugin, name in ((exiting, "exiting"), (interrupting, "interrupting"), (recording, "recording")):
        plugins.register(plugin, name)
    try:
        results = plugins.fire("notify", notification=Notification(title="hi", body="b"), settings=s)
        assert "recorded" in results and recording.got == ["hi"]
        errs = {e.plugin: e.error for e in plugins.errors()}
        assert errs["exiting"] == "SystemExit: 3"
        assert errs["interrupting"] == "KeyboardInterrupt"
    finally:
        for plugin in (exiting, interrupting, recording):
            plugins.unregister(plugin)


class Hanging:
    def __init__(self):
        self.release = __import__("threading").Event()
        self.entered = __import__("threading").Event()

    @hookimpl
    def notify(self, notification, settings):
        self.entered.set()
        self.release.wait()
        return "late"


def test_a_hanging_hook_is_reported_after_the_deadline_and_skipped(binks_home):
    # The deadline is every plugin call's, the recording one's too: 2 s, which a busy
    # machine's stalls do not reach (the test waits it out once, for the hanging hook).
    s = _quick(load_settings(binks_home), 2)
    hanging, recording = Hanging(), Recording()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(hanging, "hanging")
    plugins.register(recording, "recording")
    try:
        results = plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)
        assert "recorded" in results and "late" not in results
        (err,) = [e for e in plugins.errors() if e.plugin == "hanging"]
        assert (err.phase, err.hook) == ("hook", "notify")
        assert err.error == ("timed out after 2 s (plugin_timeout_seconds); call abandoned; "
                             "skipped for the rest of this process")
    finally:
        hanging.release.set()
        plugins.unregister(hanging)
        plugins.unregister(recording)


class HangingEverywhere(Hanging):
    """A plugin that hangs in every hook it has and in its strategy's propose."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @hookimpl
    def notify(self, notification, settings):
        self.calls += 1
        self.release.wait()

    @hookimpl
    def improvement_proposed(self, improvement, settings):
        self.calls += 1
        self.release.wait()


def test_a_plugin_that_timed_out_is_skipped_for_the_rest_of_the_process(binks_home):
    """One deadline and one abandoned thread per hanging plugin, however often its hooks fire;
    said once; the other plugins are still called every time."""
    import threading

    s = _quick(load_settings(binks_home), 2)  # every plugin's deadline: see the test above
    hanging, recording = HangingEverywhere(), Recording()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(hanging, "hanging")
    plugins.register(recording, "recording")
    try:
        for i in range(4):
            plugins.fire("notify", notification=Notification(title=f"t{i}", body="b"), settings=s)
            plugins.fire("improvement_proposed", improvement=None, settings=s)
        assert hanging.calls == 1
        assert recording.got == ["t0", "t1", "t2", "t3"]
        (err,) = [e for e in plugins.errors() if e.plugin == "hanging"]
        assert err.hook == "notify" and err.error.endswith("skipped for the rest of this process")
        assert [e["count"] for e in plugins.describe(s)["errors"] if e["plugin"] == "hanging"] == [1]
        left = [t for t in threading.enumerate() if t.name.startswith("selfheal-plugin:hanging:")]
        assert len(left) == 1
        with pytest.raises(plugins.PluginCallFailed, match="skipped: it timed out earlier in this process"):
            plugins.call_plugin("hanging", "propose", lambda: "never called")
    finally:
        hanging.release.set()
        plugins.unregister(hanging)
        plugins.unregister(recording)


def test_a_stop_request_ends_the_wait_for_a_plugin():
    import threading

    s = load_settings()
    stop = threading.Event()
    hanging = Hanging()
    plugins.register(hanging, "hanging")
    try:
        with plugins.interruptible(stop):
            threading.Thread(target=lambda: (hanging.entered.wait(), stop.set()), daemon=True).start()
            with pytest.raises(plugins.Interrupted):
                plugins.fire("notify", notification=Notification(title="t", body="b"), settings=_quick(s, 3600))
        assert not any(e.plugin == "hanging" for e in plugins.errors())  # stopping is not the plugin's fault
        # outside the block the same event no longer interrupts anything
        assert plugins.fire("history_changed", new_runs=[], new_event_count=0, settings=s) == []
    finally:
        hanging.release.set()
        plugins.unregister(hanging)


def test_plugin_calls_never_end_the_process_with_the_plugins_exit_code():
    with pytest.raises(plugins.PluginCallFailed, match=r"plugin p \(hook h\): SystemExit: 3"):
        plugins.call_plugin("p", "h", sys.exit, 3)
    assert plugins.errors()[-1].error == "SystemExit: 3"


def test_system_exit_in_a_plugin_file_is_a_load_error(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "quits.py").write_text("raise SystemExit(0)\n")
    (s.plugins_dir / "fine.py").write_text(
        "from selfheal_plugin import hookimpl\n@hookimpl\ndef notify(notification, settings):\n    return 'fine'\n")
    info = plugins.describe(s)
    (err,) = [e for e in info["errors"] if e["plugin"] == "user:quits"]
    assert (err["phase"], err["error"]) == ("load", "SystemExit: 0")
    assert "user:fine" in [p["name"] for p in info["plugins"]]
    assert "fine" in plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)


def test_a_plugin_file_that_hangs_at_import_is_reported_after_the_deadline(binks_home):
    s = _quick(load_settings(binks_home), 2)  # zz_fine.py's import has the same deadline
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "sleeps.py").write_text("import time\ntime.sleep(120)\n")
    (s.plugins_dir / "zz_fine.py").write_text("VALUE = 1\n")
    info = plugins.describe(s)
    (err,) = [e for e in info["errors"] if e["plugin"] == "user:sleeps"]
    assert (err["phase"], err["hook"]) == ("load", None)
    assert err["error"] == "timed out after 2 s (plugin_timeout_seconds); call abandoned"
    assert "user:zz_fine" in [p["name"] for p in info["plugins"]]


# ---------------------------------------------------------------- errors persisted for later processes


def test_errors_are_persisted_for_a_later_process_and_counted_not_repeated(binks_home):
    s = load_settings(binks_home)
    raising = Raising()
    plugins.load_plugins(s.plugins_dir)
    plugins.register(raising, "raising")
    try:
        for _ in range(2):
            plugins.fire("notify", notification=Notification(title="t", body="b"), settings=s)
    finally:
        plugins.unregister(raising)
    plugins.reset()  # what a new process starts with
    assert plugins.errors() == []
    errs = [e for e in plugins.describe(s)["errors"] if e["plugin"] == "raising"]
    assert [(e["phase"], e["hook"], e["error"], e["count"]) for e in errs] == [
        ("hook", "notify", "RuntimeError: sink is down", 2)]
    assert errs[0]["first_seen"] <= errs[0]["last_seen"]
    stored = s.home / "selfheal" / "state" / "plugin-errors.json"
    assert stored.exists() and (stored.parent / ".gitignore").read_text().endswith("*\n")


def test_a_plugin_that_loads_again_loses_its_old_load_errors(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    path = s.plugins_dir / "flaky.py"
    path.write_text("import no_such_module_here\n")
    assert any(e["plugin"] == "user:flaky" for e in plugins.describe(s)["errors"])
    plugins.reset()
    path.write_text("VALUE = 1\n")
    assert not any(e["plugin"] == "user:flaky" for e in plugins.describe(s)["errors"])


# ---------------------------------------------------------------- a strategy that failed to load


TIMEOUT_STRATEGY = (
    "from selfheal_plugin import hookimpl\n"
    "from selfheal_plugin.plugins.strategy import Change, Strategy\n"
    "class Mine(Strategy):\n"
    "    name = 'mine'\n"
    "    error_types = ('timeout', 'RateLimited')\n"
    "    def propose(self, pattern, history):\n"
    "        return self.make_proposal(pattern, description='d', expected_impact='unknown',\n"
    "                                  risk_level='low', changes=[Change.manual('x')])\n"
    "@hookimpl\n"
    "def register_strategies(register):\n"
    "    register(Mine())\n")


def test_a_type_whose_strategy_failed_to_load_gets_no_fallback(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "mine.py").write_text(TIMEOUT_STRATEGY.replace("import hookimpl", "import hookimpl, nope"))
    failed = plugins.failed_to_load(s)
    assert set(failed) == {"timeout", "rate_limited"}
    assert failed["timeout"][0] == "user:mine"
    assert failed["timeout"][1].startswith("ImportError: cannot import name 'nope'")
    for etype in ("timeout", "RateLimited"):  # neither the built-in nor Unknown answers in its place
        with pytest.raises(plugins.StrategyError, match=r"^strategy for \w+ failed to load \(plugin user:mine: "
                                                        r"ImportError: .*\); nothing proposed"):
            plugins.strategy_for(etype, s)
    assert plugins.strategy_for("tool_error", s).name == "tool_error"  # other types are unaffected
    listed = {f["error_type"] for f in plugins.describe(s)["failed_strategies"]}
    assert listed == {"timeout", "rate_limited"}


def test_a_syntax_error_still_says_which_types_it_owned_and_a_later_plugin_may_answer(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "a_mine.py").write_text(TIMEOUT_STRATEGY.replace("def propose(self", "def propose(self,,"))
    (s.plugins_dir / "b_mine.py").write_text(TIMEOUT_STRATEGY.replace("'RateLimited'", "'other'"))
    # b_mine, loaded after the broken a_mine, answers for timeout; nobody for rate_limited
    assert set(plugins.failed_to_load(s)) == {"rate_limited"}
    strategy, plugin = plugins.resolve_strategy("timeout", s)
    assert (strategy.name, plugin) == ("mine", "user:b_mine")
    with pytest.raises(plugins.StrategyError, match="SyntaxError"):
        plugins.strategy_for("rate_limited", s)


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_register_strategies_that_raises_leaves_its_types_to_nobody(binks_home, when):
    """Raising after registering a replacement (or before registering anything) is a failed
    load of those types: neither the built-in it replaced nor Unknown proposes for them, and
    ``plugins`` lists them; a plugin loaded after it may still answer."""
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    registering = "    register(Mine())\n"
    text = TIMEOUT_STRATEGY.replace(registering, registering + "    raise RuntimeError('boom')\n") \
        if when == "after" else TIMEOUT_STRATEGY.replace(registering, "    raise RuntimeError('boom')\n")
    (s.plugins_dir / "mine.py").write_text(text)
    failed = plugins.failed_to_load(s)
    assert failed == {"timeout": ("user:mine", "RuntimeError: boom"), "rate_limited": ("user:mine", "RuntimeError: boom")}
    for etype in ("timeout", "RateLimited"):
        with pytest.raises(plugins.StrategyError, match=r"^strategy for \w+ failed to load \(plugin user:mine: "
                                                        r"RuntimeError: boom\); nothing proposed"):
            plugins.resolve_strategy(etype, s)
    assert plugins.strategy_for("tool_error", s).name == "tool_error"
    assert {f["error_type"] for f in plugins.describe(s)["failed_strategies"]} == {"timeout", "rate_limited"}
    assert [e.hook for e in plugins.errors() if e.plugin == "user:mine"] == ["register_strategies"]


def test_a_plugin_loaded_after_one_whose_register_strategies_raised_answers(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    registering = "    register(Mine())\n"
    (s.plugins_dir / "a_mine.py").write_text(
        TIMEOUT_STRATEGY.replace(registering, registering + "    raise RuntimeError('boom')\n"))
    (s.plugins_dir / "b_mine.py").write_text(TIMEOUT_STRATEGY.replace("'RateLimited'", "'other'"))
    assert set(plugins.failed_to_load(s)) == {"rate_limited"}
    assert plugins.resolve_strategy("timeout", s)[1] == "user:b_mine"


KIND_STRATEGY = TIMEOUT_STRATEGY.replace("    error_types = ('timeout', 'RateLimited')\n",
                                         "    error_types = ('mine_only',)\n    kinds = ('missing_resource',)\n")


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_register_strategies_that_raises_leaves_its_kinds_to_nobody(binks_home, when, monkeypatch):
    """Raising after registering a strategy for a failure kind (or before registering it: the
    file declares it) fails that kind as it fails a type: the built-in for the kind does not
    answer in its place, and ``plugins`` says so; other kinds are unaffected."""
    from click.testing import CliRunner

    from selfheal_plugin.cli.main import agent

    from .lifecycle_data import write_runs

    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    registering = "    register(Mine())\n"
    boom = "    raise RuntimeError('boom')\n"
    text = KIND_STRATEGY.replace(registering, registering + boom if when == "after" else boom)
    (s.plugins_dir / "mine.py").write_text(text)
    assert plugins.kinds_failed_to_load(s) == {"missing_resource": ("user:mine", "RuntimeError: boom")}
    for etype in ("tool_error", "connection_refused", "Unknown"):  # the built-in tool_error answers the kind
        with pytest.raises(plugins.StrategyError, match=r"^strategy for failure kind missing_resource failed to load "
                                                        r"\(plugin user:mine: RuntimeError: boom\); nothing proposed"):
            plugins.resolve_strategy(etype, s, "missing_resource")
    assert plugins.resolve_strategy("tool_error", s, "invalid_arguments")[0].name == "tool_error"
    assert plugins.resolve_strategy("timeout", s, "slow_tail")[0].name == "timeout"
    assert plugins.describe(s)["failed_kind_strategies"] == [
        {"kind": "missing_resource", "plugin": "user:mine", "error": "RuntimeError: boom"}]
    write_runs(binks_home / "conversations.db", [])  # the command opens a history
    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(agent, ["self-heal", "plugins", "--home", str(binks_home)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert ("✗ strategy for failure kind missing_resource failed to load (plugin user:mine: RuntimeError: boom): "
            "nothing is proposed for it until it loads") in res.output


def test_a_plugin_file_that_fails_to_load_leaves_its_kinds_to_nobody(binks_home):
    """A file that raises as it is imported answers for nothing: the failure kinds it declares
    are failed as its error types are, and the built-in for the kind does not answer."""
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    (s.plugins_dir / "mine.py").write_text("raise RuntimeError('boom')\n" + KIND_STRATEGY)
    assert plugins.kinds_failed_to_load(s) == {"missing_resource": ("user:mine", "RuntimeError: boom")}
    with pytest.raises(plugins.StrategyError, match=r"^strategy for failure kind missing_resource failed to load"):
        plugins.resolve_strategy("tool_error", s, "missing_resource")
    assert plugins.resolve_strategy("tool_error", s, "invalid_arguments")[0].name == "tool_error"


def test_a_plugin_loaded_after_one_whose_register_strategies_raised_answers_for_its_kind(binks_home):
    s = load_settings(binks_home)
    s.plugins_dir.mkdir(parents=True)
    registering = "    register(Mine())\n"
    (s.plugins_dir / "a_mine.py").write_text(
        KIND_STRATEGY.replace(registering, registering + "    raise RuntimeError('boom')\n"))
    (s.plugins_dir / "b_mine.py").write_text(KIND_STRATEGY)
    assert plugins.kinds_failed_to_load(s) == {}
    assert plugins.resolve_strategy("tool_error", s, "missing_resource")[1] == "user:b_mine"


def test_declared_error_types_are_read_without_running_the_file(tmp_path):
    path = tmp_path / "p.py"
    path.write_text("import sys\nsys.exit(1)\nclass A:\n    error_types: tuple = ('Timeout', \"server_crashed\")\n"
                    "class B:\n    error_types = ['x']\n")
    assert plugins.declared_error_types(path) == ["server_crashed", "timeout", "x"]
    path.write_text("class A:\n    error_types = ('timeout',)\n  def broken(:\n")
    assert plugins.declared_error_types(path) == ["timeout"]
    path.write_text("class A:\n    kinds = ('hang', 'nonsense', 'unknown')\n  def broken(:\n")
    assert plugins.declared_kinds(path) == ["hang"]


def test_hookspec_parameters_are_typed_and_resolve():
    import typing

    from selfheal_plugin.analysis.patterns import Pattern
    from selfheal_plugin.history.improvements import Improvement
    from selfheal_plugin.history.settings import Settings
    from selfheal_plugin.plugins.strategy import Strategy

    names = {"Pattern": Pattern, "Improvement": Improvement, "Settings": Settings, "Notification": Notification,
             "Strategy": Strategy}
    for name in EXPECTED_HOOKS:
        func = getattr(hookspecs, name)
        for param in inspect.signature(func).parameters.values():
            assert param.annotation not in (inspect.Parameter.empty, "Any"), f"{name}({param.name}) is typed"
        hints = typing.get_type_hints(func, globalns={**vars(hookspecs), **names})
        assert "settings" not in hints or hints["settings"] is Settings


def test_auto_analysis_run_failed_returns_what_its_spec_says(binks_home):
    plugins.load_plugins()
    module = sys.modules["selfheal_plugin.hooks.auto_analysis"]
    spec = inspect.signature(hookspecs.run_failed).return_annotation
    impl = inspect.signature(module.run_failed).return_annotation
    assert spec == impl == "None"
    assert module.run_failed({"id": None}, load_settings(binks_home)) is None


def test_plugin_timeout_is_a_setting_with_a_range(binks_home):
    from selfheal_plugin.errors import ConfigError

    assert load_settings(binks_home).plugin_timeout_seconds == 60.0
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 5\n")
    assert load_settings(binks_home).plugin_timeout_seconds == 5.0
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 0\n")
    with pytest.raises(ConfigError, match="plugin_timeout_seconds must be between 0.1 and 86400"):
        load_settings(binks_home)
    import tomllib

    manifest = tomllib.loads((ROOT / "plugin.toml").read_text())
    assert manifest["self_heal"]["plugin_timeout_seconds"] == 60.0
