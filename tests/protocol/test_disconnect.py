"""Client disconnects (SPEC §7, §8): the generation's producer task is cancelled within
100 ms, the synthetic provider stops producing, the connection leaves the registry, and
no task leaks."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import pytest

from sseserver.generations import Generation
from sseserver.http.server import Server
from tests.support.rawhttp import RawClient, open_stream, start_generation
from tests.support.servers import app_server
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)

PROMPT_CANCEL_S = 0.1
START_ID = re.compile(rb'event: start\ndata: \{"id":"([^"]+)"')


def hang_up(client: RawClient, how: str) -> None:
    if how == "reset":
        sock = client.writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.writer.transport.abort()
    else:
        client.writer.close()


async def assert_cancelled_promptly(gen: Generation, since: float) -> None:
    # The producer lets its task go once done.
    await eventually(
        lambda: gen.finished and gen.task is None and gen.feed is None,
        within=2.0,
        what="generation stopped",
    )
    elapsed = time.monotonic() - since
    assert elapsed < PROMPT_CANCEL_S, f"producer stopped {elapsed * 1000:.0f} ms after hang-up"


async def assert_frozen(gen: Generation, window: float = 0.2) -> None:
    tokens = gen.tokens
    until = time.monotonic() + window
    while time.monotonic() < until:  # an observation window: nothing may change
        assert gen.tokens == tokens, "the provider kept producing after the client left"
        await asyncio.sleep(0.02)


async def assert_cleaned_up(server: Server, tasks_before: int) -> None:
    await eventually(lambda: not server.state.connections, what="connection removed")
    await eventually(lambda: not server.state.streams.streams, what="stream unregistered")
    await eventually(lambda: not server.state.handlers, what="no handler task")
    await eventually(
        lambda: len(asyncio.all_tasks()) <= tasks_before, within=2.0, what="no task leaked"
    )


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_disconnect_mid_stream_cancels_producer(how: str) -> None:
    async with app_server() as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        client, reader, gen_id = await start_generation(
            server.port, "/v1/stream?tokens=100000&interval_ms=10"
        )
        gen = ctx.generations.get(gen_id)
        assert gen is not None
        await reader.until(lambda r: len(r.arrivals) >= 5)
        assert not gen.finished and gen.tokens >= 4
        hung_up_at = time.monotonic()
        hang_up(client, how)
        await assert_cancelled_promptly(gen, hung_up_at)
        assert gen.cancel_reason == "abandoned"
        assert gen.tokens < 100000
        await assert_frozen(gen)
        assert ctx.generations.running == 0
        await client.close()
        await assert_cleaned_up(server, tasks_before)
        assert ctx.hub.subscriber_count() == 0


async def test_disconnect_before_first_token_cancels_producer() -> None:
    async with app_server() as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        client, _reader, gen_id = await start_generation(
            server.port, "/v1/stream?tokens=10&ttft_ms=10000"
        )
        gen = ctx.generations.get(gen_id)
        assert gen is not None
        hung_up_at = time.monotonic()
        hang_up(client, "close")
        await assert_cancelled_promptly(gen, hung_up_at)
        assert gen.tokens == 0
        await client.close()
        await assert_cleaned_up(server, tasks_before)


async def test_disconnect_while_producer_waits_on_paused_reader() -> None:
    """The producer is blocked in the flow-control wait (client read nothing); hanging up
    must still cancel it at once."""
    async with app_server(write_buffer_bytes=32 * 1024, heartbeat_s=60) as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(5):
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                await loop.sock_sendall(
                    sock,
                    b"GET /v1/stream?tokens=10000000&size=1000&interval_ms=0 HTTP/1.1\r\n"
                    b"Host: x\r\n\r\n",
                )
            buf = bytearray()
            async with asyncio.timeout(5):
                while not (m := START_ID.search(buf)):
                    data = await loop.sock_recv(sock, 4096)
                    assert data, "closed before the start event"
                    buf += data
            gen = ctx.generations.get(m.group(1).decode())
            (proto,) = server.state.connections
            await eventually(lambda: proto.flow.paused, within=20, what="paused")
            assert gen is not None
        finally:
            hung_up_at = time.monotonic()
            sock.close()
        await assert_cancelled_promptly(gen, hung_up_at)
        await assert_frozen(gen)
        await assert_cleaned_up(server, tasks_before)


async def test_viewer_leaving_keeps_generation_origin_leaving_keeps_it_for_viewer() -> None:
    """A generation is cancelled when its LAST viewer leaves, not before (SPEC §8)."""
    async with app_server() as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        origin, _reader, gen_id = await start_generation(
            server.port, "/v1/stream?tokens=100000&interval_ms=10"
        )
        gen = ctx.generations.get(gen_id)
        assert gen is not None
        viewer1, v1_resp, v1 = await open_stream(server.port, f"/v1/streams/{gen_id}")
        viewer2, v2_resp, v2 = await open_stream(server.port, f"/v1/streams/{gen_id}")
        assert v1_resp.status == 200 and v2_resp.status == 200
        await v1.until(lambda r: len(r.arrivals) >= 3)
        await v2.until(lambda r: len(r.arrivals) >= 3)
        assert len(gen.viewers) == 3

        await viewer1.close()
        await eventually(lambda: len(gen.viewers) == 2, what="viewer 1 detached")
        await origin.close()
        await eventually(lambda: len(gen.viewers) == 1, what="origin detached")
        tokens = gen.tokens
        await v2.until(lambda r: len(r.arrivals) >= 10)
        assert not gen.finished and gen.tokens > tokens, "generation must go on for a viewer"

        hung_up_at = time.monotonic()
        hang_up(viewer2, "close")
        await assert_cancelled_promptly(gen, hung_up_at)
        await assert_frozen(gen)
        await viewer2.close()
        await assert_cleaned_up(server, tasks_before)


async def test_disconnect_http10_stream_cancels_producer() -> None:
    async with app_server() as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        client, resp, reader = await open_stream(
            server.port, "/v1/stream?tokens=100000&interval_ms=10", version="1.0"
        )
        assert resp.status == 200
        start = await reader.next()
        gen = ctx.generations.get(json.loads(start.data)["id"])
        assert gen is not None
        hung_up_at = time.monotonic()
        hang_up(client, "close")
        await assert_cancelled_promptly(gen, hung_up_at)
        await client.close()
        await assert_cleaned_up(server, tasks_before)


async def test_disconnect_mid_request_body() -> None:
    """A client that leaves halfway through its request body leaves nothing behind."""
    async with app_server() as (server, ctx):
        tasks_before = len(asyncio.all_tasks())
        client = await RawClient.connect(server.port)
        client.write(
            b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"messages": ['
        )
        await client.writer.drain()
        await eventually(lambda: len(server.state.connections) == 1, what="connected")
        await client.close()
        await assert_cleaned_up(server, tasks_before)
        assert ctx.generations.running == 0
