"""``RedisHub``s in the test's own process, and a subscriber's stream as a hub sees it:
for tests that look inside the hub (its outbox, what it follows) on a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sseserver.hub.redis import RedisHub
from sseserver.wire.chunked import Frame
from tests.support.sse_parser import Event, parse


class Reader:
    """The frames written to one subscriber, in order; closing it tells the hub."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.closers: list[Callable[[object], None]] = []

    def write_frame(self, frame: Frame) -> bool:
        self.raw += bytes(frame.raw)
        return True

    def on_close(self, callback: Callable[[object], None]) -> None:
        self.closers.append(callback)

    def close(self, reason: str = "complete") -> None:
        for callback in self.closers:
            callback(self)

    def finish(self, reason: str = "complete") -> None:
        self.close(reason)

    def events(self) -> list[Event]:
        return parse(bytes(self.raw))


@asynccontextmanager
async def started_hubs(url: str, count: int, **options: Any) -> AsyncIterator[list[RedisHub]]:
    """``count`` started hubs on ``url`` (each with ``options``), closed after."""
    hubs = [RedisHub(url, **options) for _ in range(count)]
    try:
        for hub in hubs:
            await hub.start()
        yield hubs
    finally:
        for hub in hubs:
            await hub.aclose()
