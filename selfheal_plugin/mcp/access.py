"""Who may call ``self-healing-mcp`` over HTTP, and which tools it exposes.

* **Bearer token.** ``$SELFHEAL_MCP_TOKEN`` or ``--token-file PATH`` (first line of the file).
  With a token, every HTTP request must carry ``Authorization: Bearer TOKEN`` or it is answered
  ``401``. A bind beyond loopback (``--host 0.0.0.0``, a LAN address, a host name) is refused
  without a token: there the SDK's Host/Origin checks cannot know the names clients use, so the
  token is what keeps ``apply_improvement`` from being open to the network.
* **Loopback binds** keep the Host/Origin checks against DNS rebinding (for every loopback
  address, not only the three the SDK knows) and check the token too when one is set: any local
  user can reach a loopback port.
* **Read-only** (``--read-only``): only the tools annotated read-only are served (the analysis
  tools); propose, test, apply and verify are not listed and cannot be called.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings

from selfheal_plugin.errors import UsageError

TOKEN_ENV = "SELFHEAL_MCP_TOKEN"
MIN_TOKEN_LENGTH = 16
REALM = "self-healing-mcp"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``); a wildcard, a LAN
    address or any other host name is not loopback."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token from ``token_file`` (its first line) or ``$SELFHEAL_MCP_TOKEN``; None
    when neither is given. An unreadable file or a short token is a :class:`UsageError`."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        token, source = (lines[0].strip() if lines else ""), f"the token file {path}"
    elif env.get(TOKEN_ENV) is not None:
        token, source = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise UsageError(f"the bearer token in {source} is too short: use at least {MIN_TOKEN_LENGTH} characters "
                         "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"the bearer token in {source} must be one word of printable characters")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token (one line)."""
    if token is None and not is_loopback(host):
        raise UsageError(f"refusing to serve HTTP on {host} without a bearer token: anyone who can reach it could "
                         f"apply changes; set ${TOKEN_ENV} or --token-file (or bind to 127.0.0.1)")


def transport_security(host: str) -> TransportSecuritySettings | None:
    """Host/Origin checks (DNS rebinding) for a loopback bind; None beyond loopback, where the
    names clients use are unknown and the bearer token guards the server instead."""
    if not is_loopback(host):
        return None
    names = ["127.0.0.1", "localhost", "[::1]"]
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    if bound not in names:
        names.append(bound)
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=[f"{n}:*" for n in names],
                                     allowed_origins=[f"http://{n}:*" for n in names])


class BearerTokenMiddleware:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>`` (compared in
    constant time); otherwise ``401`` with ``WWW-Authenticate: Bearer``. Lifespan passes through."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        reason = "missing bearer token" if not given else "invalid bearer token"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "unauthorized", "error_description": reason}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", f'Bearer realm="{REALM}", error="invalid_token"'.encode())]})
        await send({"type": "http.response.body", "body": body})


def read_only_tools(server: Any) -> list[str]:
    """The names of the server's tools annotated read-only."""
    return sorted(t.name for t in server._tool_manager.list_tools()
                  if t.annotations is not None and t.annotations.read_only_hint)


def restrict_to_read_only(server: Any) -> list[str]:
    """Remove every tool not annotated read-only from ``server``; returns the names removed."""
    keep = set(read_only_tools(server))
    removed = sorted(t.name for t in server._tool_manager.list_tools() if t.name not in keep)
    for name in removed:
        server.remove_tool(name)
    return removed
