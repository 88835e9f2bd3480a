"""The limits shared through Redis (SPEC §9), on a real redis-server with an injected
clock: a request window shared by two instances across its boundary (the sliding
estimate), stream caps shared by two instances, a crashed instance's streams no longer
counted once its leases lapse, and both limits falling back to counting locally while
Redis is unreachable — logged and counted, never refusing what they cannot count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sseserver.config import Rate
from sseserver.web.ratelimit import ConcurrencyLimiter, WindowLimiter
from tests.support.procs import free_port
from tests.support.redis_server import redis_running
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


class Clock:
    """Wall time as the test says it is."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_request_window_is_shared_across_instances_and_its_boundary(
    tmp_path: Path,
) -> None:
    with redis_running(tmp_path / "redis") as redis:
        client = aioredis.from_url(redis.url)
        try:
            clock = Clock(1_000_005.0)  # half way through window 100,000 (10 s windows)
            a = WindowLimiter(Rate(3, 10.0), client, clock=clock)
            b = WindowLimiter(Rate(3, 10.0), client, clock=clock)
            assert [await a.hit("k"), await b.hit("k"), await a.hit("k")] == [0, 0, 0]
            assert await b.hit("k") == 5  # the 4th in the window: wait for its end
            assert await a.hit("other") == 0  # keys are counted apart
            # Refused requests count too (a client that hammers stays refused). Into the
            # next window the previous one (4) weighs less as time goes on:
            clock.now = 1_000_012.0  # 4 x 0.8 + 0 = 3.2
            assert await b.hit("k") == 8
            clock.now = 1_000_014.0  # 4 x 0.6 + 1 = 3.4
            assert await b.hit("k") == 6
            clock.now = 1_000_016.0  # 4 x 0.4 + 2 = 3.6
            assert await a.hit("k") == 4
            clock.now = 1_000_028.0  # the window after: 3 x 0.2 + 0 = 0.6
            assert await a.hit("k") == 0
            clock.now = 1_000_041.0  # two windows on: nothing of these counts is left
            assert [await b.hit("k") for _ in range(3)] == [0, 0, 0]
            assert a.fallbacks == b.fallbacks == 0
        finally:
            await client.aclose()


async def test_stream_caps_are_shared_and_a_crashed_instances_leases_lapse(
    tmp_path: Path,
) -> None:
    with redis_running(tmp_path / "redis") as redis:
        client = aioredis.from_url(redis.url)
        clock = Clock(2_000_000.0)
        a = ConcurrencyLimiter(2, client, lease_s=30.0, clock=clock)
        b = ConcurrencyLimiter(2, client, lease_s=30.0, clock=clock)
        try:
            first = await a.acquire("sub")
            second = await b.acquire("sub")
            assert first is not None and second is not None
            assert await a.acquire("sub") is None  # 2 open in all, whichever instance
            b.release(second)

            async def given_back() -> bool:
                return int(await client.zcard("sseserver:streams:sub")) == 1

            await eventually(given_back, 5, "the released slot given back")
            third = await a.acquire("sub")
            assert third is not None
            # A crashes: its leases are neither released nor renewed.
            await a.aclose()
            assert await b.acquire("sub") is None
            clock.now += 31.0  # past the leases' end
            assert await b.acquire("sub") is not None
            assert a.fallbacks == b.fallbacks == 0
        finally:
            await a.aclose()
            await b.aclose()
            await client.aclose()


async def test_limits_count_locally_while_redis_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        window = WindowLimiter(Rate(2, 10.0), client, clock=Clock(3_000_001.0))
        streams = ConcurrencyLimiter(1, client)
        with caplog.at_level(logging.WARNING, logger="sseserver"):
            assert [await window.hit("k") for _ in range(3)] == [0, 0, 9]
            lease = await streams.acquire("k")
            assert lease is not None and await streams.acquire("k") is None
            streams.release(lease)
            assert await streams.acquire("k") is not None
        assert window.fallbacks == 3 and streams.fallbacks == 3
        warnings = [r.getMessage() for r in caplog.records if "counting locally" in r.getMessage()]
        assert sum("rate limit" in w for w in warnings) == 1  # once per outage, not per hit
        assert sum("stream limit" in w for w in warnings) == 3
        await streams.aclose()
    finally:
        await client.aclose()
