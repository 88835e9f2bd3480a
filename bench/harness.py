"""What every benchmark stands on: paths, the two cores, blocking HTTP probes.

Ports and the open-files limit come from the tests' harness (``tests.support.procs``):
one way to do each, for tests and benchmarks alike."""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

from tests.support.procs import free_port, raise_nofile

__all__ = ["free_port", "raise_nofile"]

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
PY = sys.executable
NODE = shutil.which("node") or "/usr/bin/node"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
REDIS_SERVER = shutil.which("redis-server") or ""
SERVER_CORE = "0"
LOADGEN_CORE = "1"
NICE: list[str] = []  # ["nice", "-n", "-5"] with --nice -5: favour the measured processes


def pinned(core: str) -> list[str]:
    """The argv prefix that runs a program on ``core`` at the chosen nice level (taskset
    execs it: the PID stays the program's)."""
    return [*NICE, "taskset", "-c", core]


def raise_nofile_in_child() -> None:
    """``raise_nofile`` as a ``preexec_fn`` for the processes the benchmarks start."""
    raise_nofile()


def http_get(
    port: int, target: str, timeout: float = 5.0, accept: str = "*/*"
) -> tuple[int, bytes]:
    """A blocking HTTP/1.1 GET that reads until the server closes (Connection: close)."""
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
    return _exchange(port, head, b"", timeout)


def _exchange(port: int, head: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """Send ``head`` (its fields, less ``Connection``) and ``body``, read until the server
    closes; the status and everything read, head included (0: no status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((head + "Connection: close\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return int(data[9:12]), data
    except ValueError:
        return 0, data


def http_post(
    port: int,
    target: str,
    body: bytes,
    timeout: float = 5.0,
    accept: str = "*/*",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """A blocking HTTP/1.1 POST of a JSON body that reads until the server closes
    (Connection: close); the status and everything read, head included."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
    )
    return _exchange(port, head, body, timeout)


def peek_stream(port: int, target: str, timeout: float = 5.0) -> int:
    """Open a stream that does not end by itself (a subscription), read its response head,
    close it; the status (0: no head within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            "\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return int(data[9:12])
    except ValueError:
        return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
