"""What the MCP facade costs: ``detect_failure_patterns`` over stdio against the same call in-process.

A history of about 100,000 run events (the generator's default shape, ending now so that the
tool's default ``-7d`` window covers it) is indexed once; then each figure is the median of
``--calls`` calls with the tool's defaults:

* library   — ``patterns.detect_failure_patterns`` on an open connection (the bare function);
* tool body — the same call as the tool makes it, in-process: settings from config.toml, a
              fresh connection, detection, suggested fixes from the strategies;
* in-process MCP — the tool through ``mcp.Client(server)`` (no transport);
* stdio     — the installed ``self-healing-mcp`` console script through the official client
              over stdin/stdout (JSON-RPC framing, a process boundary).

    python benchmarks/bench_mcp.py                   # 100,000 events, 50 calls each
    python benchmarks/bench_mcp.py --events 20000 --calls 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Awaitable, Callable

EVENTS_PER_RUN = 50.7  # what the generator writes with its defaults


def median_ms(samples: list[float]) -> str:
    p90 = sorted(samples)[max(0, int(len(samples) * 0.9) - 1)]
    return f"{statistics.median(samples) * 1000:8.2f} ms (p90 {p90 * 1000:.2f})"


def time_sync(fn: Callable[[], Any], calls: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def time_async(fn: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    await fn()  # warm-up
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()

    import anyio
    from mcp import Client, StdioServerParameters

    from selfheal_plugin.testbed.generator import generate_history
    from selfheal_plugin.history.connection import connect
    from selfheal_plugin.lifecycle.proposals import attach_suggested_fixes
    from selfheal_plugin.mcp.server import build_server
    from selfheal_plugin.analysis.patterns import detect_failure_patterns
    from selfheal_plugin.history.settings import load_settings
    from selfheal_plugin.history.times import utcnow

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "binks"
        home.mkdir()
        os.environ["BINKS_HOME"] = str(home)
        os.environ["INBOX_PATH"] = str(Path(tmp) / "inbox")
        db = home / "conversations.db"
        runs = max(10, round(args.events / EVENTS_PER_RUN))
        t0 = time.perf_counter()
        truth = generate_history(db, seed=3, runs=runs, days=6, end=utcnow() - timedelta(minutes=5))
        print(f"history: {truth['events']:,} events in {runs:,} runs ({time.perf_counter() - t0:.1f} s to generate)")
        conn = connect(db)
        t0 = time.perf_counter()
        found = detect_failure_patterns(conn).patterns
        print(f"first detect (builds the error index): {time.perf_counter() - t0:.2f} s, {len(found)} pattern(s)")

        lib = time_sync(lambda: detect_failure_patterns(conn), args.calls)

        def tool_body() -> None:
            s = load_settings(home, None)
            c = connect(s.db_path)
            try:
                result = detect_failure_patterns(c, since=s.lookback, min_occurrences=s.min_occurrences,
                                                 confidence_threshold=s.confidence_threshold)
                attach_suggested_fixes(result.patterns, s)
                [p.to_dict() for p in result.patterns]
            finally:
                c.close()

        body = time_sync(tool_body, args.calls)

        async def over(client_target: Any) -> list[float]:
            async with Client(client_target) as client:
                async def one() -> None:
                    r = await client.call_tool("detect_failure_patterns", {})
                    assert not r.is_error, r.content[0].text
                    assert len(r.structured_content["patterns"]) == len(found)
                return await time_async(one, args.calls)

        inproc = anyio.run(over, build_server(home))
        exe = Path(sys.executable).parent / "self-healing-mcp"
        params = StdioServerParameters(command=str(exe), args=["--home", str(home)], env=dict(os.environ))
        stdio = anyio.run(over, params)

    print(f"detect_failure_patterns, median of {args.calls} calls:")
    print(f"  library (open connection)  {median_ms(lib)}")
    print(f"  tool body in-process       {median_ms(body)}")
    print(f"  MCP in-process client      {median_ms(inproc)}")
    print(f"  MCP over stdio             {median_ms(stdio)}")
    print(f"  stdio overhead vs library: {(statistics.median(stdio) - statistics.median(lib)) * 1000:+.2f} ms, "
          f"vs tool body: {(statistics.median(stdio) - statistics.median(body)) * 1000:+.2f} ms")


if __name__ == "__main__":
    main()
