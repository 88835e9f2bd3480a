from __future__ import annotations

import asyncio

import pytest

from tests.conftest import read_until, running_server
from tests.sse_parser import parse

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
        # de-chunk
        data = bytearray()
        rest = body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            data += rest[:size]
            rest = rest[size + 2 :]
        events = parse(bytes(data))
        types = [e.type for e in events]
        assert types == ["start", "message", "message", "message", "metrics", "message"]
        assert events[-1].data == "[DONE]"
