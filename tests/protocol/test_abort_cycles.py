"""10,000 connect / abort cycles (FIN and RST, partial and full requests, streams) against a
server on its own loop: no connection, task, descriptor or memory left behind.
"""

from __future__ import annotations

import gc
import os
import socket
import time

import pytest

from sseserver.http.protocol import HTTPProtocol
from sseserver.http.stream import EventStream
from tests.support.hardening import (
    HARDENED,
    HOST,
    RST,
    ThreadServer,
    healthz,
    thread_server,
)

pytestmark = pytest.mark.timeout(240)

# --------------------------------------------------------------------------------------
# 10,000 connect / abort cycles
# --------------------------------------------------------------------------------------

CYCLES = int(os.environ.get("SSESERVER_ABORT_CYCLES", "10000"))
CYCLE_TIME_LIMIT_S = 150.0
CYCLE_SENDS = [
    b"",  # connect, then close / reset
    b"GET /healthz HTTP/1.1\r\nHo",  # partial head
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # full request, never read
    b"GET /v1/stream?tokens=50&interval_ms=5 HTTP/1.1\r\nHost: x\r\n\r\n",  # a stream
    b"GET /.well-known/mercure?topic=cycle HTTP/1.1\r\nHost: x\r\n\r\n",  # a subscriber
    b"POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ntopic=",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's first bytes
    b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 87\r\n\r\n"
    b'{"messages":[{"role":"user","parts":[{"type":"text","text":"hi"}]}],"params":{"tokens":9}}',
]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def _cycle(port: int, i: int) -> None:
    payload = CYCLE_SENDS[i % len(CYCLE_SENDS)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect((HOST, port))
        if payload:
            try:
                sock.sendall(payload)
            except OSError:
                pass
        if (i // len(CYCLE_SENDS)) % 2 == 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        elif i % 3 == 0:
            # Sometimes read a little first, so a response is in flight when we go.
            sock.settimeout(0.01)
            try:
                sock.recv(128)
            except (TimeoutError, OSError):
                pass
    finally:
        sock.close()


def _run_cycles(server: ThreadServer, start: int, count: int, deadline: float) -> int:
    done = 0
    for i in range(start, start + count):
        if time.monotonic() > deadline:
            break
        _cycle(server.port, i)
        done += 1
        if i % 500 == 499:
            # Let the server catch up so the backlog never overflows.
            server.settle(10**6, timeout=5)
    return done


def test_ten_thousand_connect_abort_cycles_leak_nothing() -> None:
    deadline = time.monotonic() + CYCLE_TIME_LIMIT_S
    config = {**HARDENED, "history": 10}
    with thread_server(**config) as (server, errors):
        assert healthz(server.port) == 200
        baseline = server.settle(10**6)
        warmup = min(1000, CYCLES // 10)
        done = _run_cycles(server, 0, warmup, deadline)
        settled = server.settle(baseline["tasks"])
        gc.collect()
        fds_before = _fd_count()
        rss_before = _rss_bytes()
        done += _run_cycles(server, warmup, CYCLES - warmup, deadline)
        assert done == CYCLES, f"only {done} cycles in {CYCLE_TIME_LIMIT_S}s"
        settled = server.settle(baseline["tasks"], timeout=15)
        assert settled["connections"] == 0, settled
        assert settled["handlers"] == 0 and settled["streams"] == 0, settled
        assert settled["tasks"] <= baseline["tasks"], (settled, baseline)
        gc.collect()
        fds_after = _fd_count()
        assert fds_after <= fds_before + 2, (fds_before, fds_after)
        growth = _rss_bytes() - rss_before
        assert growth < 32 * 1024 * 1024, f"RSS grew {growth / 1e6:.1f} MB over {CYCLES} cycles"
        assert _live(HTTPProtocol) <= 2
        assert _live(EventStream) <= 2
        assert healthz(server.port) == 200
        assert errors.messages() == [], errors.messages()[:5]
