"""Edits of ``config.toml`` that leave every other byte as it was.

A proposal's config changes are data (``{"kind": "config", "file": "config.toml", "path":
[...], "op": "set", "value": ...}``). :func:`edit_config` applies them with tomlkit, which
keeps comments, order, quoting and spacing of everything it does not touch, records what
each key held before (so a rollback can restore it), and then checks its own work: the
result must parse and mean exactly "the old file plus these changes".

tomlkit appends a new table straight before the next table header; we add the blank line
a person would have typed (DESIGN "Pitfalls: tomlkit"). tomlkit keeps the line endings of the
lines it leaves alone but writes new lines with a bare ``\n``: new and rewritten lines get the
file's own line ending (``\r\n`` in a CRLF file), so a CRLF config changes only where a key
changes. Callers must read the file with ``newline=""`` (no newline translation).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from selfheal_plugin.errors import ConfigError, SelfHealError
from selfheal_plugin.history import schema
from selfheal_plugin.history.settings import change_key_problem, check_tool_tables
from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.plugins.strategy import config_change_text, dotted_key, format_value  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from tomlkit.toml_document import TOMLDocument

# imported when a config is edited, not by every command that loads the lifecycle
tomlkit, tomlkit_items = lazy_module("tomlkit"), lazy_module("tomlkit.items")

ALLOWED_FILES = ("config.toml",)


class ChangeError(SelfHealError):
    """A proposal's change is not one selfheal may apply (bad file, path or value)."""


@dataclass
class ConfigChange:
    path: tuple[str, ...]
    op: str  # "set" | "delete"
    value: Any = None

    def key(self) -> str:
        return dotted_key(self.path)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "config", "file": "config.toml", "path": list(self.path), "op": self.op}
        if self.op == "set":
            d["value"] = self.value
        return d


@dataclass
class Edit:
    """The result of editing a config text."""

    old_text: str | None
    new_text: str
    # per change: {"path": [...], "existed": bool, "old": value|None, "new": value|None, "op": ...}
    entries: list[dict[str, Any]] = field(default_factory=list)
    created_tables: list[list[str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.new_text != (self.old_text or "")


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_toml_value(value: Any) -> bool:
    if isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_toml_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_toml_value(v) for k, v in value.items())
    return False


def split_changes(changes: list[Any]) -> tuple[list[ConfigChange], list[str]]:
    """Validate a proposal's changes; return (config edits, manual steps).

    Raises :class:`ChangeError` for anything selfheal may not write: another file than
    ``config.toml`` (absolute paths, ``..``), an empty path, an unknown op, a value TOML
    cannot hold, or a key outside what a proposal may change
    (:func:`~selfheal_plugin.history.settings.change_key_problem`: only the ``[tools."NAME"]``
    and ``[servers."NAME"]`` keys ToolPolicy reads; never ``[self_heal]``, ``[canary]``,
    ``[shadow]``, ``[ab]`` or a command). Every change a proposal, a fix rule or an A/B arm
    brings passes here, when it is proposed and again when it is tested or applied; the
    canary, shadow and A/B commands build their own sections as :class:`ConfigChange`.
    """
    config: list[ConfigChange] = []
    manual: list[str] = []
    for i, raw in enumerate(changes or [], 1):
        ch = raw.to_dict() if hasattr(raw, "to_dict") else raw
        if not isinstance(ch, dict):
            raise ChangeError(f"change {i} is not an object: {ch!r}")
        kind = ch.get("kind")
        if kind == "manual":
            text = ch.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ChangeError(f"change {i}: a manual step needs its text")
            manual.append(text.strip())
            continue
        if kind != "config":
            raise ChangeError(f"change {i}: unknown kind {kind!r} (expected config or manual)")
        file = ch.get("file") or "config.toml"
        f = PurePosixPath(str(file))
        if f.is_absolute() or ".." in f.parts or str(f) not in ALLOWED_FILES:
            raise ChangeError(f"change {i}: selfheal only edits {', '.join(ALLOWED_FILES)} in BINKS_HOME, "
                              f"not {file!r}")
        path = ch.get("path")
        if not isinstance(path, list) or not path or not all(isinstance(p, str) and p for p in path):
            raise ChangeError(f"change {i}: path must be a non-empty list of keys, got {path!r}")
        op = ch.get("op") or "set"
        if op not in ("set", "delete"):
            raise ChangeError(f"change {i}: unknown op {op!r} (expected set or delete)")
        value = ch.get("value")
        if op == "set" and not _is_toml_value(value):
            raise ChangeError(f"change {i}: {value!r} is not a TOML value")
        if (problem := change_key_problem(path, op, value)) is not None:
            raise ChangeError(f"change {i}: {schema.short_text(dotted_key(path))} {problem}")
        config.append(ConfigChange(tuple(path), op, value if op == "set" else None))
    return config, manual


def refused_values(config: dict[str, Any], where: str | Path) -> str | None:
    """What the runtime's ToolPolicy would refuse in ``config`` (parsed), by the schema it
    validates with (:func:`~selfheal_plugin.history.settings.check_tool_tables`): the first
    wrong ``[tools]``/``[servers]`` value and how many more, or None."""
    _, problems = check_tool_tables(config, Path(where))
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def check_changes(changes: list[Any], config: dict[str, Any]) -> None:
    """Refuse, before a proposal is stored, changes ``apply`` would refuse: :func:`split_changes`'s
    rules (another file, a key other than the ``[tools]``/``[servers]`` settings ToolPolicy
    reads, a value TOML cannot hold) and a ``[tools]``/``[servers]``
    value the runtime refuses in ``config`` (the parsed config.toml, its wrong values already
    left out) with the changes made. :class:`ChangeError` with the first problem."""
    edits, _manual = split_changes(changes)
    after = copy.deepcopy(config)
    for change in edits:
        _set_plain(after, change)
    if (refused := refused_values(after, "config.toml")) is not None:
        raise ChangeError(f"the change would write a value the runtime refuses: {refused}")


def parse_config_text(text: str | None, where: str = "config.toml") -> dict[str, Any]:
    """The file as plain data; :class:`ConfigError` when it does not parse."""
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc}); fix it first, nothing was changed") from exc


