"""Heartbeats (SPEC §4): ``: ping`` on idle streams, driven by ONE timer for the whole
server — so the number of asyncio tasks does not grow with the number of open streams
(beyond the one producer task each generation has, see ``sseserver/generations.py``)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.rawhttp import RawClient, Response, SSEReader, open_stream
from tests.support.servers import app_server
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

STREAMS = 200
# Tasks the server may add regardless of the number of streams (none are expected; the
# slack covers stray helper tasks of the event loop or pytest-asyncio).
TASK_SLACK = 5


def pings(reader: SSEReader) -> int:
    return reader.parser.comments.count("ping")


async def test_idle_stream_gets_pings() -> None:
    async with app_server(heartbeat_s=0.2) as (server, _ctx):
        client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=1&ttft_ms=2000")
        async with client:
            start = time.monotonic()
            first = await reader.next()
            assert first.type == "start"
            await reader.until(lambda r: pings(r) >= 3, within=1.8)
            elapsed = time.monotonic() - start
            # 3 pings at a 0.2 s interval take at least ~0.6 s; no burst of pings.
            assert elapsed >= 0.5, f"3 pings after {elapsed:.2f}s"
            assert [ev.type for _t, ev in reader.arrivals] == ["start"]
            assert server.state.streams.pings_sent >= 3


async def test_busy_stream_gets_no_pings() -> None:
    async with app_server(heartbeat_s=0.3) as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, "/v1/stream?tokens=20&interval_ms=30"
        )
        async with client:
            events = await reader.rest()
            assert events[-1].data == "[DONE]"
            assert pings(reader) == 0


async def _open_many(port: int, target: str, count: int) -> list[tuple[RawClient, SSEReader]]:
    opened: list[tuple[RawClient, Response, SSEReader]] = []
    for start in range(0, count, 50):  # in batches: bounded concurrency on accept
        batch = await asyncio.gather(
            *(open_stream(port, target) for _ in range(min(50, count - start)))
        )
        opened.extend(batch)
    for _client, resp, _reader in opened:
        assert resp.status == 200
    return [(client, reader) for client, _resp, reader in opened]


async def _close_all(clients: list[tuple[RawClient, SSEReader]]) -> None:
    await asyncio.gather(*(client.close() for client, _reader in clients))


async def test_many_generation_streams_one_timer() -> None:
    """200 idle ``/v1/stream`` streams: tasks grow by one producer per generation and
    nothing more; every stream gets pings."""
    async with app_server(heartbeat_s=0.2) as (server, ctx):
        await eventually(lambda: not server.state.handlers, what="no handler running")
        before = len(asyncio.all_tasks())
        clients = await _open_many(server.port, "/v1/stream?tokens=1&ttft_ms=20000", STREAMS)
        try:
            await eventually(
                lambda: len(server.state.streams.streams) == STREAMS and not server.state.handlers,
                what="all streams open, handlers done",
            )
            assert ctx.generations.running == STREAMS
            after = len(asyncio.all_tasks())
            assert after - before <= STREAMS + TASK_SLACK, (before, after)
            await asyncio.gather(
                *(reader.until(lambda r: pings(r) >= 2, within=5.0) for _c, reader in clients)
            )
            assert all(ev.type == "start" for _c, r in clients for _t, ev in r.arrivals)
        finally:
            await _close_all(clients)
        await eventually(
            lambda: ctx.generations.running == 0, within=5.0, what="generations abandoned"
        )
        await eventually(
            lambda: len(asyncio.all_tasks()) <= before,
            within=5.0,
            what="tasks back to the baseline",
        )


async def test_many_viewer_streams_add_no_tasks() -> None:
    """200 viewers of ONE generation (``/v1/streams/{id}``): the task count does not grow
    with them at all, and each still gets pings from the shared timer."""
    async with app_server(heartbeat_s=0.2) as (server, ctx):
        origin, _resp, origin_reader = await open_stream(
            server.port, "/v1/stream?tokens=1&ttft_ms=20000"
        )
        async with origin:
            start = await origin_reader.next()
            gen_id = json.loads(start.data)["id"]
            await eventually(lambda: not server.state.handlers, what="no handler running")
            before = len(asyncio.all_tasks())
            clients = await _open_many(server.port, f"/v1/streams/{gen_id}", STREAMS)
            try:
                await eventually(
                    lambda: (
                        len(server.state.streams.streams) == STREAMS + 1
                        and not server.state.handlers
                    ),
                    what="all viewers attached, handlers done",
                )
                after = len(asyncio.all_tasks())
                assert after - before <= TASK_SLACK, (before, after)
                assert ctx.generations.running == 1
                await asyncio.gather(
                    *(reader.until(lambda r: pings(r) >= 2, within=5.0) for _c, reader in clients)
                )
                # Each viewer got the replayed start event, then only pings.
                for _c, reader in clients:
                    assert [ev.type for _t, ev in reader.arrivals] == ["start"]
                    assert reader.arrivals[0][1].data == start.data
            finally:
                await _close_all(clients)
            await eventually(lambda: len(server.state.streams.streams) == 1, what="viewers gone")
            assert ctx.generations.running == 1  # the origin still watches


async def test_heartbeat_survives_many_ticks_without_timer_growth() -> None:
    """The shared tick keeps running (ticks increase) with no stream open, and a stream
    opened later is pinged on the same schedule."""
    async with app_server(heartbeat_s=0.1) as (server, _ctx):
        registry = server.state.streams
        ticks = registry.ticks
        await eventually(lambda: registry.ticks >= ticks + 5, what="ticks advance")
        client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=1&ttft_ms=1000")
        async with client:
            await reader.until(lambda r: pings(r) >= 2, within=0.9)
