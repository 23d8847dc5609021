"""Real MCP tool servers for the closed-loop testbed, one per failure mode (stdio).

``python -m selfheal_plugin.testbed.servers search|files|flaky [options]``

* ``search`` — ``web_search(query, limit)``: its latency in simulated milliseconds is
  lognormal (``--median-ms``, ``--sigma``, seeded by ``--seed``) and it really sleeps
  ``latency × --time-scale`` seconds, so a client timeout on the same scale fires on a
  really slow call. The result's last line reports that latency (``reported_latency_ms``):
  unlike the client's measured duration it does not grow when the machine is busy.
* ``files`` — ``list_dir(path)``: ``os.listdir`` over a real tree under ``--root``; a
  missing path is a tool error ``Path not found: PATH``.
* ``flaky`` — ``service_status(service)``: does a little work and, with probability
  ``--crash-probability`` (seeded), exits the process mid-call (``os._exit``), so the client
  sees its connection close.

Draws: a request whose ``_meta`` carries a draw key (:data:`DRAW_META`; the testbed's agent
sends its run, step and attempt) takes its latency, crash and results from a stream of its
own, so what a call draws does not depend on which calls came before it (a call that a busy
machine makes time out, and so ends its run before the next server is asked, shifts no other
call's draws). Without the key a server draws from its own stream, in the order calls arrive.

Each operation is a plain function (tested directly); the MCP layer only maps arguments.
Logging goes to stderr.
"""
# No `from __future__ import annotations`: the SDK reads the tools' annotations, and `Context`
# is imported inside build_server (the SDK only when a server is built).
import argparse
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Annotated

from pydantic import Field

CRASH_EXIT_CODE = 70
DRAW_META = "selfheal-testbed/draw"  # the request _meta key of a call's own draws (see the module docs)


# ---------------------------------------------------------------- operations


def search_latency_ms(rng: random.Random, median_ms: float, sigma: float) -> float:
    """One simulated latency: lognormal with the given median and log-space sigma."""
    return rng.lognormvariate(math.log(median_ms), sigma)


def search_results(query: str, limit: int, rng: random.Random) -> str:
    words = [w for w in query.split() if w] or ["(empty)"]
    n = max(1, min(limit, 10))
    lines = [f"{i + 1}. {' '.join(words)} — result {rng.randrange(10_000)}" for i in range(n)]
    return f"{n} results for {query!r}\n" + "\n".join(lines)


LATENCY_NOTE = re.compile(r"^\(answered after (\d+) simulated ms\)$", re.M)


def latency_note(latency_ms: float) -> str:
    """The last line of a search result: the latency the server drew (and slept, scaled).
    A client's recorded duration adds its own real overhead; this is what the server alone took."""
    return f"(answered after {round(latency_ms)} simulated ms)"


def reported_latency_ms(result: str) -> int | None:
    """The latency a search result reports (see :func:`latency_note`), or None."""
    found = LATENCY_NOTE.search(result)
    return int(found.group(1)) if found else None


def list_directory(root: Path, path: str) -> str:
    """Entries of ``path`` (absolute, or relative to ``root``), which must stay inside ``root``."""
    target = Path(path)
    if not target.is_absolute():
        target = root / target
    resolved = Path(os.path.normpath(target))
    root_resolved = Path(os.path.normpath(root))
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ValueError(f"Access denied: {path} is outside {root}")
    try:
        entries = sorted(os.listdir(resolved))
    except FileNotFoundError:
        raise LookupError(f"Path not found: {path}") from None
    except NotADirectoryError:
        raise ValueError(f"Not a directory: {path}") from None
    kinds = ["{}{}".format(e, "/" if (resolved / e).is_dir() else "") for e in entries]
    return f"{len(entries)} entries in {path}\n" + "\n".join(kinds)


def service_status(service: str, rng: random.Random) -> str:
    state = rng.choice(("healthy", "healthy", "healthy", "degraded"))
    return f"service {service}: {state} (p99 {rng.randint(20, 900)} ms)"


# ---------------------------------------------------------------- MCP servers


def build_server(kind: str, opts: argparse.Namespace):
    import anyio
    from mcp.server import MCPServer
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    own = random.Random(f"{kind}:{opts.seed}")
    scale = opts.time_scale
    server = MCPServer(f"testbed-{kind}")
    read_only = ToolAnnotations(readOnlyHint=True)

    def draws(ctx: Context) -> random.Random:
        """The stream one call draws from: its own when the request names a draw key."""
        key = (ctx.request_context.meta or {}).get(DRAW_META)
        return random.Random(f"{kind}:{opts.seed}:{key}") if isinstance(key, str) else own

    @server.tool(annotations=read_only)
    def health() -> str:
        """Liveness probe: answers "ok" while the server runs (the SDK 2.x has no ping)."""
        return "ok"

    if kind == "search":
        @server.tool(annotations=read_only)
        async def web_search(query: Annotated[str, Field(description="search terms")], ctx: Context,
                             limit: Annotated[int, Field(ge=1, le=10)] = 5) -> str:
            """Search the web (slow: latency follows a lognormal distribution)."""
            rng = draws(ctx)
            latency = search_latency_ms(rng, opts.median_ms, opts.sigma)
            results = search_results(query, limit, rng)
            await anyio.sleep(latency / 1000 * scale)
            return f"{results}\n{latency_note(latency)}"

    elif kind == "files":
        root = Path(opts.root)

        @server.tool(annotations=read_only)
        def list_dir(path: Annotated[str, Field(description="directory to list")]) -> str:
            """List a directory of the project tree."""
            try:
                return list_directory(root, path)
            except (LookupError, ValueError) as exc:
                raise ToolError(str(exc)) from None

    elif kind == "flaky":
        @server.tool(annotations=read_only)
        async def query_status(service: Annotated[str, Field(description="service name")], ctx: Context) -> str:
            """Status of a service (the server sometimes crashes mid-call)."""
            rng = draws(ctx)
            crash = rng.random() < opts.crash_probability
            work = rng.lognormvariate(math.log(opts.work_ms), 0.3)
            if crash:
                await anyio.sleep(work / 2 / 1000 * scale)
                print(f"testbed-flaky: crashing during query_status({service!r})", file=sys.stderr, flush=True)
                os._exit(CRASH_EXIT_CODE)
            await anyio.sleep(work / 1000 * scale)
            return service_status(service, rng)
    else:
        raise SystemExit(f"unknown testbed server {kind!r} (search, files, flaky)")
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selfheal_plugin.testbed.servers")
    p.add_argument("kind", choices=("search", "files", "flaky"))
    p.add_argument("--seed", default="0")
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second")
    p.add_argument("--median-ms", type=float, default=12_000.0, help="search: median simulated latency")
    p.add_argument("--sigma", type=float, default=0.5, help="search: lognormal sigma (log space)")
    p.add_argument("--root", default=".", help="files: the tree list_dir serves")
    p.add_argument("--crash-probability", type=float, default=0.1, help="flaky: chance a call kills the server")
    p.add_argument("--work-ms", type=float, default=300.0, help="flaky: median simulated work per call")
    opts = p.parse_args(argv)
    if opts.time_scale <= 0 or opts.median_ms <= 0 or opts.sigma < 0 or opts.work_ms <= 0:
        p.error("--time-scale, --median-ms and --work-ms must be > 0 and --sigma >= 0")
    if not 0 <= opts.crash_probability <= 1:
        p.error("--crash-probability must be within [0, 1]")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    build_server(opts.kind, opts).run()
    # stdin closed: the client is gone. Skip interpreter teardown so the client's shutdown,
    # which waits for this process to exit, does not wait for garbage collection.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
