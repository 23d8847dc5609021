"""A fork server that starts the testbed's MCP servers in milliseconds.

Starting a Python MCP server costs about a second of CPU (importing the SDK builds its
pydantic models); a workload that restarts a crashing server every few runs would spend
most of its time there. The fork server imports the SDK once and forks a fresh process for
each server start:

* the MCP client launches ``python -I launch.py SOCKET KIND ARGS...`` (stdlib only, ~20 ms);
* the launcher hands its stdin, stdout and stderr to the fork server over a Unix socket
  (``SCM_RIGHTS``) and lets go of its own copies;
* the fork server forks; the child is the MCP server, speaking over exactly those pipes;
* when the child exits (an ``os._exit`` crash, or stdin closed by the client) the fork
  server sends its exit code to the launcher, which exits with it; if the launcher is
  killed, the fork server kills the child.

So each server is still its own process on the client's stdio pipes: a crash closes the
client's connection just as a directly spawned server's would. The loop is
single-threaded (``selectors`` plus ``waitpid(WNOHANG)``) so forking is safe.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LAUNCHER = Path(__file__).with_name("launch.py")


def available() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")


class ForkServer:
    """A running fork server process (see the module docs)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="selfheal-fs-")  # short path: Unix sockets are limited
        self.sock = os.path.join(self.dir, "fork.sock")
        self.log_path = os.path.join(self.dir, "forkserver.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from selfheal_plugin.testbed.forkserver import serve; "
                                       "serve(sys.argv[1])", self.sock],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        import mcp.client.stdio  # noqa: F401 - the client's own imports, while the server starts
        deadline = time.monotonic() + 120
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the testbed fork server did not start: {self._log_tail()}")
            time.sleep(0.01)

    def _log_tail(self) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def launcher(self) -> list[str]:
        """Interpreter arguments that start a server through this fork server."""
        return ["-I", str(LAUNCHER), self.sock]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: ForkServer | None = None
_shared_lock = threading.Lock()


def shared() -> ForkServer:
    """The process-wide fork server, started on first use and stopped at exit (a second
    workload in the same process, like the demo's after-fix run, starts no new one)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            if _shared is not None:
                _shared.stop()
            else:
                atexit.register(_stop_shared)
            _shared = ForkServer()
        return _shared


def _stop_shared() -> None:
    if _shared is not None:
        _shared.stop()


def _child(fds: list[int], argv: list[str]) -> None:
    from selfheal_plugin.testbed.servers import main  # the module, not the package

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - report on the server's stderr, then exit
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def _preload() -> None:
    """Import the SDK once, before forking, including what it loads lazily on first use."""
    import anyio._backends._asyncio  # noqa: F401
    import mcp.server.stdio  # noqa: F401

    from selfheal_plugin.testbed.servers import build_server, parse_args  # the module, not the package
    for kind in ("search", "files", "flaky"):
        build_server(kind, parse_args([kind]))


def serve(sock_path: str) -> None:
    """Run the fork server on ``sock_path`` until SIGTERM or until its parent goes away."""
    _preload()

    parent = os.getppid()
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    listener.listen(16)
    os.replace(sock_path + ".tmp", sock_path)  # appears only once it accepts connections
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    try:
        while running and os.getppid() == parent:
            for key, _ in sel.select(timeout=0.02):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    msg, fds, _, _ = socket.recv_fds(conn, 65536, 3)
                    if len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        listener.close()
                        for c in children.values():
                            c.close()
                        conn.close()
                        _child(fds, json.loads(msg))
                    for fd in fds:
                        os.close(fd)
                    children[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:  # the launcher's end closed: it was killed, so kill its server
                    conn = key.fileobj
                    try:
                        data = conn.recv(1)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(conn)
                        _kill(key.data)
            _reap(children, sel)
    finally:
        for pid in list(children):
            _kill(pid)
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        listener.close()
        try:
            os.unlink(sock_path)
        except OSError:
            pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(children: dict[int, socket.socket], sel: selectors.BaseSelector) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
        except OSError:
            pass
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

