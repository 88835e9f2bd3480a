"""Flow control and slow clients over real sockets (SPEC §5).

The client is a raw non-blocking socket with a small receive buffer: not calling
``sock_recv`` means it truly reads nothing (an asyncio StreamReader would keep reading
into its own buffer). The kernel's buffers fill first, then the server transport's
buffer reaches its high-water mark (``write_buffer_bytes``), ``pause_writing`` fires and
the generation's producer must wait: its token count stops growing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from sseserver.generations import Generation
from sseserver.http.protocol import HTTPProtocol
from sseserver.http.server import Server
from tests.support.rawhttp import HOST, open_stream
from tests.support.servers import app_server
from tests.support.sse_parser import SSEParser
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

WRITE_BUFFER = 64 * 1024
TOKEN_SIZE = 1000
# One framed token event: ~1000 chars of text plus id, JSON and chunk framing.
EVENT_SLACK = 2 * (TOKEN_SIZE + 200)


@asynccontextmanager
async def raw_socket(port: int) -> AsyncIterator[socket.socket]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(sock, (HOST, port))
        yield sock
    finally:
        sock.close()


async def recv_some(sock: socket.socket, within: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        return await loop.sock_recv(sock, 65536)


async def read_start(sock: socket.socket) -> tuple[str, bytearray]:
    """Read until the start event has arrived; returns its generation id."""
    buf = bytearray()
    deadline = time.monotonic() + 5
    while b"event: start" not in buf or b"\n\n" not in buf.split(b"event: start", 1)[1]:
        assert time.monotonic() < deadline, "no start event"
        data = await recv_some(sock)
        assert data, "closed before the start event"
        buf += data
    body = buf.partition(b"\r\n\r\n")[2]
    # Chunk framing lines are not SSE lines a parser would misread: they only add
    # ignorable junk lines here, and the start event itself sits whole inside one chunk.
    parser = SSEParser()
    for line in body.split(b"\r\n"):
        parser.feed(line)
    start = next(e for e in parser.events if e.type == "start")
    return json.loads(start.data)["id"], buf


def only_connection(server: Server) -> HTTPProtocol:
    (proto,) = server.state.connections
    return proto


async def wait_until_frozen(gen: Generation, proto: HTTPProtocol, limit: float) -> int:
    """Wait for the producer to be paused; return the largest transport buffer seen."""
    biggest = 0

    def paused() -> bool:
        nonlocal biggest
        transport = proto.transport
        assert transport is not None
        biggest = max(biggest, transport.get_write_buffer_size())
        return proto.flow.paused

    await eventually(paused, within=limit, what="the connection to pause writing")
    return biggest


async def test_client_reading_nothing_pauses_the_producer() -> None:
    target = f"/v1/stream?tokens=10000000&size={TOKEN_SIZE}&interval_ms=0"
    async with app_server(write_buffer_bytes=WRITE_BUFFER, heartbeat_s=60) as (server, ctx):
        loop = asyncio.get_running_loop()
        async with raw_socket(server.port) as sock:
            await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            gen_id, _ = await read_start(sock)
            gen = ctx.generations.get(gen_id)
            assert gen is not None
            proto = only_connection(server)
            transport = proto.transport
            assert transport is not None

            # Stop reading. The kernel buffers fill, then the transport's, then we pause.
            biggest = await wait_until_frozen(gen, proto, limit=20)
            assert biggest <= WRITE_BUFFER + EVENT_SLACK, biggest

            # Paused: the token count is frozen while the client reads nothing.
            frozen = gen.tokens
            assert frozen < 10_000_000
            observed_until = time.monotonic() + 0.5
            while time.monotonic() < observed_until:  # an observation window, not a sync
                size = transport.get_write_buffer_size()
                assert size <= WRITE_BUFFER + EVENT_SLACK, size
                assert gen.tokens == frozen, "producer kept going while the client read nothing"
                await asyncio.sleep(0.02)
            assert not gen.finished

            # Start reading again: tokens flow.
            got = 0
            deadline = time.monotonic() + 10
            while gen.tokens < frozen + 500:
                assert time.monotonic() < deadline, "tokens did not flow after reading resumed"
                data = await recv_some(sock)
                assert data, "server closed the stream"
                got += len(data)
            assert got > 0
            assert transport.get_write_buffer_size() <= WRITE_BUFFER + EVENT_SLACK

        # Client gone: the generation is abandoned and stops.
        await eventually(lambda: gen.finished, within=2.0, what="generation ended")
        assert gen.task is None and gen.feed is None  # done, and released


async def test_paused_reader_repeatedly_refills_within_bound() -> None:
    """Stop, read a little, stop again: every pause keeps the buffer under the bound."""
    target = f"/v1/stream?tokens=10000000&size={TOKEN_SIZE}&interval_ms=0"
    async with app_server(write_buffer_bytes=WRITE_BUFFER, heartbeat_s=60) as (server, ctx):
        loop = asyncio.get_running_loop()
        async with raw_socket(server.port) as sock:
            await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            gen_id, _ = await read_start(sock)
            gen = ctx.generations.get(gen_id)
            assert gen is not None
            proto = only_connection(server)
            for _round in range(3):
                biggest = await wait_until_frozen(gen, proto, limit=20)
                assert biggest <= WRITE_BUFFER + EVENT_SLACK, biggest
                before = gen.tokens
                deadline = time.monotonic() + 10
                while gen.tokens <= before:  # read until the producer moves again
                    assert time.monotonic() < deadline, "tokens did not flow again"
                    assert await recv_some(sock), "server closed the stream"


async def test_slow_viewer_is_dropped_and_does_not_hold_back_others() -> None:
    """A viewer that joined (``/v1/streams/{id}``) and reads nothing is disconnected when
    it falls behind; the origin stream runs to its end at full speed (SPEC §5, §8)."""
    tokens = 10000
    target = f"/v1/stream?tokens={tokens}&size={TOKEN_SIZE}&interval_ms=0&ttft_ms=300"
    async with app_server(write_buffer_bytes=WRITE_BUFFER, heartbeat_s=0.5) as (server, ctx):
        loop = asyncio.get_running_loop()
        origin, _resp, reader = await open_stream(server.port, target)
        async with origin:
            start = await reader.next()
            gen_id = json.loads(start.data)["id"]
            gen = ctx.generations.get(gen_id)
            assert gen is not None
            async with raw_socket(server.port) as slow:
                await loop.sock_sendall(
                    slow, f"GET /v1/streams/{gen_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                await eventually(lambda: len(gen.viewers) == 2, what="viewer attached")
                (viewer,) = (v for v in gen.viewers if v.request.path.startswith("/v1/streams/"))
                closed: list[tuple[str, bool]] = []
                viewer.on_close(lambda s: closed.append((s.close_reason, gen.finished)))
                events = await reader.rest(within=30)
                assert events[-1].data == "[DONE]"
                assert sum(1 for e in events if e.type == "message") == tokens + 1
                # The slow viewer was cut loose while the generation ran, not waited for.
                assert closed == [("slow_client", False)]
                await eventually(
                    lambda: len(server.state.connections) == 1,
                    within=5.0,
                    what="the slow viewer's connection closed",
                )
