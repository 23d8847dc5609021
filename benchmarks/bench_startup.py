"""Start-up as a user waits for it: ``agent --version`` and ``detect`` on a tiny history,
whole processes, against a bare ``python -c "import sqlite3, json"``.

Each figure is the median of ``--repeats`` fresh processes (wall seconds), interleaved with
the baseline; the ratio is taken against the baseline's median from the same run. It also
lists which heavy libraries each command imported (``-X importtime``): ``--version`` and a
tiny ``detect --json`` should import none of rich, numpy, scipy, mcp, watchdog, git, pydantic.
selfheal's bytecode is written first, as an install leaves it (:mod:`installed`): with
``PYTHONDONTWRITEBYTECODE`` set, every process would otherwise compile it from source again.

    python benchmarks/bench_startup.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import compile_package  # benchmarks/installed.py

BIN = Path(sys.executable).parent
HEAVY = ("rich", "numpy", "scipy", "mcp", "watchdog", "git", "pydantic", "tomlkit")


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t0


def heavy_imports(cmd: list[str]) -> list[str]:
    err = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True).stderr
    top = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in err.splitlines() if line.startswith("import time:")}
    return sorted(top & set(HEAVY))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from selfheal_plugin.testbed.generator import generate_history

    compile_package()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        generate_history(home / "conversations.db", seed=1, runs=40)
        env = {**os.environ, "BINKS_HOME": str(home), "INBOX_PATH": str(home / "inbox")}
        bare = [sys.executable, "-c", "import sqlite3, json"]
        agent = str(BIN / "agent")
        cases = {
            "agent --version": [agent, "--version"],
            "detect --json (tiny history)": [agent, "self-heal", "detect", "--json", "--home", str(home)],
        }
        wall(cases["detect --json (tiny history)"], env)  # index it once: we time the warm start-up
        samples: dict[str, list[float]] = {"bare": [], **{k: [] for k in cases}}
        for _ in range(args.repeats):
            samples["bare"].append(wall(bare))
            for name, cmd in cases.items():
                samples[name].append(wall(cmd, env))
        base = statistics.median(samples["bare"])
        print(f"python -c 'import sqlite3, json'  {base * 1000:7.1f} ms")
        for name, cmd in cases.items():
            m = statistics.median(samples[name])
            script = [str(BIN / "agent")] if cmd[0] == agent else []
            imported = heavy_imports([*script, *cmd[1:]]) if script else []
            print(f"{name:<32} {m * 1000:7.1f} ms  {m / base:5.1f}x bare  heavy imports: {', '.join(imported) or 'none'}")


if __name__ == "__main__":
    main()
