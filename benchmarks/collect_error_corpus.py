"""Re-create ``tests/data/mcp_error_corpus.jsonl``: real error messages from real MCP servers.

Installs MCP servers that people run from the package registries (npm and PyPI) into a
scratch folder outside the repository, starts each one over stdio with the official Python
MCP client (the one selfheal depends on), provokes the failures an agent meets (missing
file, permission denied, a path outside the allowed directories, invalid arguments, a
missing API key, an invalid git repository, the server killed mid-call, a client-side
timeout, a server command that does not exist, HTTP 4xx/5xx from a local web server) and
writes one JSON line per case: what the client saw, the runtime's label for it
(:func:`selfheal_plugin.history.connection.classify_error`) and the failure kind a careful
person assigns.

Run (needs node + npm and network access to the npm registry and PyPI only; CI never runs it)::

    .venv/bin/python benchmarks/collect_error_corpus.py               # install, collect, write
    .venv/bin/python benchmarks/collect_error_corpus.py --no-install  # reuse /tmp/corpus-servers
    .venv/bin/python benchmarks/collect_error_corpus.py --report      # only the baseline table
    .venv/bin/python benchmarks/collect_error_corpus.py --out /tmp/c.jsonl --servers-dir DIR

Nothing here contacts a host other than 127.0.0.1 (the script refuses to start a server
whose arguments or environment name another host): the fetch server is only pointed at a
local ``http.server``, the GitLab server's ``GITLAB_API_URL`` at a stand-in on the same
server that answers with GitLab's statuses (401, 403, 404, 429, 500, 503); servers that
would call an external API otherwise are only provoked where they fail before any network
use (brave-search without its API key).

When run as root the servers run as ``nobody`` (through ``setpriv``) so that file
permissions mean what they mean for a normal user. Paths of this machine are replaced by
placeholders: the scratch sandbox by ``/tmp/corpus``, the servers' folder by
``/opt/mcp-servers``, the local web servers' ports by ``8000`` and ``8001``. Messages
differ between package versions and the SDK (and zod) they resolve; each package is
installed alone, as ``npx -y``/``uvx`` would, and every line records ``server`` as
``package@version`` and ``sdk``.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client

from selfheal_plugin.history.connection import classify_error
from selfheal_plugin.history.errorindex import message_template
from selfheal_plugin.plugins.manager import builtin_folder

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "mcp_error_corpus.jsonl"
SANDBOX_PLACEHOLDER = "/tmp/corpus"
SERVERS_PLACEHOLDER = "/opt/mcp-servers"
PORT_PLACEHOLDER = 8000

NPM_PACKAGES = (
    "@modelcontextprotocol/server-filesystem",
    "@modelcontextprotocol/server-memory",
    "@modelcontextprotocol/server-everything",
    "@modelcontextprotocol/server-sequential-thinking",
    "@modelcontextprotocol/server-postgres",
    "@modelcontextprotocol/server-brave-search",
    "@modelcontextprotocol/server-gitlab",
)
PYPI_PACKAGES = ("mcp-server-fetch", "mcp-server-git", "mcp-server-time")

KINDS = ("missing_resource", "permission", "rate_limited", "transient_upstream", "slow_tail", "hang",
         "server_down", "invalid_arguments", "unknown")


# ---------------------------------------------------------------- the servers


@dataclass(frozen=True)
class Server:
    key: str
    package: str            # registry name
    registry: str           # "npm" | "pypi"
    command: tuple[str, ...]  # relative to the servers dir for npm bins / venv bins; "{x}" filled at run time
    env: tuple[tuple[str, str], ...] = ()


SERVERS = {
    "filesystem": Server("filesystem", "@modelcontextprotocol/server-filesystem", "npm",
                         ("{pkgdir}/node_modules/.bin/mcp-server-filesystem", "{sandbox}/files")),
    "memory": Server("memory", "@modelcontextprotocol/server-memory", "npm",
                     ("{pkgdir}/node_modules/.bin/mcp-server-memory",), (("MEMORY_FILE_PATH", "{sandbox}/memory/graph.jsonl"),)),
    "memory-readonly": Server("memory-readonly", "@modelcontextprotocol/server-memory", "npm",
                              ("{pkgdir}/node_modules/.bin/mcp-server-memory",),
                              (("MEMORY_FILE_PATH", "{sandbox}/readonly/graph.jsonl"),)),
    "everything": Server("everything", "@modelcontextprotocol/server-everything", "npm",
                         ("{pkgdir}/node_modules/.bin/mcp-server-everything",), (("GZIP_ALLOWED_DOMAINS", "127.0.0.1"), ("GZIP_MAX_FETCH_TIME_MILLIS", "1000"))),
    "sequential-thinking": Server("sequential-thinking", "@modelcontextprotocol/server-sequential-thinking", "npm",
                                  ("{pkgdir}/node_modules/.bin/mcp-server-sequential-thinking",)),
    "postgres": Server("postgres", "@modelcontextprotocol/server-postgres", "npm",
                       ("{pkgdir}/node_modules/.bin/mcp-server-postgres", "postgresql://agent:secret@127.0.0.1:1/app")),
    "brave-search": Server("brave-search", "@modelcontextprotocol/server-brave-search", "npm",
                           ("{pkgdir}/node_modules/.bin/mcp-server-brave-search",)),
    # GITLAB_API_URL always points at the local stand-in (GITLAB_API below), never at a real GitLab.
    "gitlab": Server("gitlab", "@modelcontextprotocol/server-gitlab", "npm",
                     ("{pkgdir}/node_modules/.bin/mcp-server-gitlab",),
                     (("GITLAB_API_URL", "{web}/gitlab/api/v4"), ("GITLAB_PERSONAL_ACCESS_TOKEN", "glpat-corpus-valid"))),
    "gitlab-revoked": Server("gitlab-revoked", "@modelcontextprotocol/server-gitlab", "npm",
                             ("{pkgdir}/node_modules/.bin/mcp-server-gitlab",),
                             (("GITLAB_API_URL", "{web}/gitlab/api/v4"),
                              ("GITLAB_PERSONAL_ACCESS_TOKEN", "glpat-corpus-revoked"))),
    "gitlab-unreachable": Server("gitlab-unreachable", "@modelcontextprotocol/server-gitlab", "npm",
                                 ("{pkgdir}/node_modules/.bin/mcp-server-gitlab",),
                                 (("GITLAB_API_URL", "http://127.0.0.1:1/api/v4"),
                                  ("GITLAB_PERSONAL_ACCESS_TOKEN", "glpat-corpus-valid"))),
    "gitlab-notoken": Server("gitlab-notoken", "@modelcontextprotocol/server-gitlab", "npm",
                             ("{pkgdir}/node_modules/.bin/mcp-server-gitlab",),
                             (("GITLAB_API_URL", "{web}/gitlab/api/v4"),)),
    "fetch": Server("fetch", "mcp-server-fetch", "pypi", ("{pkgdir}/bin/mcp-server-fetch", "--allow-private-ips")),
    "fetch-default": Server("fetch-default", "mcp-server-fetch", "pypi", ("{pkgdir}/bin/mcp-server-fetch",)),
    "git": Server("git", "mcp-server-git", "pypi", ("{pkgdir}/bin/mcp-server-git",)),
    "git-restricted": Server("git-restricted", "mcp-server-git", "pypi",
                             ("{pkgdir}/bin/mcp-server-git", "--repository", "{sandbox}/repo")),
    "time": Server("time", "mcp-server-time", "pypi", ("{pkgdir}/bin/mcp-server-time",)),
    "missing-command": Server("missing-command", "(none)", "none", ("mcp-server-does-not-exist",)),
    "missing-script": Server("missing-script", "@modelcontextprotocol/server-filesystem", "npm",
                             ("node", "{pkgdir}/node_modules/@modelcontextprotocol/server-filesystem/dist/main.js",
                              "{sandbox}/files")),
}


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    server: str
    tool: str
    arguments: dict[str, Any]
    expected_kind: str
    provoked: str
    timeout: float = 20.0       # client-side read timeout of the call
    action: str = "call"        # "call" | "kill" (kill the server 1 s into the call) | "after_kill"
    note: str = ""


S = SANDBOX_PLACEHOLDER
GITLAB_ZOD_NOTE = ("the server formats zod 3's error.errors; the zod npm resolves for it today (4.x) has none, "
                   "so the validation error becomes a TypeError: the cause (an invalid argument) is lost")
GITLAB_NOTE = ("the server's message for the status a local stand-in for the GitLab API answered "
               "(GitLab's status codes and bodies; the server reports only the status text)")
URL = f"http://127.0.0.1:{PORT_PLACEHOLDER}"
URL_ROBOTS403 = f"http://127.0.0.1:{PORT_PLACEHOLDER + 1}"

CASES: tuple[Case, ...] = (
    # filesystem ------------------------------------------------------------------------
    Case("fs-missing-file", "filesystem", "read_text_file", {"path": f"{S}/files/notes/missing.md"},
         "missing_resource", "read a file that does not exist"),
    Case("fs-missing-dir", "filesystem", "list_directory", {"path": f"{S}/files/reports/q3"},
         "missing_resource", "list a directory that does not exist"),
    Case("fs-missing-info", "filesystem", "get_file_info", {"path": f"{S}/files/build/output.log"},
         "missing_resource", "stat a file that does not exist"),
    Case("fs-missing-edit", "filesystem", "edit_file",
         {"path": f"{S}/files/src/legacy.py", "edits": [{"oldText": "a", "newText": "b"}]},
         "missing_resource", "edit a file that does not exist"),
    Case("fs-missing-move", "filesystem", "move_file",
         {"source": f"{S}/files/draft.md", "destination": f"{S}/files/final.md"},
         "missing_resource", "move a file that does not exist"),
    Case("fs-edit-no-match", "filesystem", "edit_file",
         {"path": f"{S}/files/readme.md", "edits": [{"oldText": "text that is not there", "newText": "x"}]},
         "invalid_arguments", "edit with an oldText the file does not contain"),
    Case("fs-permission-read", "filesystem", "read_text_file", {"path": f"{S}/files/secret.txt"},
         "permission", "read a file with mode 000"),
    Case("fs-permission-write", "filesystem", "write_file", {"path": f"{S}/files/locked/out.txt", "content": "x"},
         "permission", "write into a directory owned by root, mode 755"),
    Case("fs-permission-list", "filesystem", "list_directory", {"path": f"{S}/files/private"},
         "permission", "list a directory with mode 700 owned by root"),
    Case("fs-outside-allowed", "filesystem", "read_text_file", {"path": "/etc/hostname"},
         "permission", "read a path outside the allowed directories"),
    Case("fs-outside-traversal", "filesystem", "list_directory", {"path": f"{S}/files/../other"},
         "permission", "list a path that climbs out of the allowed directory"),
    Case("fs-outside-write", "filesystem", "write_file", {"path": f"{S}/other/out.txt", "content": "x"},
         "permission", "write a path outside the allowed directories"),
    Case("fs-missing-arg", "filesystem", "read_text_file", {},
         "invalid_arguments", "call without the required path"),
    Case("fs-wrong-type", "filesystem", "read_text_file", {"path": 42},
         "invalid_arguments", "path given as a number"),
    Case("fs-wrong-type-array", "filesystem", "read_multiple_files", {"paths": f"{S}/files/readme.md"},
         "invalid_arguments", "paths given as a string instead of an array"),
    Case("fs-unknown-tool", "filesystem", "delete_file", {"path": f"{S}/files/readme.md"},
         "invalid_arguments", "call a tool the server does not have"),
    Case("fs-read-dir-as-file", "filesystem", "read_text_file", {"path": f"{S}/files/notes"},
         "invalid_arguments", "read a directory as a file"),
    # memory ----------------------------------------------------------------------------
    Case("memory-missing-entity", "memory", "add_observations",
         {"observations": [{"entityName": "Project Apollo", "contents": ["launched"]}]},
         "missing_resource", "add observations to an entity that does not exist"),
    Case("memory-missing-arg", "memory", "create_entities", {},
         "invalid_arguments", "call without the required entities"),
    Case("memory-wrong-shape", "memory", "create_entities", {"entities": [{"name": "x"}]},
         "invalid_arguments", "entity without entityType and observations"),
    Case("memory-unknown-tool", "memory", "delete_graph", {},
         "invalid_arguments", "call a tool the server does not have"),
    Case("memory-readonly-store", "memory-readonly", "create_entities",
         {"entities": [{"name": "x", "entityType": "note", "observations": []}]},
         "permission", "MEMORY_FILE_PATH in a directory the server may not write"),
    # everything ------------------------------------------------------------------------
    Case("everything-wrong-type", "everything", "get-sum", {"a": "one", "b": 2},
         "invalid_arguments", "a number given as a string"),
    Case("everything-missing-arg", "everything", "get-sum", {"a": 1},
         "invalid_arguments", "call without the required b"),
    Case("everything-bad-enum", "everything", "get-structured-content", {"location": "Paris"},
         "invalid_arguments", "a value outside the enum"),
    Case("everything-unknown-tool", "everything", "add", {"a": 1, "b": 2},
         "invalid_arguments", "call a tool the server does not have"),
    Case("everything-gzip-hang", "everything", "gzip-file-as-resource",
         {"name": "slow.gz", "data": f"{URL}/hang"},
         "hang", "compress a URL that never answers (GZIP_MAX_FETCH_TIME_MILLIS=1000)"),
    Case("everything-gzip-refused", "everything", "gzip-file-as-resource",
         {"name": "down.gz", "data": "http://127.0.0.1:1/README.md"},
         "transient_upstream", "compress a URL on a local port nothing listens on"),
    Case("everything-gzip-protocol", "everything", "gzip-file-as-resource",
         {"name": "passwd.gz", "data": "file:///etc/passwd"},
         "invalid_arguments", "a URL scheme the tool does not support"),
    Case("everything-gzip-domain", "everything", "gzip-file-as-resource",
         {"name": "readme.gz", "data": "https://example.com/README.md"},
         "permission", "a domain outside GZIP_ALLOWED_DOMAINS (refused before any network use)"),
    Case("everything-slow-timeout", "everything", "trigger-long-running-operation", {"duration": 6, "steps": 3},
         "slow_tail", "a 6 s operation called with a 1.5 s client-side timeout", timeout=1.5,
         note="the message alone cannot tell a slow tail from a hang; the kind is what the case is"),
    Case("everything-killed", "everything", "trigger-long-running-operation", {"duration": 10, "steps": 5},
         "server_down", "the server process killed (SIGKILL) 1 s into the call", action="kill"),
    Case("everything-after-kill", "everything", "echo", {"message": "hello"},
         "server_down", "the next call on the session of the killed server", action="after_kill"),
    # sequential-thinking ---------------------------------------------------------------
    Case("thinking-missing-args", "sequential-thinking", "sequentialthinking", {"thought": "step one"},
         "invalid_arguments", "call without the required counters"),
    Case("thinking-bad-number", "sequential-thinking", "sequentialthinking",
         {"thought": "step", "nextThoughtNeeded": True, "thoughtNumber": 0, "totalThoughts": 3},
         "invalid_arguments", "thoughtNumber below its minimum"),
    # postgres (nothing listens on 127.0.0.1:1) -------------------------------------------
    Case("postgres-refused", "postgres", "query", {"sql": "SELECT 1"},
         "transient_upstream", "the database the server connects to refuses connections",
         note="the MCP server is up; its database is not"),
    Case("postgres-missing-sql", "postgres", "query", {},
         "transient_upstream", "call without the sql argument",
         note="the server connects before it reads the arguments, so the missing sql is never reported"),
    # brave-search without BRAVE_API_KEY --------------------------------------------------
    Case("brave-no-key", "brave-search", "brave_web_search", {"query": "mcp"},
         "server_down", "the server started without its API key (exits before any network use)",
         note="the client only sees the connection close; the missing key is named only on the server's stderr"),
    # gitlab (its API answered by a local stand-in that returns GitLab's statuses) -------------
    Case("gitlab-missing-project", "gitlab", "get_file_contents", {"project_id": "acme/missing", "file_path": "README.md"},
         "missing_resource", "a project that does not exist (API: 404 Project Not Found)", note=GITLAB_NOTE),
    Case("gitlab-missing-file", "gitlab", "get_file_contents", {"project_id": "acme/app", "file_path": "docs/old.md"},
         "missing_resource", "a file that does not exist (API: 404 File Not Found)", note=GITLAB_NOTE),
    Case("gitlab-forbidden", "gitlab", "create_issue", {"project_id": "acme/private", "title": "Flaky deploy"},
         "permission", "a project the token may not write (API: 403)", note=GITLAB_NOTE),
    Case("gitlab-rate-limited-search", "gitlab", "search_repositories", {"search": "mcp"},
         "rate_limited", "the API's rate limit (API: 429, Retry-After: 60)", note=GITLAB_NOTE),
    Case("gitlab-rate-limited-file", "gitlab", "get_file_contents", {"project_id": "acme/busy", "file_path": "README.md"},
         "rate_limited", "the API's rate limit (API: 429, Retry-After: 60)", note=GITLAB_NOTE),
    Case("gitlab-rate-limited-issue", "gitlab", "create_issue", {"project_id": "acme/busy", "title": "Flaky deploy"},
         "rate_limited", "the API's rate limit (API: 429, Retry-After: 60)", note=GITLAB_NOTE),
    Case("gitlab-500", "gitlab", "get_file_contents", {"project_id": "acme/broken", "file_path": "README.md"},
         "transient_upstream", "the API fails (API: 500)", note=GITLAB_NOTE),
    Case("gitlab-503", "gitlab", "create_branch", {"project_id": "acme/maintenance", "branch": "fix/deploy"},
         "transient_upstream", "the API is in maintenance (API: 503)", note=GITLAB_NOTE),
    Case("gitlab-missing-arg", "gitlab", "get_file_contents", {"project_id": "acme/app"},
         "unknown", "call without the required file_path", note=GITLAB_ZOD_NOTE),
    Case("gitlab-wrong-type", "gitlab", "search_repositories", {"search": "mcp", "page": "two"},
         "unknown", "page given as a string", note=GITLAB_ZOD_NOTE),
    Case("gitlab-unknown-tool", "gitlab", "delete_repository", {"project_id": "acme/app"},
         "invalid_arguments", "call a tool the server does not have"),
    Case("gitlab-bad-token", "gitlab-revoked", "get_file_contents", {"project_id": "acme/app", "file_path": "README.md"},
         "permission", "a revoked access token (API: 401)", note=GITLAB_NOTE),
    Case("gitlab-bad-token-search", "gitlab-revoked", "search_repositories", {"search": "mcp"},
         "permission", "a revoked access token (API: 401)", note=GITLAB_NOTE),
    Case("gitlab-unreachable", "gitlab-unreachable", "get_file_contents", {"project_id": "acme/app", "file_path": "README.md"},
         "transient_upstream", "GITLAB_API_URL on a local port nothing listens on",
         note="the MCP server is up; the API it calls is not"),
    Case("gitlab-no-token", "gitlab-notoken", "get_file_contents", {"project_id": "acme/app", "file_path": "README.md"},
         "server_down", "the server started without GITLAB_PERSONAL_ACCESS_TOKEN (exits before any network use)",
         note="the client only sees the connection close; the missing token is named only on the server's stderr"),
    # fetch (only 127.0.0.1) ----------------------------------------------------------------
    Case("fetch-private-ip", "fetch-default", "fetch", {"url": f"{URL}/ok.html"},
         "permission", "a local address, the server started without --allow-private-ips"),
    Case("fetch-404", "fetch", "fetch", {"url": f"{URL}/docs/missing.html"},
         "missing_resource", "a page the local server answers with 404"),
    Case("fetch-500", "fetch", "fetch", {"url": f"{URL}/status/500"},
         "transient_upstream", "a page the local server answers with 500"),
    Case("fetch-503", "fetch", "fetch", {"url": f"{URL}/status/503"},
         "transient_upstream", "a page the local server answers with 503"),
    Case("fetch-429", "fetch", "fetch", {"url": f"{URL}/status/429"},
         "rate_limited", "a page the local server answers with 429 and Retry-After: 30"),
    Case("fetch-401", "fetch", "fetch", {"url": f"{URL}/status/401"},
         "permission", "a page the local server answers with 401"),
    Case("fetch-403", "fetch", "fetch", {"url": f"{URL}/status/403"},
         "permission", "a page the local server answers with 403"),
    Case("fetch-robots-403", "fetch", "fetch", {"url": f"{URL_ROBOTS403}/page.html"},
         "permission", "a host whose robots.txt answers 403"),
    Case("fetch-robots-disallow", "fetch", "fetch", {"url": f"{URL}/private/page.html"},
         "permission", "a path robots.txt disallows"),
    Case("fetch-refused", "fetch", "fetch", {"url": "http://127.0.0.1:1/page.html"},
         "transient_upstream", "a local port nothing listens on",
         note="the MCP server is up; the site it fetches is not"),
    Case("fetch-bad-url", "fetch", "fetch", {"url": "not a url"},
         "invalid_arguments", "a URL that is not one"),
    Case("fetch-bad-max-length", "fetch", "fetch", {"url": f"{URL}/ok.html", "max_length": -5},
         "invalid_arguments", "max_length below its minimum"),
    Case("fetch-slow", "fetch", "fetch", {"url": f"{URL}/slow"},
         "slow_tail", "a page that answers after 4 s, called with a 2 s client-side timeout", timeout=2.0,
         note="the message alone cannot tell a slow tail from a hang; the kind is what the case is"),
    Case("fetch-hang", "fetch", "fetch", {"url": f"{URL}/hang"},
         "hang", "a page that never answers, called with a 2 s client-side timeout", timeout=2.0,
         note="the message alone cannot tell a slow tail from a hang; the kind is what the case is"),
    Case("fetch-killed", "fetch", "fetch", {"url": f"{URL}/hang"},
         "server_down", "the server process killed (SIGKILL) 1 s into the call", action="kill"),
    # git -------------------------------------------------------------------------------
    Case("git-not-a-repo", "git", "git_status", {"repo_path": f"{S}/files"},
         "unknown", "a folder that is not a git repository",
         note="InvalidGitRepositoryError: the message is only the path; the cause is a missing repository"),
    Case("git-missing-path", "git", "git_log", {"repo_path": f"{S}/nowhere"},
         "unknown", "a repository path that does not exist",
         note="NoSuchPathError: the message is only the path; the cause is a missing path"),
    Case("git-bad-revision", "git", "git_show", {"repo_path": f"{S}/repo", "revision": "v9.9.9"},
         "missing_resource", "a revision that does not exist"),
    Case("git-missing-branch", "git", "git_checkout", {"repo_path": f"{S}/repo", "branch_name": "feature/missing"},
         "missing_resource", "check out a branch that does not exist"),
    Case("git-add-missing-file", "git", "git_add", {"repo_path": f"{S}/repo", "files": ["missing.txt"]},
         "missing_resource", "stage a file that does not exist"),
    Case("git-bad-target", "git", "git_diff", {"repo_path": f"{S}/repo", "target": "no-such-branch"},
         "missing_resource", "diff against a branch that does not exist"),
    Case("git-branch-exists", "git", "git_create_branch", {"repo_path": f"{S}/repo", "branch_name": "main"},
         "invalid_arguments", "create a branch that already exists"),
    Case("git-dubious-owner", "git", "git_status", {"repo_path": f"{S}/rootrepo"},
         "permission", "a repository owned by another user (git's safe.directory check)"),
    Case("git-outside-repository", "git-restricted", "git_status", {"repo_path": f"{S}/other"},
         "permission", "a repo_path outside the --repository the server was started with"),
    Case("git-missing-arg", "git", "git_status", {},
         "invalid_arguments", "call without the required repo_path"),
    Case("git-bad-branch-type", "git", "git_branch", {"repo_path": f"{S}/repo", "branch_type": "everything"},
         "invalid_arguments", "a branch_type the tool does not know"),
    # time ------------------------------------------------------------------------------
    Case("time-bad-timezone", "time", "get_current_time", {"timezone": "Mars/Olympus_Mons"},
         "invalid_arguments", "an IANA timezone that does not exist"),
    Case("time-bad-time", "time", "convert_time",
         {"source_timezone": "Europe/Berlin", "time": "25:99", "target_timezone": "Asia/Tokyo"},
         "invalid_arguments", "a time that is not HH:MM"),
    Case("time-missing-arg", "time", "convert_time", {"source_timezone": "Europe/Berlin", "time": "10:00"},
         "invalid_arguments", "call without the required target_timezone"),
    Case("time-unknown-tool", "time", "get_time", {"timezone": "UTC"},
         "invalid_arguments", "call a tool the server does not have"),
    # launching -------------------------------------------------------------------------
    Case("launch-missing-command", "missing-command", "read_file", {"path": f"{S}/files/readme.md"},
         "server_down", "the configured server command does not exist"),
    Case("launch-missing-script", "missing-script", "read_file", {"path": f"{S}/files/readme.md"},
         "server_down", "node started on a script path that does not exist"),
)


# ---------------------------------------------------------------- local web server


class _Handler(BaseHTTPRequestHandler):
    robots_status = 200

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def _gitlab(self) -> None:
        """A stand-in for the GitLab REST API: the status follows the project, as GitLab's would."""
        if self.headers.get("Authorization") != "Bearer glpat-corpus-valid":
            return self._json(401, {"message": "401 Unauthorized"})
        parts = urlsplit(self.path)
        rest = parts.path[len("/gitlab/api/v4/"):]
        if rest == "projects":
            if parse_qs(parts.query).get("search"):
                return self._json(429, None, {"Retry-After": "60", "RateLimit-Reset": "1767225600"})
            return self._json(200, [])
        project = unquote(rest.split("/")[1]) if rest.startswith("projects/") else ""
        status = {"acme/missing": 404, "acme/private": 403, "acme/busy": 429, "acme/broken": 500,
                  "acme/maintenance": 503}.get(project)
        if status == 404:
            return self._json(404, {"message": "404 Project Not Found"})
        if status == 429:
            return self._json(429, None, {"Retry-After": "60", "RateLimit-Reset": "1767225600"})
        if status:
            return self._json(status, {"message": f"{status} {self.responses[status][0]}"})
        return self._json(404, {"message": "404 File Not Found"})

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"Retry later\n" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if body is None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/gitlab/api/v4/"):
            return self._gitlab()
        self._send(405, "<h1>405</h1>")

    def do_PUT(self) -> None:
        self.do_POST()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/gitlab/api/v4/"):
            self._gitlab()
        elif path == "/robots.txt":
            if self.robots_status != 200:
                self._send(self.robots_status, "<h1>Forbidden</h1>")
            else:
                self._send(200, "User-agent: *\nDisallow: /private/\n")
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            headers = {"Retry-After": "30"} if status == 429 else {}
            self._send(status, f"<html><body><h1>{status}</h1></body></html>", headers)
        elif path == "/slow":
            time.sleep(4)
            self._send(200, "<html><body><p>Slow but fine.</p></body></html>")
        elif path == "/hang":
            time.sleep(60)
            self._send(200, "late")
        elif path in ("/ok.html", "/page.html"):
            self._send(200, "<html><body><p>Hello from the corpus.</p></body></html>")
        else:
            self._send(404, "<html><body><h1>404 Not Found</h1></body></html>")


