"""Cross-project learning: fix packs (export/import) and sync through a git remote.

A **fix pack** is the portable form of a home's fix rules (:mod:`selfheal_plugin.history.rules`)::

    {"format": "selfheal-fix-pack", "version": 1, "exported_at": "...", "home": "<home id>",
     "rules": [{"id", "failure_kind", "error_type", "description", "template", "evidence"}, ...]}

It holds the failure kind, the change template (only ``tools."{tool}"`` / ``servers."{server}"``
keys the runtime's schema knows), a one-line description and the measured evidence per origin
(rates, sample sizes, p-value, when). Never a path, a secret, a config value beyond the
template, or the local ``enabled`` flag.

A pack is untrusted input: :func:`parse_pack` bounds its size, checks the format and version
and validates every rule through :meth:`Rule.build` before anything is written;
:func:`import_pack` then merges all rules in one transaction (all or nothing). Evidence a pack
claims for *this* home's origin is ignored: our own measurement wins; evidence it passes on
for a third home's origin never replaces what we hold for it (only a home's own pack updates
its measurements). On a sync remote, a pack is only read from ``packs/<its home id>.json``.

**Sync** shares packs through a plain git remote (file, ssh, git, http(s) only; ``ext::`` and
every other transport are refused, for git itself too through ``GIT_ALLOW_PROTOCOL``). The
local copy is a *bare* repository in ``BINKS_HOME/selfheal/sync/<16 hex of the url's sha256>``: nothing
from the remote is ever checked out, so no file name, symlink or attribute in it chooses a
path we write. Each home writes only ``packs/<home id>.json`` (a blob committed on top of the
remote's ``main`` with git plumbing), so homes never conflict; a push that lost a race
(non-fast-forward) fetches and retries once. Other homes' packs are read from the fetched
tree, and merged into the rule table only once our push succeeded: a remote that refuses
changes nothing here. (The merge is not held open across the push: a SQLite write lock held
over the network would block the runtime's own writes; the packs are parsed and validated
first, then merged in one transaction right after the push.)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import get_state, set_state, write_transaction
from selfheal_plugin.history.rules import (
    HOME_ID, Rule, RuleError, RuleStore, home_id, measured_at, merge_evidence, split_origin,
)
from selfheal_plugin.history.settings import Settings, lock_dir
from selfheal_plugin.history.text import bounded
from selfheal_plugin.history.times import format_timestamp, utcnow
from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.lifecycle.gitops import git_reason, identity_env
from selfheal_plugin.steps import step

git = lazy_module("git")

FORMAT = "selfheal-fix-pack"
VERSION = 1
MAX_PACK_BYTES = 4 * 1024 * 1024
MAX_RULES = 2000
MAX_PACKS = 500  # other homes' packs read per sync
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # and their total size
CLOCK_SKEW = timedelta(days=1)  # how far past our clock a measurement may be dated (homes' clocks differ)
BRANCH = "main"
PACKS_DIR = "packs"
ALLOWED_PROTOCOLS = ("file", "ssh", "git", "http", "https")
REMOTE_KEY = "sync:remote"
LAST_SYNC_KEY = "sync:last"
NETWORK_TIMEOUT_S = 120
SYNC_GITIGNORE = "# selfheal: sync clones (bare repositories), never versioned\n*\n"


class PackError(SelfHealError):
    """A fix pack that cannot be read or is not valid (nothing was changed)."""


class SyncError(SelfHealError):
    """A sync that could not complete (the remote refused, is unreachable, ...); nothing changed."""


# ------------------------------------------------------------------ packs


def _portable(rule: Rule) -> dict[str, Any]:
    return {"id": rule.id, "failure_kind": rule.failure_kind, "error_type": rule.error_type,
            "description": rule.description, "template": rule.template, "evidence": rule.evidence}


def _rebuilt(rule: Rule) -> Rule | None:
    """The rule as :meth:`Rule.build` sees it (the table is in a file others can write: a row
    that no longer validates is not exported)."""
    try:
        return Rule.build(rule.failure_kind, rule.template, rule.description, rule.evidence, rule.error_type)
    except (RuleError, TypeError, AttributeError):
        return None


def own_home_id(conn: sqlite3.Connection) -> str:
    """This home's id, checked before it names a file (``packs/<id>.json``)."""
    hid = home_id(conn)
    if not isinstance(hid, str) or not HOME_ID.match(hid):
        raise SyncError("this home's id in selfheal_state is not a plain name; refusing to use it")
    return hid


