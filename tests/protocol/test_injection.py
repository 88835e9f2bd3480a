"""No header or SSE field injection (SPEC §4, §8): Mercure ``id``/``type`` with CR/LF are
refused, ``data`` with blank lines arrives as ONE event, ``Last-Event-ID`` tricks stay inert.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import h11
import pytest

from tests.support.hardening import (
    HOST,
)
from tests.support.servers import running_server
from tests.support.sse_parser import SSEParser

pytestmark = pytest.mark.timeout(240)

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