class _Robots403(_Handler):
    robots_status = 403


def start_http(handler: type) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


# ---------------------------------------------------------------- install


def package_dir(servers_dir: Path, package: str) -> Path:
    """Each package in a folder of its own, resolved alone, as ``npx -y PKG`` or ``uvx PKG`` would."""
    safe = package.replace("@", "").replace("/", "__")
    return servers_dir / ("npm" if package in NPM_PACKAGES else "pypi") / safe


def install(servers_dir: Path) -> None:
    for pkg in NPM_PACKAGES:
        where = package_dir(servers_dir, pkg)
        where.mkdir(parents=True, exist_ok=True)
        if not (where / "package.json").exists():
            (where / "package.json").write_text('{"name": "corpus-server", "private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", pkg], cwd=where, check=True)
    for pkg in PYPI_PACKAGES:
        venv = package_dir(servers_dir, pkg)
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", pkg], check=True)
    # mcp-server-fetch's readabilipy npm-installs its JavaScript on first use, into site-packages:
    # as nobody that fails ("Error executing tool fetch", cause hidden). Do it once here.
    warm = "from readabilipy import simple_json_from_html_string as f; f('<p>x</p>', use_readability=True)"
    subprocess.run([str(package_dir(servers_dir, "mcp-server-fetch") / "bin" / "python"), "-c", warm], check=True)
    # Servers run as nobody when we are root: everything must be readable by them.
    subprocess.run(["chmod", "-R", "a+rX", str(servers_dir)], check=True)


def versions(servers_dir: Path) -> dict[str, tuple[str, str]]:
    """package → (its version, the version of the MCP SDK it runs on)."""
    out: dict[str, tuple[str, str]] = {}
    for pkg in NPM_PACKAGES:
        modules = package_dir(servers_dir, pkg) / "node_modules"
        version = json.loads((modules / pkg / "package.json").read_text())["version"]
        sdk = next((p for p in (modules / pkg / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json",
                                modules / "@modelcontextprotocol" / "sdk" / "package.json") if p.exists()), None)
        out[pkg] = (version, f"@modelcontextprotocol/sdk@{json.loads(sdk.read_text())['version']}" if sdk else "?")
    for pkg in PYPI_PACKAGES:
        listing = subprocess.run([str(package_dir(servers_dir, pkg) / "bin" / "pip"), "list", "--format=json"],
                                 capture_output=True, text=True, check=True).stdout
        pip = {p["name"].lower(): p["version"] for p in json.loads(listing)}
        out[pkg] = (pip[pkg], f"mcp@{pip.get('mcp', '?')}")
    return out


# ---------------------------------------------------------------- sandbox


def _own(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def make_sandbox(base: Path, uid: int, gid: int) -> None:
    """The files the cases use. Owned by the servers' user, except what must not be."""
    files = base / "files"
    (files / "notes").mkdir(parents=True)
    (files / "src").mkdir()
    (files / "readme.md").write_text("# Corpus\nA small tree for provoking errors.\n")
    (files / "notes" / "today.md").write_text("nothing yet\n")
    (files / "secret.txt").write_text("token=not-a-real-token\n")
    (base / "memory").mkdir()
    (base / "other").mkdir()
    (base / "other" / "data.txt").write_text("outside\n")
    repo = base / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=corpus", "-c", "user.email=corpus@example.invalid", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / "app.py").write_text("print('hello')\n")
    subprocess.run([*git, "add", "app.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    shutil.copytree(repo, base / "rootrepo")
    _own(base, uid, gid)
    base.chmod(0o755)
    # What the servers' user may not touch (only meaningful when they are not root).
    os.chown(base / "rootrepo", 0, 0)
    _own(base / "rootrepo", 0, 0)
    (files / "secret.txt").chmod(0o000)
    for name, mode in (("locked", 0o755), ("private", 0o700)):
        (files / name).mkdir()
        (files / name / "keep.txt").write_text("x\n")
        _own(files / name, 0, 0)
        (files / name).chmod(mode)
    (base / "readonly").mkdir()
    os.chown(base / "readonly", 0, 0)
    (base / "readonly").chmod(0o555)


# ---------------------------------------------------------------- running a case


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@dataclass
class Context:
    servers_dir: Path
    sandbox: Path
    ports: tuple[int, int]
    drop: list[str]
    versions: dict[str, tuple[str, str]]
    stderr: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str) -> str:
        return text.replace("{sandbox}", str(self.sandbox)).replace("{web}", f"http://127.0.0.1:{self.ports[0]}")

    def real(self, value: Any) -> Any:
        """A case's arguments with placeholders made real."""
        if isinstance(value, str):
            value = value.replace(SANDBOX_PLACEHOLDER, str(self.sandbox))
            value = value.replace(f"127.0.0.1:{PORT_PLACEHOLDER + 1}", f"127.0.0.1:{self.ports[1]}")
            return value.replace(f"127.0.0.1:{PORT_PLACEHOLDER}", f"127.0.0.1:{self.ports[0]}")
        if isinstance(value, dict):
            return {k: self.real(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.real(v) for v in value]
        return value

    def sanitise(self, text: str) -> str:
        text = text.replace(str(self.sandbox), SANDBOX_PLACEHOLDER)
        text = text.replace(str(self.servers_dir), SERVERS_PLACEHOLDER)
        text = text.replace(f"127.0.0.1:{self.ports[1]}", f"127.0.0.1:{PORT_PLACEHOLDER + 1}")
        text = text.replace(f"127.0.0.1:{self.ports[0]}", f"127.0.0.1:{PORT_PLACEHOLDER}")
        return text

    def params(self, server: Server) -> Any:
        pkgdir = str(package_dir(self.servers_dir, server.package))
        cmd = [self.fill(c).replace("{pkgdir}", pkgdir) for c in server.command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.sandbox / "home"),
               "NO_PROXY": "*", "LANG": "C.UTF-8"}
        env.update({k: self.fill(v) for k, v in server.env})
        for value in [*cmd, *env.values()]:  # a server is only ever pointed at this machine
            if "://" in value and urlsplit(value).hostname != "127.0.0.1":
                raise SystemExit(f"refusing to start {server.key}: {value!r} is not on 127.0.0.1")
        if server.key != "missing-command":
            cmd = [*self.drop, *cmd]
        return StdioServerParameters(command=cmd[0], args=cmd[1:], env=env, cwd=str(self.sandbox))


def package_label(server: Server, ctx: Context) -> str:
    if server.registry == "none":
        return "(none: a command that does not exist)"
    return f"{server.package}@{ctx.versions[server.package][0]}"


async def run_server_cases(server: Server, cases: list[Case], ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    errlog_path = ctx.sandbox / f"stderr-{server.key}.log"

    def row(case: Case, message: str, is_error: bool, channel: str) -> dict[str, Any]:
        message = ctx.sanitise(message)
        name = server.key.split("-")[0] if server.key.startswith(("memory-", "git-", "fetch-", "gitlab-")) else server.key
        if server.key.startswith("missing-"):
            name = "filesystem"
        out = {"id": case.id, "server": package_label(server, ctx), "tool": case.tool,
               "runtime_tool": f"mcp__{name}__{case.tool}",
               "arguments": case.arguments, "provoked": case.provoked, "channel": channel,
               "message": message, "is_error": is_error, "label": classify_error(message),
               "expected_kind": case.expected_kind}
        if server.package in ctx.versions:
            out["sdk"] = ctx.versions[server.package][1]
        if case.note:
            out["note"] = case.note
        return out

    async def one(client: Any, case: Case) -> dict[str, Any]:
        args = ctx.real(case.arguments)
        killer = None
        if case.action == "kill":
            async def kill() -> None:
                await asyncio.sleep(1.0)
                for pid in _children(os.getpid()):
                    os.kill(pid, signal.SIGKILL)
            killer = asyncio.create_task(kill())
        try:
            result = await client.call_tool(case.tool, args, read_timeout_seconds=case.timeout)
        except MCPError as exc:
            return row(case, str(exc), True, "jsonrpc_error")
        except Exception as exc:  # noqa: BLE001 - what the client raised is the record
            leaf = _leaf(exc)
            return row(case, str(leaf) or type(leaf).__name__, True, "exception")
        finally:
            if killer is not None:
                await killer
        text = "\n".join(getattr(c, "text", "") or "" for c in result.content)
        return row(case, text, bool(result.is_error), "result")

    errlog = open(errlog_path, "w", encoding="utf-8")  # noqa: SIM115, ASYNC230 - closed below; a local file
    try:
        async with Client(stdio_client(ctx.params(server), errlog=errlog), cache=None) as client:
            for case in cases:
                rows.append(await one(client, case))
    except BaseException as exc:  # a server that does not start is a case too
        leaf = _leaf(exc)
        if isinstance(leaf, (KeyboardInterrupt, asyncio.CancelledError)):
            raise
        done = {r["id"] for r in rows}
        errlog.flush()
        for case in cases:
            if case.id not in done:
                rows.append(row(case, str(leaf) or type(leaf).__name__, True, "connect"))
                lines = [ln.strip() for ln in errlog_path.read_text(errors="replace").splitlines() if ln.strip()]
                errors = [ln for ln in lines if re.search(r"\bError\b", ln)]
                if errors or lines:
                    rows[-1]["server_stderr"] = ctx.sanitise((errors or lines)[-1])
    finally:
        errlog.close()
    return rows


async def collect(ctx: Context) -> list[dict[str, Any]]:
    by_server: dict[str, list[Case]] = {}
    for case in CASES:
        by_server.setdefault(case.server, []).append(case)
    rows: list[dict[str, Any]] = []
    for key, cases in by_server.items():
        print(f"{key}: {len(cases)} case(s)", file=sys.stderr)
        rows.extend(await asyncio.wait_for(run_server_cases(SERVERS[key], cases, ctx), 180))
    order = {c.id: i for i, c in enumerate(CASES)}
    return sorted(rows, key=lambda r: order[r["id"]])


# ---------------------------------------------------------------- the baseline

# Which runtime labels route a kind to a strategy whose fix suits it (strategies/*.py today):
# tool_error sorts its messages into missing path / permission / invalid argument / other and
# fixes by that; permission_denied asks a person for access; timeout raises the limit or, for
# hangs, retries; connection_refused and server_crashed restart the server; transport_error
# retries. Nothing backs off from a rate limit; an unknown has no right fix to route to.
RIGHT_LABELS: dict[str, frozenset[str]] = {
    "missing_resource": frozenset({"tool_error"}),
    "permission": frozenset({"tool_error", "permission_denied"}),
    "rate_limited": frozenset(),
    "transient_upstream": frozenset({"tool_error", "transport_error"}),
    "slow_tail": frozenset({"timeout"}),
    "hang": frozenset({"timeout"}),
    "server_down": frozenset({"connection_refused", "server_crashed"}),
    "invalid_arguments": frozenset({"tool_error"}),
}
# What tool_error's message sorting (strategies/tool_error.py: template_kind) must say for
# its fix to suit the kind; "other" means retries if the tool later succeeded, else a review.
TOOL_ERROR_FITS: dict[str, frozenset[str]] = {
    "missing_resource": frozenset({"missing_path"}),
    "permission": frozenset({"permission"}),
    "transient_upstream": frozenset({"other"}),
    "invalid_arguments": frozenset({"invalid_argument"}),
}


@functools.cache
def _tool_error_plugin() -> Any:
    """The built-in tool_error strategy module, loaded from its plugin folder under a private
    name (strategies/ is a plugin folder, never a top-level module; nothing is left registered)."""
    name = "_corpus_builtin_tool_error"
    spec = importlib.util.spec_from_file_location(name, builtin_folder("strategies") / "tool_error.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def fix_suits(row: dict[str, Any]) -> bool:
    """Whether today's strategy for the row's label would propose the kind's fix."""
    kind, label = row["expected_kind"], row["label"]
    if label not in RIGHT_LABELS.get(kind, frozenset()):
        return False
    if label == "tool_error":
        template_kind = _tool_error_plugin().template_kind
        return template_kind(message_template(row["message"])) in TOOL_ERROR_FITS.get(kind, frozenset())
    return True


def report(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: per expected kind, cases, right labels and suitable fixes."""
    lines = ["| expected kind | cases | label routes right | fix suits | labels seen |",
             "| --- | ---: | ---: | ---: | --- |"]
    tot = [0, 0, 0]
    for kind in KINDS:
        mine = [r for r in rows if r["expected_kind"] == kind]
        if not mine:
            continue
        labels: dict[str, int] = {}
        for r in mine:
            labels[r["label"]] = labels.get(r["label"], 0) + 1
        seen = ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
        if kind == "unknown":
            lines.append(f"| {kind} | {len(mine)} | n/a | n/a | {seen} |")
            continue
        right = sum(r["label"] in RIGHT_LABELS[kind] for r in mine)
        suits = sum(fix_suits(r) for r in mine)
        tot = [tot[0] + len(mine), tot[1] + right, tot[2] + suits]
        lines.append(f"| {kind} | {len(mine)} | {right} | {suits} | {seen} |")
    lines.append(f"| all but unknown | {tot[0]} | {tot[1]} | {tot[2]} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers-dir", type=Path, default=Path("/tmp/corpus-servers"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-install", action="store_true", help="reuse the servers already in --servers-dir")
    ap.add_argument("--report", action="store_true",
                    help="only print the per-kind baseline table of the corpus at --out (no servers)")
    ns = ap.parse_args(argv)
    if ns.report:
        rows = [json.loads(line) for line in ns.out.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(report(rows))
        return 0
    servers_dir = ns.servers_dir.resolve()
    if not ns.no_install:
        install(servers_dir)
    drop: list[str] = []
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        uid, gid = 65534, 65534
    web, robots403 = start_http(_Handler), start_http(_Robots403)
    sandbox = Path(tempfile.mkdtemp(prefix="corpus-")).resolve()
    try:
        make_sandbox(sandbox, uid, gid)
        ctx = Context(servers_dir, sandbox, (web.server_address[1], robots403.server_address[1]), drop,
                      versions(servers_dir))
        rows = asyncio.run(collect(ctx))
    finally:
        web.shutdown()
        robots403.shutdown()
        subprocess.run(["chmod", "-R", "u+rwX", str(sandbox)], check=False)
        shutil.rmtree(sandbox, ignore_errors=True)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    with ns.out.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
    servers = {r["server"] for r in rows}
    print(f"wrote {len(rows)} case(s) from {len(servers)} server package(s) to {ns.out}", file=sys.stderr)
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
