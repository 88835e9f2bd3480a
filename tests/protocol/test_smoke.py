from __future__ import annotations

import asyncio

import pytest

from tests.support.chunks import split_chunks
from tests.support.rawhttp import read_until
from tests.support.servers import running_server
from tests.support.sse_parser import parse

pytestmark = pytest.mark.timeout(30)


async def test_get_stream_event_sequence() -> None:
    async with running_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1/stream?tokens=3&interval_ms=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await read_until(reader, b"0\r\n\r\n")
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        _sizes, data, _after = split_chunks(body)
        events = parse(data)
        types = [e.type for e in events]
        assert types == ["start", "message", "message", "message", "metrics", "message"]
        assert events[-1].data == "[DONE]"
