"""Hardening over real loopback sockets (SPEC §3, §4, §9): whatever bytes arrive, the
server answers with a valid HTTP status or closes, never hangs past the head timeout,
never crashes, and leaves no connection, task, file descriptor or memory behind.

- A table of hand-made malformed, smuggling-shaped and oversized requests.
- Hypothesis fuzzing of request heads and bodies (methods, targets, header names and
  values, bodies, truncation, garbage, half-close, RST) against one in-process server.
- Static files never escape their folder (traversal in every encoding).
- No header or SSE field injection: Mercure ``id``/``type`` with CR/LF are refused,
  ``data`` with blank lines arrives as ONE event, ``Last-Event-ID`` tricks stay inert.
- 10,000 connect/abort cycles (FIN and RST, partial and full requests, streams).

The fuzz and the abort cycles drive a server running on its own loop in a thread, so the
client side can be plain blocking sockets (SO_LINGER 0 for RST) and the server's tasks,
connections and descriptors can be counted from outside.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sseserver.cli import make_server
from sseserver.config import Config
from sseserver.http.protocol import HTTPProtocol
from sseserver.http.server import Server
from sseserver.http.stream import EventStream
from tests.conftest import ROOT, running_server
from tests.sse_parser import SSEParser

pytestmark = pytest.mark.timeout(240)

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


# --------------------------------------------------------------------------------------
# Hand-made bad requests
# --------------------------------------------------------------------------------------

H = b"Host: x\r\n"
BAD_REQUESTS: list[tuple[str, bytes, set[int | None]]] = [
    ("garbage bytes", b"\x00\x01\x02\xff garbage\r\n\r\n", {400}),
    ("not http", b"HELLO WORLD\r\n\r\n", {400}),
    ("http/0.9 line", b"GET /healthz\r\n\r\n", {400}),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    ("http/3.0", b"GET /healthz HTTP/3.0\r\n" + H + b"\r\n", {505}),
    ("lowercase version", b"GET /healthz http/1.1\r\n" + H + b"\r\n", {400}),
    ("1.1 without Host", b"GET /healthz HTTP/1.1\r\n\r\n", {400}),
    ("two Hosts", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    # RFC 9112 §3.2.2: a server must accept absolute-form; the path is routed, the host
    # is ignored (this server proxies nothing).
    ("absolute-form target", b"GET http://evil.example/healthz HTTP/1.1\r\n" + H + b"\r\n", {200}),
    ("asterisk target", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("query-only target", b"GET ?x=1 HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("NUL in target", b"GET /healthz\x00 HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("%00 in target", b"GET /healthz%00 HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("raw UTF-8 in target", "GET /h\u00e9 HTTP/1.1\r\n".encode() + H + b"\r\n", {400}),
    ("bad percent escape", b"GET /%zz%ff%c3 HTTP/1.1\r\n" + H + b"\r\n", {404}),
    ("fragment in target", b"GET /healthz#frag HTTP/1.1\r\n" + H + b"\r\n", {404}),
    ("lowercase method", b"get /healthz HTTP/1.1\r\n" + H + b"\r\n", {405}),
    ("unknown method", b"BREW /healthz HTTP/1.1\r\n" + H + b"\r\n", {405}),
    ("DEL in method", b"G\x7fET /healthz HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("empty method", b" /healthz HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("two spaces", b"GET  /healthz HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("header without colon", b"GET /healthz HTTP/1.1\r\n" + H + b"oops\r\n\r\n", {400}),
    ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", {400}),
    ("NUL in header name", b"GET /healthz HTTP/1.1\r\n" + H + b"X-\x00: 1\r\n\r\n", {400}),
    ("NUL in header value", b"GET /healthz HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", {400}),
    ("bare CR in value", b"GET /healthz HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", {400}),
    ("obs-fold", b"GET /healthz HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", {200, 400}),
    ("leading whitespace line", b"GET /healthz HTTP/1.1\r\n b\r\n" + H + b"\r\n", {400}),
    ("empty header name", b"GET /healthz HTTP/1.1\r\n" + H + b": v\r\n\r\n", {400}),
    ("CL negative", b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", {400}),
    (
        "CL not a number",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: ten\r\n\r\n",
        {400},
    ),
    (
        "CL plus sign",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
        {400},
    ),
    ("CL hex", b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", {400}),
    (
        "CL two different",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        {400},
    ),
    (
        "CL list",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabcd",
        {400},
    ),
    (
        "CL enormous",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        {400, 413},  # h11 refuses over 20 digits as malformed
    ),
    (
        "CL over max body",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 16385\r\n\r\n",
        {413},
    ),
    (
        "chunked body over max",
        b"POST /v1/stream HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"4001\r\n"
        + b"x" * 16385
        + b"\r\n0\r\n\r\n",
        {413},
    ),
    (
        "CL and TE (smuggling shape)",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n" + H + b"\r\n",
        {400},
    ),
    (
        "TE gzip",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
        {400, 501},
    ),
    (
        "TE chunked twice",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n",
        {400, 501},
    ),
    (
        "bad chunk size",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        {400},
    ),
    (
        "chunk size overflow",
        b"POST /v1/stream HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"f" * 40
        + b"\r\n",
        {400, 413},
    ),
    (
        "head too large (one header)",
        b"GET /healthz HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 8000 + b"\r\n\r\n",
        {431},
    ),
    (
        "head too large (many headers)",
        b"GET /healthz HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: 1\r\n" % i for i in range(2000))
        + b"\r\n",
        {431},
    ),
    ("target too long", b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\n" + H + b"\r\n", {431, 414}),
    ("line without CR", b"GET /healthz HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n", {200, 400}),
    ("JSON with BOM", b"", set()),  # placeholder replaced below
    (
        "unknown content-type",
        b"POST /v1/stream HTTP/1.1\r\n"
        + H
        + b"Content-Type: text/xml\r\nContent-Length: 2\r\n\r\n<>",
        {415},
    ),
    (
        "JSON not an object",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n[]",
        {400},
    ),
    (
        "JSON deeply nested",
        b"POST /v1/stream HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
        b"Content-Length: 12000\r\n\r\n" + b"[" * 6000 + b"]" * 6000,
        {400},
    ),
    (
        "JSON invalid UTF-8",
        b"POST /v1/chat HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
        b'Content-Length: 4\r\n\r\n"\xff\xfe"',
        {400},
    ),
    (
        "JSON NaN param",
        b"POST /v1/stream HTTP/1.1\r\n"
        + H
        + b"Content-Type: application/json\r\n"
        + b"Content-Length: 73\r\n\r\n"
        + b'{"messages":[{"role":"user","content":"x"}],"params":{"tokens":NaN}     }',
        {400},
    ),
    (
        "form with invalid UTF-8",
        b"POST /.well-known/mercure HTTP/1.1\r\n"
        + H
        + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 14\r\n\r\n"
        + b"topic=a&data=\xff",
        {400},
    ),
    (
        "form with 100k fields",
        b"POST /.well-known/mercure HTTP/1.1\r\n"
        + H
        + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 15999\r\n\r\n"
        + (b"a&" * 8000)[:15999],
        {400},
    ),
    (
        "stream tokens huge",
        b"GET /v1/stream?tokens=1e300&interval_ms=-5 HTTP/1.1\r\n" + H + b"\r\n",
        {400},
    ),
    (
        "stream params not numbers",
        b"GET /v1/stream?tokens=inf&size=nan HTTP/1.1\r\n" + H + b"\r\n",
        {400},
    ),
    ("unknown provider", b"GET /v1/stream?provider=%00evil HTTP/1.1\r\n" + H + b"\r\n", {400}),
    (
        "Last-Event-ID garbage on /v1/stream",
        b"GET /v1/stream?tokens=1 HTTP/1.1\r\n" + H + b"Last-Event-ID: ::::\xff\xfe\r\n\r\n",
        {200},
    ),
    (
        "Last-Event-ID huge seq",
        b"GET /v1/stream?tokens=1 HTTP/1.1\r\n"
        + H
        + b"Last-Event-ID: abc:99999999999999999999999\r\n\r\n",
        {200, 204, 404},
    ),
    (
        "Last-Event-ID negative seq",
        b"GET /v1/stream?tokens=1 HTTP/1.1\r\n" + H + b"Last-Event-ID: abc:-1\r\n\r\n",
        {200, 204, 404},
    ),
    ("cancel unknown", b"POST /v1/streams/%2e%2e/cancel HTTP/1.1\r\n" + H + b"\r\n", {404}),
    (
        "pipelined garbage after valid",
        b"GET /healthz HTTP/1.1\r\n" + H + b"\r\nGARBAGE\r\n\r\n",
        {200},
    ),
]
BAD_REQUESTS = [b for b in BAD_REQUESTS if b[0] != "JSON with BOM"]


@pytest.mark.parametrize(
    ("name", "raw", "expected"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_answered(name: str, raw: bytes, expected: set[int | None]) -> None:
    with thread_server(**HARDENED) as (server, errors):
        before = server.probe()["tasks"]
        outcome = exchange(server.port, [raw])
        assert_sane(outcome, name)
        assert outcome.status in expected, (name, outcome, outcome.data[:300])
        assert healthz(server.port) == 200
        left = server.settle(before)
        assert left["connections"] == 0 and left["handlers"] == 0, left
        assert errors.messages() == []


def _read_to_close(sock: socket.socket, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data


BIG = b"X-Big: " + b"a" * 5000 + b"\r\n"  # over HARDENED's 4096-byte head limit
# Every way a request is refused, asked with HEAD: (name, chunks sent, expected status).
HEAD_REFUSALS: list[tuple[str, list[bytes], int]] = [
    ("target *", [b"HEAD * HTTP/1.1\r\n" + H + b"\r\n"], 400),
    ("target with NUL", [b"HEAD /%00 HTTP/1.1\r\n" + H + b"\r\n"], 400),
    ("relative target", [b"HEAD healthz HTTP/1.1\r\n" + H + b"\r\n"], 400),
    ("malformed header", [b"HEAD /healthz HTTP/1.1\r\n" + H + b"Bad Header\r\n\r\n"], 400),
    (
        "content-length with transfer-encoding",
        [
            b"HEAD /healthz HTTP/1.1\r\n"
            + H
            + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ],
        400,
    ),
    ("head never finished", [b"HEAD /healthz HTTP/1.1\r\n" + H], 408),
    (
        "body too large",
        [b"HEAD /v1/stream HTTP/1.1\r\n" + H + b"Content-Length: 99999999\r\n\r\n"],
        413,
    ),
    ("head too large, one piece", [b"HEAD /healthz HTTP/1.1\r\n" + H + BIG + b"\r\n"], 431),
    (
        "head too large, in pieces",
        [b"HEAD /healthz HTTP/1.1\r\n" + H, BIG[:2500], BIG[2500:], b"\r\n"],
        431,
    ),
    (
        "unknown transfer coding",
        [b"HEAD /healthz HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n"],
        501,
    ),
    ("HTTP/3.0", [b"HEAD /healthz HTTP/3.0\r\n" + H + b"\r\n"], 505),
    ("unknown path", [b"HEAD /nowhere HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"], 404),
    (
        "wrong method",
        [b"HEAD /v1/chat/completions HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"],
        405,
    ),
]


@pytest.mark.parametrize(
    ("name", "chunks", "status"), HEAD_REFUSALS, ids=[r[0] for r in HEAD_REFUSALS]
)
def test_refused_head_request_gets_the_head_only(
    name: str, chunks: list[bytes], status: int
) -> None:
    """A refusal answers HEAD like any response to HEAD (RFC 9110 §9.3.2): the head, with
    the Content-Length a GET would get, no body, no traceback. One mechanism decides it
    for every status, including heads too large or too malformed for h11 to parse."""
    with thread_server(**HARDENED) as (server, errors):
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(0.01)  # separate reads: the "in pieces" case needs them
            data = _read_to_close(sock, HEAD_TIMEOUT + SLACK)
        assert data.startswith(b"HTTP/1.1 %d " % status), (name, data[:200])
        assert data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1, (name, data)
        assert b"content-length: " in data.lower(), data
        assert healthz(server.port) == 200
        assert errors.messages() == [], errors.messages()


def test_content_length_with_transfer_encoding_is_refused_and_closed() -> None:
    """RFC 9112 §6.1: the server must close after such a request; the request hidden
    behind it is never answered."""
    raw = dict((b[0], b[1]) for b in BAD_REQUESTS)["CL and TE (smuggling shape)"]
    with thread_server(**HARDENED) as (server, _errors):
        outcome = exchange(server.port, [raw])
    assert outcome.status == 400
    assert outcome.data.count(b"HTTP/1.1 ") == 1, outcome.data


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"G",
        b"GET /healthz HTTP/1.1\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
        b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
)
@pytest.mark.parametrize("end", ["read", "half_close"])
def test_truncated_requests_never_hang(partial: bytes, end: str) -> None:
    with thread_server(**HARDENED) as (server, errors):
        before = server.probe()["tasks"]
        outcome = exchange(server.port, [partial], end=end)
        assert_sane(outcome, partial)
        assert outcome.status in (None, 400, 408), outcome
        assert outcome.closed or outcome.status is not None
        assert outcome.elapsed < HEAD_TIMEOUT + SLACK
        left = server.settle(before)
        assert left["connections"] == 0, left
        assert errors.messages() == []


def test_slowloris_trickle_is_cut_at_the_head_timeout() -> None:
    """Bytes trickling in do not extend the head deadline."""
    with thread_server(**HARDENED) as (server, _errors):
        sock = socket.create_connection((HOST, server.port), timeout=5)
        start = time.monotonic()
        status = None
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(HEAD_TIMEOUT / 6)
                if time.monotonic() - start > HEAD_TIMEOUT + SLACK + 1:
                    break
            head, _data, closed = _read_head(sock, SLACK)
            status = head.status_code if head is not None else None
            assert status == 408 or closed
        finally:
            sock.close()
        assert time.monotonic() - start < HEAD_TIMEOUT + 2 * SLACK


# --------------------------------------------------------------------------------------
# Fuzzing with Hypothesis
# --------------------------------------------------------------------------------------

KNOWN_TARGETS = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/providers",
    "/v1/stream",
    "/v1/stream?tokens=3&interval_ms=1",
    "/v1/stream?provider=openai",
    "/v1/streams/abc",
    "/v1/streams/abc/cancel",
    "/v1/chat",
    "/v1/chat/completions",
    "/.well-known/mercure",
    "/.well-known/mercure?topic=a",
    "/static/app.js",
    "/static/../pyproject.toml",
    "*",
]
KNOWN_HEADERS = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Connection",
    b"Expect",
    b"Authorization",
    b"Cookie",
    b"Last-Event-ID",
    b"X-Forwarded-For",
    b"X-Request-ID",
    b"Origin",
    b"Access-Control-Request-Method",
    b"Upgrade",
]
TRICKY_VALUES = [
    b"",
    b"0",
    b"-1",
    b"5",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"close",
    b"keep-alive",
    b"100-continue",
    b"application/json",
    b"application/x-www-form-urlencoded",
    b"Bearer x.y.z",
    b"websocket",
    b"\xff\xfe",
    b"a\r\nX-Injected: 1",
    b"a\rb",
    b"x" * 5000,
]
FORM_TYPE = b"application/x-www-form-urlencoded"
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

KNOWN_METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"CONNECT", b"get"]
methods = st.one_of(
    st.sampled_from(KNOWN_METHODS),
    st.sampled_from(KNOWN_METHODS[:3]),
    st.text(TOKEN_CHARS, min_size=1, max_size=10).map(str.encode),
    st.binary(max_size=8),
)
targets = st.one_of(
    st.sampled_from(KNOWN_TARGETS).map(str.encode),
    st.sampled_from(KNOWN_TARGETS).map(str.encode),
    st.tuples(st.sampled_from(KNOWN_TARGETS), st.text(max_size=30)).map(
        lambda t: (t[0] + t[1]).encode("utf-8", "surrogatepass")
    ),
    st.tuples(
        st.sampled_from(["/v1/stream?", "/.well-known/mercure?", "/v1/streams/x?"]),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "tokens",
                        "interval_ms",
                        "size",
                        "ttft_ms",
                        "provider",
                        "model",
                        "q",
                        "topic",
                        "lastEventID",
                        "access_token",
                    ]
                ),
                st.text(max_size=12),
            ),
            max_size=4,
        ),
    ).map(lambda t: (t[0] + urlencode(t[1])).encode()),
    st.binary(max_size=40),
)
header_names = st.one_of(
    st.sampled_from(KNOWN_HEADERS),
    st.sampled_from(KNOWN_HEADERS),
    st.text(TOKEN_CHARS, min_size=1, max_size=16).map(str.encode),
    st.binary(max_size=16),
)
header_values = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=48).map(str.encode),
    st.binary(max_size=48),
)
versions = st.sampled_from(
    [b"HTTP/1.1"] * 4
    + [b"HTTP/1.0"] * 2
    + [b"HTTP/2.0", b"HTTP/1.", b"", b"http/1.1", b"HTTP/1.1 "]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                        "content": json_values,
                        "parts": st.lists(
                            st.fixed_dictionaries(
                                {"type": st.sampled_from(["text", "file"])},
                                optional={"text": json_values},
                            ),
                            max_size=3,
                        ),
                    },
                ),
                max_size=3,
            ),
        ),
        "params": st.dictionaries(
            st.sampled_from(["tokens", "interval_ms", "size", "ttft_ms", "system", "max_tokens"]),
            st.one_of(st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=5)),
            max_size=3,
        ),
        "sseserver": st.dictionaries(
            st.sampled_from(["tokens", "interval_ms"]), st.integers(-5, 20), max_size=2
        ),
        "provider": json_values,
        "model": json_values,
        "stream": st.booleans(),
        "stream_options": json_values,
        "temperature": json_values,
    },
).map(lambda d: json.dumps(d).encode())
form_bodies = st.lists(
    st.tuples(
        st.sampled_from(["topic", "data", "id", "type", "retry", "private"]),
        st.text(max_size=20),
    ),
    max_size=6,
).map(lambda fields: urlencode(fields).encode())
bodies = st.one_of(st.binary(max_size=300), chat_bodies, form_bodies, st.just(b""))


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[list[bytes], str]:
    mode = draw(st.sampled_from(["full", "full", "full", "truncated", "garbage", "split"]))
    if mode == "garbage":
        data = draw(st.binary(min_size=1, max_size=400))
    else:
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
        line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
        headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
        if draw(st.integers(0, 4)):
            headers.insert(0, (b"Host", b"x"))
        body = draw(bodies)
        if body and draw(st.integers(0, 3)):
            headers.append((b"Content-Length", str(len(body)).encode()))
        if body and draw(st.booleans()):
            ctype = b"application/json" if body[:1] == b"{" else FORM_TYPE
            headers.append((b"Content-Type", ctype))
        head = eol.join([line, *(n + b": " + v for n, v in headers)]) + eol + eol
        data = head + body
        if mode == "truncated":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4))) if mode == "split" else []
    chunks, last = [], 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[last:cut])
        last = cut
    end = draw(st.sampled_from(["read", "read", "half_close", "rst"]))
    return [c for c in chunks if c] or [b""], end


def test_fuzzed_requests_never_crash_hang_or_leak() -> None:
    with thread_server(**HARDENED) as (server, errors):
        assert healthz(server.port) == 200
        baseline = server.settle(10**6)["tasks"]
        seen: list[tuple[str, str]] = []

        @settings(
            max_examples=int(os.environ.get("SSESERVER_FUZZ_EXAMPLES", "200")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=raw_requests())
        def one(request: tuple[list[bytes], str]) -> None:
            chunks, end = request
            outcome = exchange(server.port, chunks, end=end)
            if end != "rst":
                assert_sane(outcome, b"".join(chunks)[:200])
                assert outcome.elapsed < HEAD_TIMEOUT + SLACK, (outcome, b"".join(chunks)[:200])
            seen.append((end, repr(outcome)))

        one()
        assert healthz(server.port) == 200
        left = server.settle(baseline)
        assert left["connections"] == 0, left
        assert left["handlers"] == 0 and left["streams"] == 0, left
        assert left["tasks"] <= baseline, (left, baseline)
        assert errors.messages() == [], errors.messages()[:5]
        assert len(seen) > 20


# --------------------------------------------------------------------------------------
# Static files never escape their folder
# --------------------------------------------------------------------------------------

TRAVERSALS = [
    "/static/../pyproject.toml",
    "/static/../../pyproject.toml",
    "/static/%2e%2e/pyproject.toml",
    "/static/%2E%2E/pyproject.toml",
    "/static/%2e%2e%2fpyproject.toml",
    "/static/..%2fpyproject.toml",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%252e%252e%252fpyproject.toml",
    "/static/..%5c..%5cpyproject.toml",
    "/static/..\\..\\pyproject.toml",
    "/static/%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/%2F%2Fetc%2Fpasswd",
    "/static/..",
    "/static/.",
    "/static/%2e%2e",
    "/static/",
    "/static/app.js/../../pyproject.toml",
    "/static/app.js%00.html",
    "/static/%00",
    "/static/..%00/pyproject.toml",
    "/static/%c0%ae%c0%ae/pyproject.toml",
    "/static/%c0%af..%c0%afpyproject.toml",
    "/static/.%2e/pyproject.toml",
    "/static/file:%2f%2f%2fetc%2fpasswd",
    "/static/C:%5cWindows%5cwin.ini",
    "/../pyproject.toml",
    "/%2e%2e/pyproject.toml",
    "/static%2f..%2fpyproject.toml",
    "/sseserver/static/app.js",
    "/static/__init__.py",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_static_path_traversal(target: str) -> None:
    with thread_server(**HARDENED) as (server, errors):
        raw = f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            sock.sendall(raw)
            head, data, _closed = _read_head(sock, 3)
            # Read the rest of the body too (it is small) to look for file contents.
            sock.settimeout(0.5)
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except (TimeoutError, ConnectionError):
                pass
        assert head is not None, data
        assert head.status_code in (400, 404), (target, head.status_code, data[:200])
        assert not any(m in data for m in SECRET_MARKERS)
        assert PYPROJECT[:200] not in data
        assert errors.messages() == []


async def test_static_folder_is_a_fixed_table(tmp_path: Path) -> None:
    """Only regular files directly in the folder, read at start-up: no symlinks out, no
    subfolders, no files created later."""
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"root:x:0:0 secret")
    folder = tmp_path / "public"
    folder.mkdir()
    (folder / "ok.txt").write_text("hello")
    (folder / "link.txt").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.txt").write_text("inner")
    async with running_server(static_dir=str(folder)) as server:
        (folder / "late.txt").write_text("created after start-up")
        for target, status in [
            ("/static/ok.txt", 200),
            ("/static/link.txt", 404),
            ("/static/sub", 404),
            ("/static/sub/inner.txt", 404),
            ("/static/sub%2finner.txt", 404),
            ("/static/late.txt", 404),
            ("/static/..%2fsecret.txt", 404),
            ("/static/%2e%2e%2fsecret.txt", 404),
        ]:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            assert data.startswith(b"HTTP/1.1 %d " % status), (target, data[:200])
            assert b"root:x:0:0" not in data
            if status == 200:
                assert data.endswith(b"hello")
                assert b"x-content-type-options: nosniff" in data.lower()


# --------------------------------------------------------------------------------------
# Header and SSE field injection
# --------------------------------------------------------------------------------------

FORM = b"application/x-www-form-urlencoded"


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        oracle = h11.Connection(h11.CLIENT)
        oracle.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        oracle.send(h11.EndOfMessage())
        body = bytearray()
        status = 0
        headers: dict[str, list[str]] = {}
        async with asyncio.timeout(5):
            while True:
                event = oracle.next_event()
                if event is h11.NEED_DATA:
                    oracle.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    for k, v in event.headers:
                        headers.setdefault(k.decode(), []).append(v.decode("latin-1"))
                elif isinstance(event, h11.Data):
                    body += event.data
                else:
                    break
        return status, headers, bytes(body)
    finally:
        writer.close()


async def _publish(port: int, fields: list[tuple[str, str]]) -> tuple[int, bytes]:
    body = urlencode(fields).encode()
    raw = (
        b"POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nContent-Type: %b\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (FORM, len(body), body)
    )
    status, _headers, resp = await _request(port, raw)
    return status, resp


class Subscriber:
    """A Mercure subscriber reading raw bytes (de-chunked by h11) into an SSE parser."""

    def __init__(self, port: int, target: str, extra: bytes = b"") -> None:
        self.port, self.target, self.extra = port, target, extra
        self.parser = SSEParser()
        self.raw = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []

    async def __aenter__(self) -> Subscriber:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.writer.write(
            f"GET {self.target} HTTP/1.1\r\nHost: x\r\n".encode() + self.extra + b"\r\n"
        )
        self.oracle = h11.Connection(h11.CLIENT)
        self.oracle.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        self.oracle.send(h11.EndOfMessage())
        event = await self._next()
        assert isinstance(event, h11.Response), event
        self.status = event.status_code
        self.headers = list(event.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def _next(self) -> Any:
        async with asyncio.timeout(5):
            while (event := self.oracle.next_event()) is h11.NEED_DATA:
                self.oracle.receive_data(await self.reader.read(65536))
            return event

    async def next_event(self) -> Any:
        while not self.parser.events:
            event = await self._next()
            assert isinstance(event, h11.Data), event
            self.raw += event.data
            self.parser.feed(event.data)
        return self.parser.events.pop(0)


@pytest.mark.parametrize(
    "fields",
    [
        [("id", "a\nb")],
        [("id", "a\rb")],
        [("id", "a\r\nevent: evil")],
        [("id", "ok\n\ndata: evil\n\n")],
        [("id", "nul\x00id")],
        [("type", "a\nb")],
        [("type", "a\rb")],
        [("type", "message\r\ndata: evil")],
        [("type", "\n")],
        [("retry", "1\n2")],
        [("retry", "-1")],
        [("retry", "1e3")],
        [("id", "earliest")],
    ],
    ids=lambda f: repr(f),
)
async def test_mercure_publish_with_line_breaks_in_fields_is_refused(
    fields: list[tuple[str, str]],
) -> None:
    async with running_server() as server:
        port = server.port
        async with Subscriber(port, "/.well-known/mercure?topic=t") as sub:
            assert sub.status == 200
            status, body = await _publish(port, [("topic", "t"), ("data", "payload"), *fields])
            assert status == 400, (status, body)
            assert json.loads(body)["error"]["code"] == "bad_request"
            # Nothing reached the subscriber: the next event is the sentinel.
            status, _ = await _publish(port, [("topic", "t"), ("data", "sentinel"), ("id", "s1")])
            assert status == 200
            event = await sub.next_event()
            assert (event.type, event.data, event.last_event_id) == ("message", "sentinel", "s1")
            assert b"evil" not in sub.raw and b"payload" not in sub.raw


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("\n\nevent: evil\ndata: x", "\n\nevent: evil\ndata: x"),
        ("line1\n\nid: 666\nretry: 1\n\n:comment\n", "line1\n\nid: 666\nretry: 1\n\n:comment\n"),
        ("data: nested\n\n\n\n", "data: nested\n\n\n\n"),
        # CR and CRLF are line ends too: they survive as LF, inside the same one event.
        ("a\r\n\r\nevent: evil\rdata: x", "a\n\nevent: evil\ndata: x"),
        ("\r", "\n"),
        ("", ""),
    ],
)
async def test_mercure_data_with_blank_lines_is_one_event(data: str, expected: str) -> None:
    async with running_server() as server:
        port = server.port
        async with Subscriber(port, "/.well-known/mercure?topic=t") as sub:
            status, body = await _publish(port, [("topic", "t"), ("data", data), ("id", "one")])
            assert status == 200 and body == b"one"
            status, _ = await _publish(port, [("topic", "t"), ("data", "next"), ("id", "two")])
            assert status == 200
            first = await sub.next_event()
            second = await sub.next_event()
            assert (first.type, first.data, first.last_event_id) == ("message", expected, "one")
            assert (second.type, second.data, second.last_event_id) == ("message", "next", "two")


LAST_EVENT_ID_TRICKS = [
    # (how, raw header bytes or query)
    ("header", b"Last-Event-ID: abc%0d%0aSet-Cookie:%20evil=1\r\n"),
    ("header", b"Last-Event-ID: abc\r\nSet-Cookie: evil=1\r\n"),
    ("header", b"Last-Event-ID: \xff\xfe\x85\r\n"),
    ("header", b"Last-Event-ID: " + b"9" * 3000 + b"\r\n"),
    ("query", b"lastEventID=abc%0d%0aSet-Cookie:%20evil%3D1"),
    ("query", b"lastEventID=%0aevent:%20evil%0adata:%20x%0a%0a"),
    ("query", b"last_event_id=%00%0d"),
]


@pytest.mark.parametrize(("how", "trick"), LAST_EVENT_ID_TRICKS, ids=lambda x: repr(x)[:40])
@pytest.mark.parametrize(
    "path", ["/.well-known/mercure?topic=t", "/v1/stream?tokens=2&interval_ms=1"]
)
async def test_last_event_id_tricks_stay_inert(path: str, how: str, trick: bytes) -> None:
    async with running_server() as server:
        target = path + ("&" + trick.decode() if how == "query" else "")
        extra = trick if how == "header" else b""
        async with Subscriber(server.port, target, extra) as sub:
            assert sub.status == 200
            names = [k.lower() for k, _ in sub.headers]
            assert b"set-cookie" not in names
            assert len(names) == len(set(names)), names  # no header came twice
            for name, value in sub.headers:
                assert b"\r" not in value and b"\n" not in value
                assert b"evil" not in value, (name, value)
            event = await sub.next_event()
            # No injected event: the first one is what the endpoint sends first.
            assert event.type in ("missed", "start"), event
            assert "evil" not in event.type
            if event.type == "missed":
                json.loads(event.data)  # escaped JSON, not raw fields


async def test_raw_cr_in_last_event_id_header_is_400() -> None:
    async with running_server() as server:
        status, headers, body = await _request(
            server.port,
            b"GET /.well-known/mercure?topic=t HTTP/1.1\r\nHost: x\r\nLast-Event-ID: a\rb\r\n\r\n",
        )
        assert status == 400
        assert "set-cookie" not in headers
        json.loads(body)


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
