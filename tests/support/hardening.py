"""What the hardening tests share: a server on a loop of its own in a thread (so the
client side can be plain blocking sockets, and the server's tasks, connections and
descriptors can be counted from outside), raw exchanges, and what a sane answer is."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import h11

from sseserver.cli import make_server
from sseserver.config import Config
from sseserver.http.server import Server
from tests.support.procs import ROOT

T = TypeVar("T")
HOST = "127.0.0.1"
HEAD_TIMEOUT = 0.3  # the server's head timeout in these tests: slowloris dies fast
SLACK = 2.0  # scheduling slack on top of it
VALID_STATUSES = {200, 204, 400, 401, 403, 404, 405, 408, 411, 413, 415, 429, 431, 501, 503, 505}
PYPROJECT = (ROOT / "pyproject.toml").read_bytes()
SECRET_MARKERS = (b"[build-system]", b"root:x:0:0", b"[project]", b"BEGIN PRIVATE KEY")

HARDENED = {
    "header_timeout_s": HEAD_TIMEOUT,
    "keepalive_timeout_s": HEAD_TIMEOUT,
    "max_head_bytes": 4096,
    "max_body_bytes": 16384,
    "heartbeat_s": 0.5,
    "shutdown_grace_s": 1.0,
}

# --------------------------------------------------------------------------------------
# A server on a loop of its own, in a thread
# --------------------------------------------------------------------------------------


class ThreadServer:
    def __init__(self, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self.run(self._start(overrides))
        self.port = self.server.port

    @staticmethod
    async def _start(overrides: dict[str, Any]) -> Server:
        server = make_server(replace(Config(), port=0, **overrides).validate(), environ={})
        await server.start()
        return server

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def probe(self) -> dict[str, int]:
        """Counts taken on the server's own loop."""

        async def count() -> dict[str, int]:
            state = self.server.state
            return {
                "tasks": len(asyncio.all_tasks()) - 1,  # not this coroutine's own task
                "connections": len(state.connections),
                "handlers": len(state.handlers),
                "streams": len(state.streams.streams),
            }

        return self.run(count())

    def settle(self, baseline_tasks: int, timeout: float = 10.0) -> dict[str, int]:
        """Wait until nothing is left over; the last probe."""
        deadline = time.monotonic() + timeout
        while True:
            probe = self.probe()
            clean = (
                probe["connections"] == 0
                and probe["handlers"] == 0
                and probe["streams"] == 0
                and probe["tasks"] <= baseline_tasks
            )
            if clean or time.monotonic() > deadline:
                return probe
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.run(self.server.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server and of asyncio (unhandled task errors)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [
            r.getMessage() + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in self.records
        ]


@contextmanager
def thread_server(**overrides: Any) -> Iterator[tuple[ThreadServer, ErrorLog]]:
    errors = ErrorLog()
    loggers = [logging.getLogger("sseserver"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(errors)
    server = ThreadServer(**overrides)
    try:
        yield server, errors
    finally:
        server.close()
        for logger in loggers:
            logger.removeHandler(errors)


def healthz(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = _read_head(s, 5.0)[0]
    return head.status_code if isinstance(head, h11.Response) else -1


# --------------------------------------------------------------------------------------
# Raw exchanges with plain sockets
# --------------------------------------------------------------------------------------

RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _read_head(sock: socket.socket, timeout: float) -> tuple[Any, bytes, bool]:
    """Read until the server's first response head is complete, or it closes, or the
    deadline. (head event or None, bytes read, closed by server)."""
    oracle = h11.Connection(h11.CLIENT)
    oracle.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    oracle.send(h11.EndOfMessage())
    data = bytearray()
    deadline = time.monotonic() + timeout
    closed = False
    while True:
        try:
            event = oracle.next_event()
        except h11.RemoteProtocolError:
            if closed and not data:
                return None, b"", True  # closed without a word: allowed
            raise  # the server sent something that is not HTTP, or half a head
        if isinstance(event, h11.Response | h11.ConnectionClosed):
            return (event if isinstance(event, h11.Response) else None), bytes(data), closed
        if isinstance(event, h11.InformationalResponse):
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, bytes(data), closed
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None, bytes(data), closed
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            closed = True
        data += chunk
        oracle.receive_data(chunk)


class Outcome:
    """What the server did with one raw exchange."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.closed = False
        self.elapsed = 0.0
        self.data = b""
        self.content_type: str | None = None

    def __repr__(self) -> str:
        what = str(self.status) if self.status is not None else "no answer"
        return f"<{what}{' +close' if self.closed else ''} after {self.elapsed:.2f}s>"


def exchange(
    port: int,
    chunks: list[bytes],
    *,
    end: str = "read",  # "read", "half_close" (FIN our side, then read) or "rst"
    timeout: float = HEAD_TIMEOUT + SLACK,
) -> Outcome:
    out = Outcome()
    start = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=5)
    try:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed: read what it said
        if end == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            return out
        if end == "half_close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        head, out.data, out.closed = _read_head(sock, timeout)
        if head is not None:
            out.status = head.status_code
            for k, v in head.headers:
                if k == b"content-type":
                    out.content_type = v.decode("latin-1")
        out.elapsed = time.monotonic() - start
        return out
    finally:
        sock.close()


def assert_sane(outcome: Outcome, what: object) -> None:
    """A valid status (never a 500) within the head timeout, or a close."""
    if outcome.status is None:
        assert outcome.closed, f"{what!r}: no answer and no close: {outcome!r}"
        return
    assert outcome.status in VALID_STATUSES, f"{what!r}: {outcome!r} {outcome.data[:300]!r}"
    if outcome.status >= 400:
        ctype = (outcome.content_type or "").split(";")[0]
        assert ctype == "application/json", (what, outcome, outcome.data[:300])
    assert not any(m in outcome.data for m in SECRET_MARKERS), (what, outcome.data[:300])
