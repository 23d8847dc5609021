"""Per-call overhead of ToolPolicy: a trivial tool called directly vs through the policy.

    python benchmarks/bench_policy.py [--iterations 200000]

Rows: no settings for the tool (the fast path every unconfigured tool takes), and for
reference a tool with ``timeout_ms`` (async: ``asyncio.timeout``; sync: a worker thread)
and with ``retry_attempts`` (no timeout). Best of five repeats; prints µs per call and the
ratio to the direct call.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from selfheal_plugin.runtime.policy import ToolPolicy


def tool(x: int) -> int:
    return x


async def atool(x: int) -> int:
    return x


def best(fn, n: int, repeats: int = 5) -> float:
    """Best seconds per call over ``repeats`` runs of ``n`` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t0) / n)
    return min(out)


def sync_direct(n: int) -> None:
    for i in range(n):
        tool(x=i)


def sync_policy(policy: ToolPolicy, name: str):
    def run(n: int) -> None:
        call = policy.call
        for i in range(n):
            call(name, tool, {"x": i})
    return run


def async_direct(n: int) -> None:
    async def main() -> None:
        for i in range(n):
            await atool(x=i)
    asyncio.run(main())


def async_policy(policy: ToolPolicy, name: str):
    def run(n: int) -> None:
        async def main() -> None:
            acall = policy.acall
            for i in range(n):
                await acall(name, atool, {"x": i})
        asyncio.run(main())
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200_000)
    n = p.parse_args().iterations
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text('[tools."timed"]\ntimeout_ms = 60000\n\n[tools."retried"]\nretry_attempts = 3\n')
        policy = ToolPolicy(cfg)  # watchdog on, like a runtime
        try:
            rows = []
            base_sync = best(sync_direct, n)
            base_async = best(async_direct, n)
            rows.append(("sync", "direct call", base_sync, base_sync))
            rows.append(("sync", "ToolPolicy, no settings", best(sync_policy(policy, "plain"), n), base_sync))
            rows.append(("sync", "ToolPolicy, retry_attempts", best(sync_policy(policy, "retried"), n), base_sync))
            rows.append(("sync", "ToolPolicy, timeout_ms (thread)",
                         best(sync_policy(policy, "timed"), max(1, n // 20)), base_sync))
            rows.append(("async", "direct await", base_async, base_async))
            rows.append(("async", "ToolPolicy, no settings", best(async_policy(policy, "plain"), n), base_async))
            rows.append(("async", "ToolPolicy, retry_attempts", best(async_policy(policy, "retried"), n),
                         base_async))
            rows.append(("async", "ToolPolicy, timeout_ms", best(async_policy(policy, "timed"), n), base_async))
        finally:
            policy.close()
    print(f"{n} iterations per measurement, best of 5")
    print(f"{'kind':6} {'path':34} {'µs/call':>9} {'overhead µs':>12} {'ratio':>7}")
    for kind, label, per, base in rows:
        print(f"{kind:6} {label:34} {per * 1e6:9.3f} {(per - base) * 1e6:12.3f} {per / base:7.2f}")


if __name__ == "__main__":
    main()
