"""Hand-made bad requests over real sockets (SPEC §3): each malformed, smuggling-shaped or
oversized request gets its status and a short JSON body, or a close; a refusal to HEAD
is the head only; nothing leaks.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.hardening import (
    HARDENED,
    HEAD_TIMEOUT,
    HOST,
    SLACK,
    _read_head,
    assert_sane,
    exchange,
    healthz,
    thread_server,
)

pytestmark = pytest.mark.timeout(240)

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
