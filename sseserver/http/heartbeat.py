"""All open streams of one server, and the ONE shared timer that pings idle ones (SPEC §4),
ends streams past their deadline and aborts dropped slow readers that lingered: no timer
per stream, which at 100k streams would be 100k timer handles."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

from ..wire.chunked import Frame
from ..wire.errors import error_event_data
from ..wire.sse import encode_comment, encode_event, encode_retry
from .request import Request


class Ticked(Protocol):
    """What the shared tick needs of a stream (``Ticked`` is one)."""

    request: Request
    idle_ticks: int  # ticks since the stream's last write
    deadline: float  # monotonic time it must end by (0: never)
    deadline_reason: str
    close_reason: str  # why it ended ("" while open)

    def write_frame(self, f: Frame) -> bool: ...
    def write(self, payload: bytes) -> None: ...
    def close(self, reason: str = "complete") -> None: ...
    def abort_connection(self) -> None: ...


PING = Frame.of(encode_comment("ping"))
TOKEN_EXPIRED = encode_event(
    error_event_data("token_expired", "access token expired", retryable=True), event="error"
)


class StreamRegistry:
    """All open streams of one server, and the one shared timer that pings idle ones.

    The tick runs several times per heartbeat interval; each stream counts ticks since its
    last write (an int store on the hot path, no clock read), and gets ``: ping`` once it
    has been idle for a whole interval.
    """

    TICKS_PER_HEARTBEAT = 5
    LINGER_S = 2.0  # time a dropped slow reader gets to take its last comment

    def __init__(
        self, heartbeat_s: float, *, max_stream_s: float = 0.0, retry_ms: int = 2000
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.max_stream_s = max_stream_s
        self.retry_ms = retry_ms
        self.streams: set[Ticked] = set()
        self._lingering: list[tuple[float, Ticked]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pings_sent = 0
        self.ticks = 0
        self.on_tick: Callable[[], None] | None = None
        # Told of each stream opening (+1) and ending (-1): gauges true at any moment.
        self.on_count: Callable[[Ticked, int], None] | None = None

    def add(self, stream: Ticked) -> None:
        self.streams.add(stream)
        if self.on_count is not None:
            self.on_count(stream, 1)

    def discard(self, stream: Ticked) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
            if self.on_count is not None:
                self.on_count(stream, -1)

    def deadline(self) -> float:
        """When a stream opened now must end: ``max_stream_s`` less up to 10 %, at random,
        so that a fleet of clients does not reconnect all at once."""
        if self.max_stream_s <= 0:
            return 0.0
        return time.monotonic() + self.max_stream_s * random.uniform(0.9, 1.0)

    def linger(self, stream: Ticked) -> None:
        self._lingering.append((time.monotonic() + self.LINGER_S, stream))

    @property
    def tick_s(self) -> float:
        return self.heartbeat_s / self.TICKS_PER_HEARTBEAT

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        self.ticks += 1
        due = self.TICKS_PER_HEARTBEAT
        now = time.monotonic()
        for stream in list(self.streams):
            if stream.deadline and stream.deadline <= now:
                self._expire(stream)
                continue
            stream.idle_ticks += 1
            if stream.idle_ticks >= due:
                if stream.write_frame(PING):
                    self.pings_sent += 1
        if self.on_tick is not None:
            self.on_tick()
        if self._lingering:
            keep = []
            for deadline, stream in self._lingering:
                if deadline <= now:
                    stream.abort_connection()
                else:
                    keep.append((deadline, stream))
            self._lingering = keep
        self._schedule()

    def _expire(self, stream: Ticked) -> None:
        if stream.deadline_reason == "token_expired":
            stream.write(TOKEN_EXPIRED)
        else:
            # Maximum life reached: end cleanly and tell the client when to come back.
            stream.write(encode_retry(self.retry_ms))
        stream.close(stream.deadline_reason)

    def broadcast(self, payload: bytes) -> None:
        """Write the same payload to every open stream (framed once)."""
        f = Frame.of(payload)
        for stream in list(self.streams):
            stream.write_frame(f)

    def close_all(self, reason: str) -> None:
        for stream in list(self.streams):
            stream.close(reason)
