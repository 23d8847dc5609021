"""Launcher of a testbed MCP server through the fork server (see forkserver.py).

``python -I launch.py SOCKET KIND [ARGS...]``: hands this process's stdin, stdout and
stderr to the fork server, which forks the server on them, then exits with the server's
exit code. Standard library only, so it starts in milliseconds.
"""
import json
import os
import socket
import struct
import sys


def main() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        print(f"testbed launcher: no fork server at {sys.argv[1]}: {exc}", file=sys.stderr)
        os._exit(1)
    socket.send_fds(sock, [json.dumps(sys.argv[2:]).encode()], [0, 1, 2])
    # Let go of the pipes: the server owns them now, and its exit must close them.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            os._exit(1)
        data += chunk
    os._exit(struct.unpack("!i", data)[0] & 0xFF)


if __name__ == "__main__":
    main()
