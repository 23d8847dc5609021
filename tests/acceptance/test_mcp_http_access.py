"""Who may use ``self-healing-mcp`` over HTTP: the bearer token (``$SELFHEAL_MCP_TOKEN`` or
``--token-file``), the refusal to serve beyond loopback without one, and ``--read-only`` —
over real HTTP on 127.0.0.1 against the installed console script."""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from selfheal_plugin.errors import UsageError
from selfheal_plugin.mcp.access import TOKEN_ENV, check_bind, is_loopback, load_token

from ..mcp_helpers import TOOLS, home, recent_history, server_command, start_http_server, stop, structured  # noqa: F401

TOKEN = "s3cret-token-for-tests-0123456789"
READ_TOOLS = {name for name, (read_only, _) in TOOLS.items() if read_only}  # what --read-only serves
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw MCP ``initialize`` POST; the status, headers and body whatever the status."""
    req = urllib.request.Request(url, data=json.dumps(INITIALIZE).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def session(url: str, token: str | None, body) -> Any:
    async def go() -> Any:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"} if token else None)
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            return await body(client)
    return anyio.run(go)


async def names_and_detect(client: Client) -> tuple[set[str], Any]:
    names = {t.name for t in (await client.list_tools()).tools}
    return names, structured(await client.call_tool("detect_failure_patterns", {}))


def test_with_a_token_every_request_must_carry_it(home):
    proc, url = start_http_server("--home", str(home), env={TOKEN_ENV: TOKEN})
    try:
        missing = post(url)
        wrong = post(url, {"Authorization": "Bearer not-the-token-at-all-000"})
        basic = post(url, {"Authorization": f"Basic {TOKEN}"})
        right = post(url, {"Authorization": f"Bearer {TOKEN}"})
        names, detected = session(url, TOKEN, names_and_detect)
        # the token does not switch off the DNS-rebinding checks of a loopback bind
        rebound = post(url, {"Authorization": f"Bearer {TOKEN}", "Host": "attacker.example:80"})
        with pytest.raises(Exception):  # noqa: B017 - the SDK wraps the 401 in its own error types
            session(url, "wrong-token-wrong-token", names_and_detect)
        assert proc.poll() is None
    finally:
        _, stderr = stop(proc)
    for status, headers, body in (missing, wrong, basic):
        assert status == 401, (status, body)
        assert headers["www-authenticate"].startswith("Bearer ")
        assert json.loads(body)["error"] == "unauthorized"
    assert json.loads(missing[2])["error_description"] == "missing bearer token"
    assert json.loads(wrong[2])["error_description"] == "invalid bearer token"
    assert right[0] == 200
    assert names == set(TOOLS) and isinstance(detected["patterns"], list)
    assert rebound[0] in (400, 403, 421) and rebound[0] != 401
    assert b"Traceback" not in stderr and TOKEN.encode() not in stderr


def test_the_token_can_come_from_a_file(home, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc, url = start_http_server("--home", str(home), "--token-file", str(token_file),
                                  env={TOKEN_ENV: "another-token-from-the-env-0000"})  # the file wins
    try:
        assert post(url)[0] == 401
        assert post(url, {"Authorization": "Bearer another-token-from-the-env-0000"})[0] == 401
        names, _ = session(url, TOKEN, names_and_detect)
    finally:
        stop(proc)
    assert names == set(TOOLS)


def test_beyond_loopback_without_a_token_is_refused_in_one_line():
    res = subprocess.run([server_command(), "--transport", "streamable-http", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [(
        "Error: refusing to serve HTTP on 0.0.0.0 without a bearer token: anyone who can reach it could apply "
        f"changes; set ${TOKEN_ENV} or --token-file (or bind to 127.0.0.1)")]
    assert res.stdout == ""
    for host in ("::", "192.0.2.1", "example.org"):
        with pytest.raises(UsageError, match=f"refusing to serve HTTP on {host} without a bearer token"):
            check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)
    check_bind("127.0.0.1", None)


def test_beyond_loopback_with_a_token_serves_only_with_it(home):
    proc, url = start_http_server("--home", str(home), "--host", "0.0.0.0", env={TOKEN_ENV: TOKEN})
    try:
        assert post(url)[0] == 401
        names, _ = session(url, TOKEN, names_and_detect)
    finally:
        _, stderr = stop(proc)
    assert names == set(TOOLS)
    assert b"bearer token required" in stderr


def test_a_bad_token_is_one_line_before_anything_is_served(tmp_path):
    for args, env, fragment in (
            (["--token-file", str(tmp_path / "missing")], {}, "cannot read the token file"),
            ([], {TOKEN_ENV: "short"}, f"${TOKEN_ENV} is too short")):
        res = subprocess.run([server_command(), "--transport", "streamable-http", "--port", "0", *args],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                             env={**os.environ, **env})
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert fragment in res.stderr and "Traceback" not in res.stderr


def test_read_only_lists_and_serves_only_the_read_tools(home):
    async def body(client: Client) -> dict[str, Any]:
        tools = (await client.list_tools()).tools
        return {"tools": {t.name: t.annotations.read_only_hint for t in tools},
                "detect": await client.call_tool("detect_failure_patterns", {}),
                "apply": await client.call_tool("apply_improvement", {"improvement_id": "imp-x", "changes_made": "x"}),
                "propose": await client.call_tool("propose_improvement", {"pattern_id": "tool_error:list_dir"})}

    proc, url = start_http_server("--home", str(home), "--read-only", env={TOKEN_ENV: TOKEN})
    try:
        out = session(url, TOKEN, body)
    finally:
        stop(proc)
    assert out["tools"] == dict.fromkeys(READ_TOOLS, True)
    assert structured(out["detect"]) is not None
    for name in ("apply", "propose"):
        assert out[name].is_error and "unknown tool" in out[name].content[0].text.lower(), out[name]
    assert not (home / "config.toml").exists()  # nothing proposed, nothing applied


def test_help_documents_the_token_and_read_only():
    text = subprocess.run([server_command(), "--help"], capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(text.split())
    for fragment in ("--token-file", f"${TOKEN_ENV}", "--read-only", "Authorization: Bearer TOKEN",
                     "beyond loopback", "get_health_dashboard"):
        assert fragment in flat, fragment


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False), ("", False),
])
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_load_token(tmp_path):
    f = tmp_path / "t"
    f.write_text(f"  {TOKEN}  \nsecond line ignored\n")
    assert load_token(f, {}) == TOKEN
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UsageError, match="is too short"):
        load_token(empty, {TOKEN_ENV: TOKEN})  # the file wins, even when it is bad
    assert load_token(None, {TOKEN_ENV: TOKEN}) == TOKEN
    assert load_token(None, {}) is None
    for bad in ("short", "has a space in the middle ok", "tab\there-and-more-chars"):
        with pytest.raises(UsageError):
            load_token(None, {TOKEN_ENV: bad})