def build_pack(home: str, rules: list[Rule], now: datetime) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "exported_at": format_timestamp(now), "home": home,
            "rules": [_portable(r) for r in sorted(rules, key=lambda r: r.id)]}


def export_pack(conn: sqlite3.Connection, now: datetime) -> tuple[dict[str, Any], int]:
    """This home's pack and the number of stored rules left out: rows that no longer validate, and
    beyond :data:`MAX_RULES` those measured in the fewest places."""
    rules, skipped = [], 0
    for stored in RuleStore(conn).list():
        rule = _rebuilt(stored)
        if rule is None or rule.id != stored.id:
            skipped += 1
            continue
        rules.append(rule)
    if len(rules) > MAX_RULES:  # a pack others can read: the rules measured in the most places first
        rules.sort(key=lambda r: (-r.places, r.id))
        skipped += len(rules) - MAX_RULES
        rules = rules[:MAX_RULES]
    return build_pack(own_home_id(conn), rules, now), skipped


def parse_pack(data: bytes | str | dict[str, Any], where: str = "the pack",
               now: datetime | None = None) -> tuple[str, list[Rule]]:
    """The pack's home id and its validated rules, or :class:`PackError` (one line naming the
    first problem). Evidence dated after ``now`` (default: the current instant) by more than
    :data:`CLOCK_SKEW` is refused: a measurement from the future would win every merge."""
    latest = (now or utcnow()) + CLOCK_SKEW
    if isinstance(data, dict):
        try:
            size = len(json.dumps(data))
        except (TypeError, ValueError):
            raise PackError(f"{where} is not JSON data") from None
        if size > MAX_PACK_BYTES:
            raise PackError(f"{where} is larger than {MAX_PACK_BYTES // (1024 * 1024)} MiB; refusing it")
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_PACK_BYTES:
            raise PackError(f"{where} is larger than {MAX_PACK_BYTES // (1024 * 1024)} MiB; refusing it")
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise PackError(f"{where} is not JSON ({bounded(str(exc), 80)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackError(f"{where} is not a selfheal fix pack (no \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PackError(f"{where} has no valid version number")
    if version > VERSION:
        raise PackError(f"{where} is fix pack version {version}, newer than this selfheal reads ({VERSION}); "
                        "upgrade selfheal")
    home = data.get("home")
    if not isinstance(home, str) or not HOME_ID.match(home):
        raise PackError(f"{where} has no valid home id")
    items = data.get("rules")
    if not isinstance(items, list):
        raise PackError(f"{where} has no list of rules")
    if len(items) > MAX_RULES:
        raise PackError(f"{where} holds {len(items)} rules, more than the {MAX_RULES} a pack may hold")
    rules: list[Rule] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PackError(f"{where}: rule {i} is not a table")
        try:
            rule = Rule.build(item.get("failure_kind"), item.get("template"), item.get("description"),
                              item.get("evidence", {}), item.get("error_type"))
        except RuleError as exc:
            raise PackError(f"{where}: rule {i}: {exc}") from None
        if item.get("id") is not None and item.get("id") != rule.id:
            raise PackError(f"{where}: rule {i}: its id does not match its kind and template (tampered?)")
        for origin, entry in rule.evidence.items():
            if measured_at(entry) > latest:
                raise PackError(f"{where}: rule {i}: evidence {origin[:40]!r} is measured in the future "
                                f"({entry['measured_at']})")
        rules.append(rule)
    return home, rules


def _foreign(rules: list[Rule], own: str, pack_home: str) -> tuple[list[Rule], int]:
    """The rules of ``pack_home``'s pack with every entry claiming this home's origin dropped
    (our own measurement wins), the rest marked ``imported``, and those for a third home's
    origin marked relayed (they never replace what we hold, see ``merge_evidence``); and how
    many entries were dropped."""
    out, dropped = [], 0
    for rule in rules:
        evidence, relayed = {}, set()
        for origin, entry in rule.evidence.items():
            home = split_origin(origin)[0]
            if home == own:
                dropped += 1
                continue
            evidence[origin] = {**entry, "source": "imported"}
            if home != pack_home:
                relayed.add(origin)
        if evidence or not rule.evidence:  # a rule whose only evidence is ours brings nothing new
            out.append(Rule(id=rule.id, failure_kind=rule.failure_kind, description=rule.description,
                            template=rule.template, evidence=evidence, error_type=rule.error_type,
                            relayed=frozenset(relayed)))
    return out, dropped


def _combine(rules: list[Rule]) -> list[Rule]:
    """Rules with the same id (from several packs) as one, evidence merged per origin: a home's
    own entry before any relayed one, else the later measurement (the first on a tie)."""
    first: dict[str, Rule] = {}
    picked: dict[str, dict[str, tuple[bool, Any, dict[str, Any]]]] = {}
    for rule in rules:
        first.setdefault(rule.id, rule)
        chosen = picked.setdefault(rule.id, {})
        for origin, entry in rule.evidence.items():
            rank = (origin not in rule.relayed, measured_at(entry))
            have = chosen.get(origin)
            if have is None or rank > have[:2]:
                chosen[origin] = (*rank, entry)
    return [Rule(id=r.id, failure_kind=r.failure_kind, description=r.description, template=r.template,
                 error_type=r.error_type, evidence={o: c[2] for o, c in picked[r.id].items()},
                 relayed=frozenset(o for o, c in picked[r.id].items() if not c[0]))
            for r in first.values()]


def _summary(rule: Rule) -> dict[str, Any]:
    return {"id": rule.id, "failure_kind": rule.failure_kind, "description": rule.description,
            "places": rule.places, "summary": rule.summary()}


def merge_rules(conn: sqlite3.Connection, rules: list[Rule]) -> dict[str, Any]:
    """Merge foreign rules in one transaction; the counts and the rules per outcome."""
    report: dict[str, Any] = {"added": [], "updated": [], "unchanged": []}
    for rule, outcome in RuleStore(conn).merge_many(rules):
        report[outcome].append(_summary(rule))
    return report


def import_pack(conn: sqlite3.Connection, data: bytes | str | dict[str, Any],
                where: str = "the pack", now: datetime | None = None) -> dict[str, Any]:
    """Validate the whole pack, then merge all its rules in one transaction."""
    origin, rules = parse_pack(data, where, now)
    own = own_home_id(conn)
    foreign, dropped = _foreign(rules, own, origin)
    report = merge_rules(conn, _combine(foreign))
    report["unchanged"].extend(_summary(r) for r in rules if r.id not in {f.id for f in foreign})
    return {"home": origin, "own_home": own, "rules": len(rules), "own_entries_ignored": dropped, **report}


# ------------------------------------------------------------------ remotes


def check_remote(url: Any) -> str:
    """The url when its transport is one we allow (file, ssh, git, http(s), an absolute local
    path or ``user@host:path``); a :class:`SyncError` otherwise (``ext::``, ``fd::``, options)."""
    if not isinstance(url, str) or not url.strip() or len(url) > 1000 or any(
            c.isspace() or not c.isprintable() for c in url):
        raise SyncError("a sync remote must be one URL without spaces or control characters")
    if url.startswith("-"):
        raise SyncError(f"refusing remote {bounded(url, 80)!r}: it looks like an option")
    if "::" in url.split("/", 1)[0] or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", url):
        raise SyncError(f"refusing remote {bounded(url, 80)!r}: git's transport helpers (ext::, fd::, ...) "
                        "can run commands; use file://, ssh://, git:// or https://")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)", url)
    if m:
        scheme, host = m.group(1).lower(), m.group(2)
        if scheme not in ALLOWED_PROTOCOLS:
            raise SyncError(f"refusing remote {bounded(url, 80)!r}: transport {scheme!r} is not one of "
                            f"{', '.join(ALLOWED_PROTOCOLS)}")
        if host.rsplit("@", 1)[-1].startswith("-"):
            raise SyncError(f"refusing remote {bounded(url, 80)!r}: a host name cannot start with '-'")
        if "@" in host and ":" in host.rsplit("@", 1)[0]:
            raise SyncError("refusing a remote URL with a password in it (it would be stored in the history "
                            "database and shown in every report); use git's credential helper or ssh keys")
        return url
    if url.startswith("/"):
        return url
    if re.match(r"^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:", url) and not url.split("@", 1)[1].startswith("-"):
        return url  # scp-like ssh
    raise SyncError(f"refusing remote {bounded(url, 80)!r}: use file:///path, an absolute path, ssh://, "
                    "user@host:path, git:// or https://")


def clone_dir(home: Path, url: str) -> Path:
    """``BINKS_HOME/selfheal/sync/<16 hex of the url's sha256>``: named by the url we were given, never by
    anything the remote holds."""
    return Path(home) / "selfheal" / "sync" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _env() -> dict[str, str]:
    env = {**identity_env(), "GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_PROTOCOLS), "GIT_TERMINAL_PROMPT": "0",
           "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    if not os.environ.get("GIT_SSH_COMMAND"):
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
    return env


_BOILERPLATE = ("Please make sure you have the correct access rights", "and the repository exists",
                "hint:", "To ", "Done")


def _reason(exc: Any) -> str:
    """git's reason on one line: its first two meaningful stderr lines (``ssh: Could not resolve
    hostname x`` before ``fatal: Could not read from remote repository.``), without boilerplate."""
    text = str(exc.stderr or "").strip()
    if text.startswith("stderr:"):
        text = text[len("stderr:"):].strip().strip("'")
    lines = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith(_BOILERPLATE) or line.startswith("warning:"):
            continue
        for prefix in ("fatal:", "error:"):
            if line.startswith(prefix):
                line = line[len(prefix):].strip()
        lines.append(line)
    return "; ".join(lines[:2]) if lines else git_reason(exc)


class _Clone:
    """The bare local copy of the remote; git commands with our identity and protocol limits."""

    def __init__(self, path: Path, url: str):
        self.path, self.url = path, url
        self.repo = git.Repo(path)

    def run(self, *args: str, timeout: float | None = None, what: str | None = None,
            env: dict[str, str] | None = None, **kw: Any) -> Any:
        try:
            return self.repo.git.execute(
                ["git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null",
                 "-c", "protocol.ext.allow=never", *args],
                env={**_env(), "GIT_DIR": str(self.path), **(env or {})}, kill_after_timeout=timeout, **kw)
        except git.GitCommandError as exc:
            raise SyncError(f"{what or 'git ' + args[0]} failed: {bounded(_reason(exc), 240)}") from exc

    def has_ref(self, ref: str) -> bool:
        try:
            self.run("rev-parse", "--verify", "--quiet", ref + "^{commit}")
            return True
        except SyncError:
            return False

    def fetch(self) -> str | None:
        """Fetch the remote; the fetched ``main`` commit (None for a remote without one yet)."""
        try:
            self.run("fetch", "--prune", "--no-tags", "--no-recurse-submodules", "origin",
                     "+refs/heads/*:refs/remotes/origin/*", timeout=NETWORK_TIMEOUT_S,
                     what=f"fetching {bounded(self.url, 120)}")
        except SyncError as exc:
            raise SyncError(f"{exc}; nothing was changed") from None
        ref = f"refs/remotes/origin/{BRANCH}"
        return self.run("rev-parse", ref).strip() if self.has_ref(ref) else None

    def packs(self, commit: str | None, own: str) -> list[tuple[str, bytes | str | None]]:
        """(file name, content) of every other home's pack in the commit's ``packs/`` folder:
        regular files only (no symlink, no subfolder), each read from git's objects."""
        if commit is None:
            return []
        out: list[tuple[str, bytes | str | None]] = []
        total = 0
        listing = self.run("ls-tree", "-z", "-l", commit, "--", f"{PACKS_DIR}/")
        for entry in filter(None, listing.split("\0")):
            meta, _, path = entry.partition("\t")
            mode, kind, sha, size = meta.split()
            name = path[len(PACKS_DIR) + 1:]
            if kind != "blob" or mode != "100644" or not name.endswith(".json") or name == f"{own}.json":
                continue
            if len(out) >= MAX_PACKS or total + int(size) > MAX_TOTAL_BYTES:
                out.append((name, None))
                continue
            if int(size) > MAX_PACK_BYTES:
                out.append((name, b"x" * (MAX_PACK_BYTES + 1)))
                continue
            total += int(size)
            out.append((name, self.run("cat-file", "blob", sha, stdout_as_string=False, strip_newline_in_stdout=False)))
        return out

    def current(self, commit: str | None, own: str) -> bytes | None:
        if commit is None:
            return None
        try:
            return self.run("cat-file", "blob", f"{commit}:{PACKS_DIR}/{own}.json", stdout_as_string=False,
                            strip_newline_in_stdout=False)
        except SyncError:
            return None

    def commit_pack(self, parent: str | None, own: str, content: bytes, message: str) -> str:
        """A commit of ``parent``'s tree with ``packs/<own>.json`` set to ``content`` (git plumbing
        into a private index: nothing is checked out, nothing outside the repository is written)."""
        index = self.path / "selfheal-sync.index"
        blob_file = self.path / "selfheal-sync.blob"
        blob_file.write_bytes(content)
        try:
            env = {"GIT_INDEX_FILE": str(index)}
            if parent is None:
                self.run("read-tree", "--empty", env=env)
            else:
                self.run("read-tree", parent, env=env)
            blob = self.run("hash-object", "-w", "--", str(blob_file)).strip()
            self.run("update-index", "--add", "--cacheinfo", f"100644,{blob},{PACKS_DIR}/{own}.json", env=env)
            tree = self.run("write-tree", env=env).strip()
            args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
            return self.run(*args).strip()
        finally:
            for f in (index, blob_file):
                f.unlink(missing_ok=True)

    def push(self, commit: str) -> tuple[bool, str]:
        """(pushed, reason): False with git's reason when the remote refused; a non-fast-forward
        is reported as such so the caller can fetch and retry."""
        try:
            self.run("push", "--porcelain", "origin", f"{commit}:refs/heads/{BRANCH}", timeout=NETWORK_TIMEOUT_S,
                     what=f"pushing to {bounded(self.url, 120)}")
            return True, ""
        except SyncError as exc:
            cause = exc.__cause__
            text = str(getattr(cause, "stdout", "") or "") + str(getattr(cause, "stderr", "") or "")
            if any(k in text for k in ("non-fast-forward", "fetch first", "stale info", "cannot lock ref")):
                return False, "non-fast-forward"
            refused = [line.split("\t")[-1].strip() for line in str(getattr(cause, "stdout", "") or "").splitlines()
                       if line.startswith("!")]
            if refused:  # --porcelain: "!<TAB>src:dst<TAB>[remote rejected] (pre-receive hook declined)"
                raise SyncError(f"{bounded(self.url, 120)} refused our push: {bounded(refused[0], 200)}; "
                                "nothing was changed") from None
            raise SyncError(f"{exc}; nothing was changed") from None


def open_clone(home: Path, url: str) -> tuple[_Clone, bool]:
    """The bare clone for ``url`` (made when missing: ``git init --bare`` + ``origin``), and
    whether it was made now (a failed first sync removes it again)."""
    path = clone_dir(home, url)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    gi = parent / ".gitignore"
    if not gi.exists():
        gi.write_text(SYNC_GITIGNORE, encoding="utf-8")
    created = False
    if not (path / "HEAD").is_file():
        if path.exists() or path.is_symlink():
            raise SyncError(f"{path} exists but is not a sync clone; remove it and sync again")
        try:
            git.Repo.init(path, bare=True)
        except (OSError, git.GitCommandError) as exc:
            raise SyncError(f"cannot create the sync clone in {path}: {exc}") from None
        created = True
    clone = _Clone(path, url)
    try:
        have = clone.run("config", "--get", "remote.origin.url").strip()
    except SyncError:
        have = None
    if have is None:
        clone.run("config", "remote.origin.url", url)
    elif have != url:
        raise SyncError(f"{path} belongs to another remote; remove it and sync again")
    return clone, created


def remembered_remote(conn: sqlite3.Connection, home: Path) -> str:
    """The last remote a person synced with. Read from the database, so it must still have its
    clone here with the same url (a tampered row cannot send our packs somewhere new)."""
    url = get_state(conn, REMOTE_KEY)
    if not url:
        raise SyncError(f"no sync remote yet: {step('sync', remote='URL')} (remembered afterwards)")
    check_remote(url)
    path = clone_dir(home, url)
    try:
        same = (path / "HEAD").is_file() and _Clone(path, url).run("config", "--get", "remote.origin.url") == url
    except (SyncError, git.InvalidGitRepositoryError, git.NoSuchPathError):
        same = False
    if not same:
        raise SyncError("the remembered sync remote has no clone in this home; give it again with --remote URL")
    return url


def sync(conn: sqlite3.Connection, settings: Settings, remote: str | None, now: datetime, *,
         before_push: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fetch, read every other home's pack, write ours, commit, push (one retry after a
    non-fast-forward), then merge what was read in one transaction. Refusals change nothing."""
    url = check_remote(remote) if remote is not None else remembered_remote(conn, settings.home)
    own = own_home_id(conn)
    lock = FileLock(str(lock_dir(settings.home) / "sync.lock"))
    try:
        lock.acquire(timeout=30)
    except Timeout:
        raise SyncError("another sync of this home is running; nothing was changed, try again") from None
    try:
        return _sync_locked(conn, settings, url, own, now, before_push)
    finally:
        lock.release()


def _sync_locked(conn: sqlite3.Connection, settings: Settings, url: str, own: str, now: datetime,
                 before_push: Callable[[], None] | None) -> dict[str, Any]:
    clone, created = open_clone(settings.home, url)
    try:
        attempts, pushed = 0, False
        while True:
            attempts += 1
            head = clone.fetch()
            foreign, read, refused, dropped = [], [], [], 0
            for name, content in clone.packs(head, own):
                if content is None:
                    refused.append({"pack": bounded(name, 80), "reason": f"over the limit of {MAX_PACKS} packs or "
                                    f"{MAX_TOTAL_BYTES // (1024 * 1024)} MiB read per sync"})
                    continue
                try:
                    home, rules = parse_pack(content, f"{PACKS_DIR}/{name}", now)
                    if name != f"{home}.json":  # each home writes only its own file
                        raise PackError(f"{PACKS_DIR}/{bounded(name, 80)!r} holds the pack of home {home}; "
                                        f"a home's pack is {PACKS_DIR}/<its id>.json")
                except PackError as exc:
                    refused.append({"pack": bounded(name, 80), "reason": str(exc)})
                    continue
                mine, n = _foreign(rules, own, home)
                foreign.extend(mine)
                dropped += n
                read.append(bounded(name, 80))
            foreign = _combine(foreign)
            ours, skipped = export_pack(conn, now)
            content = _pack_bytes(_with(ours, foreign))
            previous = clone.current(head, own)
            if previous is not None and _same_rules(previous, content):
                break  # our pack on the remote already says this: nothing to push
            commit = clone.commit_pack(head, own, content,
                                       f"selfheal fix pack of home {own}: {len(json.loads(content)['rules'])} rule(s)")
            if before_push is not None:
                before_push()
            ok, _ = clone.push(commit)
            if ok:
                pushed = True
                break
            if attempts >= 2:
                raise SyncError(f"pushing to {bounded(url, 120)} was rejected twice (other homes pushed meanwhile); "
                                "nothing was changed, sync again")
        report = merge_rules(conn, foreign)
        with write_transaction(conn):
            set_state(conn, REMOTE_KEY, url)
            set_state(conn, LAST_SYNC_KEY, format_timestamp(now))
    except BaseException:
        if created:
            shutil.rmtree(clone.path, ignore_errors=True)
        raise
    return {"remote": url, "home": own, "clone": str(clone.path), "packs_read": read, "packs_refused": refused,
            "pushed": pushed, "attempts": attempts, "own_entries_ignored": dropped, "skipped_rules": skipped,
            **report}


def _with(ours: dict[str, Any], foreign: list[Rule]) -> dict[str, Any]:
    """Our pack with the foreign rules merged in (what our table will hold after this sync)."""
    rules = {r["id"]: r for r in ours["rules"]}
    for rule in foreign:
        have = rules.get(rule.id)
        if have is None:
            rules[rule.id] = _portable(rule)
        else:
            rules[rule.id] = {**have, "evidence": merge_evidence(have["evidence"], rule.evidence, rule.relayed)}
    return {**ours, "rules": [rules[k] for k in sorted(rules)]}


def _pack_bytes(pack: dict[str, Any]) -> bytes:
    return (json.dumps(pack, indent=1, sort_keys=True) + "\n").encode()


def _same_rules(previous: bytes, content: bytes) -> bool:
    try:
        return json.loads(previous).get("rules") == json.loads(content).get("rules")
    except (ValueError, AttributeError):
        return False



def sync_remembered(conn: sqlite3.Connection, settings: Settings, now: datetime) -> dict[str, Any] | None:
    """The daemon's sync: with the remembered remote when a person set one (None when not)."""
    if not get_state(conn, REMOTE_KEY):
        return None
    return sync(conn, settings, None, now)