_MISSING = object()


def lookup(data: dict[str, Any], path: tuple[str, ...] | list[str]) -> Any:
    """The value at ``path`` in parsed TOML, or the module's missing marker."""
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def is_missing(value: Any) -> bool:
    return value is _MISSING


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _set_plain(data: dict[str, Any], change: ConfigChange) -> None:
    node = data
    for i, key in enumerate(change.path[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ChangeError(f"{dotted_key(change.path[:i + 1])} is not a table; {change.key()} cannot be set")
    if change.op == "set":
        node[change.path[-1]] = copy.deepcopy(change.value)
    else:
        node.pop(change.path[-1], None)


def _descend(doc: TOMLDocument, path: tuple[str, ...], create: bool, created: list[list[str]]) -> Any:
    """The table holding ``path[-1]``; creates missing tables when ``create``."""
    container: Any = doc
    for depth, key in enumerate(path[:-1]):
        if key in container:
            item = container[key]
            if isinstance(item, tomlkit_items.AoT) or not isinstance(
                item, (tomlkit_items.Table, tomlkit_items.InlineTable, dict)):
                where = dotted_key(path[: depth + 1])
                raise ChangeError(f"cannot set {dotted_key(path)}: {where} is not a table in config.toml")
            container = item
            continue
        if not create:
            return None
        # Intermediate tables that only hold tables (``tools``) become super tables, so
        # the file gets ``[tools."x"]`` rather than an empty ``[tools]`` header.
        table = tomlkit.table(is_super_table=depth < len(path) - 2)
        container[key] = table
        created.append(list(path[: depth + 1]))
        container = container[key]
    return container


def _header_path(line: str) -> list[str] | None:
    """The key path of a ``[a."b.c"]`` header line, None for other lines."""
    s = line.strip()
    if not s.startswith("[") or s.startswith("[["):
        return None
    try:
        data = tomllib.loads(s.split("#", 1)[0] if '"' not in s else s)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    node: Any = data
    while isinstance(node, dict) and len(node) == 1:
        (k, node), = node.items()
        path.append(k)
    return path


def line_ending(text: str | None) -> str:
    """The file's line ending: ``\r\n`` when most of its lines end so, else ``\n``."""
    if not text:
        return "\n"
    crlf = text.count("\r\n")
    return "\r\n" if crlf > text.count("\n") - crlf else "\n"


def match_line_endings(old_text: str | None, new_text: str) -> str:
    """Give the lines ``new_text`` adds or rewrites (compared with ``old_text``) the old
    file's line ending; lines that stayed keep theirs, byte for byte."""
    eol = line_ending(old_text)
    if eol == "\n":
        return new_text
    old_lines = (old_text or "").splitlines(keepends=True)
    new_lines = new_text.splitlines(keepends=True)
    out: list[str] = []
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        for line in new_lines[j1:j2]:
            if tag != "equal" and line.endswith("\n") and not line.endswith("\r\n"):
                line = line[:-1] + eol
            out.append(line)
    return "".join(out)


def _space_new_tables(text: str, created: list[list[str]]) -> str:
    """Put a blank line before each new table header and before the header that follows it."""
    if not created:
        return text
    wanted = [list(p) for p in created]
    lines = text.split("\n")
    headers = [(i, _header_path(line)) for i, line in enumerate(lines)]
    header_idx = [i for i, p in headers if p is not None]
    need_blank: set[int] = set()
    for i, p in headers:
        if p is None or p not in wanted:
            continue
        need_blank.add(i)
        nxt = [j for j in header_idx if j > i]
        if nxt:
            need_blank.add(nxt[0])
    out: list[str] = []
    for i, line in enumerate(lines):
        if i in need_blank and out and out[-1].strip() != "":
            out.append("")
        out.append(line)
    return "\n".join(out)


def edit_config(old_text: str | None, changes: list[ConfigChange], where: str = "config.toml") -> Edit:
    """Apply ``changes`` to a config text (None: the file does not exist yet).

    Every byte outside the changed keys (and new tables) stays identical. The result is
    re-parsed and compared with the old data plus the changes; any difference is an error
    and nothing is written.
    """
    before = parse_config_text(old_text, where)
    doc = tomlkit.parse(old_text or "")
    created: list[list[str]] = []
    entries: list[dict[str, Any]] = []
    for change in changes:
        old_value = lookup(before, change.path)
        container = _descend(doc, change.path, change.op == "set", created)
        leaf = change.path[-1]
        if change.op == "set":
            container[leaf] = change.value
        elif container is not None and leaf in container:
            del container[leaf]
        entries.append({"path": list(change.path), "op": change.op,
                        "existed": not is_missing(old_value),
                        "old": None if is_missing(old_value) else old_value,
                        "new": change.value if change.op == "set" else None})
    new_text = match_line_endings(old_text, _space_new_tables(tomlkit.dumps(doc), created))
    expected = copy.deepcopy(before)
    for change in changes:
        _set_plain(expected, change)
    if parse_config_text(new_text, where) != expected:
        raise ConfigError(f"editing {where} with tomlkit did not give the intended content; nothing was changed")
    return Edit(old_text, new_text, entries, created)


def inverse_changes(entries: list[dict[str, Any]]) -> list[ConfigChange]:
    """The changes that undo an :class:`Edit` (previous values back, new keys deleted)."""
    out = []
    for e in reversed(entries):
        path = tuple(e["path"])
        out.append(ConfigChange(path, "set", e["old"]) if e["existed"] else ConfigChange(path, "delete"))
    return out


def conflicts_with(current: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is no longer what the apply wrote (a later edit by someone)."""
    problems = []
    for e in entries:
        now = lookup(current, e["path"])
        if e["op"] == "set":
            if is_missing(now):
                problems.append(f"{dotted_key(e['path'])} was removed (selfheal set {format_value(e['new'])})")
            elif now != e["new"]:
                problems.append(f"{dotted_key(e['path'])} is now {format_value(now)} "
                                f"(selfheal set {format_value(e['new'])})")
        elif not is_missing(now):
            problems.append(f"{dotted_key(e['path'])} was set again to {format_value(now)} (selfheal deleted it)")
    return problems


def remove_empty_tables(text: str, tables: list[list[str]]) -> str:
    """Drop the headers of tables an apply created once nothing is left in them.

    Works on the text (deepest table first): the empty table's header line goes, with
    the blank line selfheal put before it; every other line stays as it is.
    """
    for path in sorted(tables, key=len, reverse=True):
        if lookup(parse_config_text(text), path) != {}:
            continue
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if _header_path(line) == list(path):
                start = i - 1 if i > 0 and lines[i - 1].strip() == "" else i
                del lines[start:i + 1]
                break
        text = "\n".join(lines)
    return text


def unified_diff(old_text: str | None, new_text: str | None, name: str = "config.toml") -> str:
    return "".join(difflib.unified_diff(
        (old_text or "").splitlines(keepends=True), (new_text or "").splitlines(keepends=True),
        fromfile=f"a/{name}" if old_text is not None else "/dev/null",
        tofile=f"b/{name}" if new_text is not None else "/dev/null"))


def describe_entries(entries: list[dict[str, Any]]) -> list[str]:
    """``tools.x.timeout_ms: 60000 → 90000`` per edited key."""
    return [config_change_text(e["path"], e["old"], e["new"], existed=e["existed"], removed=e["op"] != "set")
            for e in entries]
