"""The connection's timers on a fake transport and a clock the test turns by hand (as
uvicorn's protocol tests do with a mock transport): the head timeout against slowloris,
the keep-alive idle timeout, and a timer cancelled by the bytes that beat it. No wall
clock, no sockets: each case is exact and instant."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import pytest

from sseserver.config import Config
from sseserver.http.protocol import HTTPProtocol, ServerState
from sseserver.http.request import Request
from sseserver.http.stream import EventStream
from tests.support.waits import eventually

HEAD_TIMEOUT = 8.0  # binary fractions: the hand-turned clock adds them exactly
KEEPALIVE = 4.0
CONFIG = replace(Config(), header_timeout_s=HEAD_TIMEOUT, keepalive_timeout_s=KEEPALIVE)


class FakeTransport:
    """What the protocol uses of a TCP transport, recorded."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.data += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class HandCrankedLoop:
    """The running loop for everything but ``call_later``, whose timers fire only when
    the test advances the clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 0.0
        self._timers: list[_Timer] = []
        self._seq = 0

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> _Timer:
        self._seq += 1
        timer = _Timer(self.now + delay, self._seq, lambda: callback(*args))
        heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._timers and self._timers[0].when <= self.now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    @property
    def armed(self) -> int:
        return sum(not t.cancelled for t in self._timers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def ok_app(request: Request, stream: EventStream) -> None:
    stream.respond(200, b"{}")


def connect() -> tuple[HTTPProtocol, FakeTransport, HandCrankedLoop]:
    proto = HTTPProtocol(ServerState(CONFIG, ok_app))
    clock = HandCrankedLoop(asyncio.get_running_loop())
    proto._loop = clock  # type: ignore[assignment]
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, clock


def responses(data: bytes | bytearray) -> list[int]:
    """The statuses of the complete responses in ``data`` (h11 as the oracle)."""
    if not data:
        return []  # (h11 takes empty data for the end of the connection)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(bytes(data))
    statuses = []
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            statuses.append(event.status_code)
        if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            return statuses
        if isinstance(event, h11.EndOfMessage):
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return statuses
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())


async def test_a_silent_connection_is_closed_at_the_head_timeout_without_a_word() -> None:
    _proto, transport, clock = connect()
    clock.advance(HEAD_TIMEOUT - 0.25)
    assert not transport.closed
    clock.advance(0.25)
    assert transport.closed and transport.data == b""


async def test_a_head_that_never_ends_gets_408_at_the_head_timeout() -> None:
    proto, transport, clock = connect()
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n")
    clock.advance(HEAD_TIMEOUT / 2)
    proto.data_received(b"X-Slow: 1\r\n")  # a trickle does not reset the deadline
    clock.advance(HEAD_TIMEOUT / 2 - 0.25)
    assert not transport.closed
    clock.advance(0.25)
    assert transport.closed
    assert transport.data.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in transport.data


async def test_a_head_in_time_disarms_the_timer_then_keep_alive_has_its_own() -> None:
    proto, transport, clock = connect()
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: responses(transport.data) == [200], what="the response")
    await eventually(lambda: proto._task is None, what="the handler done")
    assert clock.armed == 1  # the keep-alive timer only: the head's was cancelled
    clock.advance(KEEPALIVE)
    # Idle keep-alive closes quietly: no 408 for a head that was never late.
    assert transport.closed and responses(transport.data) == [200]


async def test_keep_alive_waits_its_timeout_then_closes_quietly() -> None:
    proto, transport, clock = connect()
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: responses(transport.data) == [200], what="the response")
    await eventually(lambda: proto._task is None, what="the handler done")
    clock.advance(KEEPALIVE - 0.25)
    assert not transport.closed
    # A second request in time is served, and re-arms the head deadline meanwhile.
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: responses(transport.data) == [200, 200], what="the 2nd response")
    await eventually(lambda: proto._task is None, what="the handler done")
    clock.advance(KEEPALIVE)
    assert transport.closed and responses(transport.data) == [200, 200]


@pytest.mark.parametrize("split", [1, 7, 30])
async def test_a_head_in_pieces_before_the_deadline_is_served(split: int) -> None:
    proto, transport, clock = connect()
    head = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    for i in range(0, len(head), split):
        proto.data_received(head[i : i + split])
        clock.advance(HEAD_TIMEOUT / (len(head) + 1))
    await eventually(lambda: responses(transport.data) == [200], what="the response")
    assert not transport.closed
