"""``Generations`` with a pushing provider (``providers.base.Pushes``): the synthetic one on
its shared clock, its deltas published from the clock's callback with no producer task.

The viewers are real ``EventStream``s over a fake connection (a ``FlowControl`` the test
pauses and resumes as a transport would, and a transport that records what is written),
so what a browser would read is parsed back with the test SSE parser. Pinned: a reader
that is behind (``paused``) pauses the feed and ``when_drained`` resumes it; ``cancel``
ends with an error event then ``[DONE]``; ``shutdown(grace)`` lets short generations
finish and cancels the rest with reason ``shutdown``; a failing publish ends the
generation, not the clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, cast

import pytest

from sseserver.generations import Generation, Generations
from sseserver.http.flow import FlowControl
from sseserver.http.heartbeat import StreamRegistry
from sseserver.http.request import HeaderList, Request
from sseserver.http.stream import EventStream
from sseserver.hub.memory import MemoryHub
from sseserver.providers.base import GenerationRequest, Message, Provider
from sseserver.providers.synthetic import NO_SINK, Run, SyntheticProvider, token_text
from tests.support.sinks import loop_turns
from tests.support.sse_parser import Event, SSEParser
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)

END_WITHIN_S = 10.0


class RecordingTransport(asyncio.WriteTransport):
    """What the server's transport is to a stream: ``write`` (recorded), and a close."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeConnection:
    """Just enough of ``HTTPProtocol`` (``http.stream.Channel``) for one event stream:
    raw (unchunked) body bytes, and flow control driven by the test."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = RecordingTransport()
        self.recorded = self.transport
        self.flow = FlowControl(asyncio.get_running_loop())
        self.ended = 0

    def send_head(
        self, status: int, headers: HeaderList, body: bytes = b"", preamble: bytes = b""
    ) -> bool:
        assert status == 200
        assert self.transport is not None
        self.transport.write(preamble)
        return False  # not chunked: the body is the SSE bytes themselves

    def end_response(self) -> None:
        self.ended += 1

    def close_connection(self, abort: bool = False) -> None:
        if self.transport is not None:
            self.transport.close()

    def lose(self) -> None:
        """The client went away (``HTTPProtocol.connection_lost``)."""
        self.transport = None
        self.flow.release()


class Viewer:
    """A reader of a generation: its stream, its connection, and what it has been sent."""

    def __init__(self) -> None:
        request = Request(
            method="GET",
            target="/v1/stream",
            path="/v1/stream",
            query_string="",
            headers=[(b"host", b"x")],
            http_version="1.1",
        )
        self.conn = FakeConnection()
        self.stream = EventStream(request, self.conn, StreamRegistry(15.0))
        assert self.stream.start()

    def events(self) -> list[Event]:
        data = self.conn.recorded
        assert isinstance(data, RecordingTransport)
        parser = SSEParser()
        return parser.feed(data.data)

    def texts(self) -> list[str]:
        return [json.loads(e.data)["text"] for e in self.events() if self.kind(e) == "message"]

    def types(self) -> list[str]:
        return [self.kind(e) for e in self.events()]

    @staticmethod
    def kind(event: Event) -> str:
        """The event's type, ``[DONE]`` for the last data-only event."""
        return "[DONE]" if event.type == "message" and event.data == "[DONE]" else event.type

    def error(self) -> dict[str, Any]:
        (error,) = [json.loads(e.data) for e in self.events() if e.type == "error"]
        assert isinstance(error, dict)
        return error

    def pause(self) -> None:
        """The transport's buffer went over its high-water mark."""
        self.conn.flow.pause_writing()

    def resume(self) -> None:
        self.conn.flow.resume_writing()


class Ends:
    """The ``Generations`` observer: a future per generation, set at its end."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._futures: dict[str, asyncio.Future[None]] = {}
        # (generation id, notification): raise from it, a bug's stand-in
        self.fail_on: tuple[str, str] | None = None

    def __call__(self, gen: Generation, what: str) -> None:
        self.seen.append((gen.id, what))
        if what == "end":
            self.of(gen).set_result(None)
        if (gen.id, what) == self.fail_on:
            raise RuntimeError(f"observer failed on {what}")

    def of(self, gen: Generation) -> asyncio.Future[None]:
        future = self._futures.get(gen.id)
        if future is None:
            future = self._futures[gen.id] = asyncio.get_running_loop().create_future()
        return future

    async def wait(self, *gens: Generation, within: float = END_WITHIN_S) -> None:
        async with asyncio.timeout(within):
            await asyncio.gather(*(self.of(g) for g in gens))


def ask(**params: Any) -> GenerationRequest:
    return GenerationRequest(model=None, messages=(Message("user", "hi"),), params=params)


def setup(**kwargs: Any) -> tuple[Generations, SyntheticProvider, Ends]:
    ends = Ends()
    return Generations(MemoryHub(), observer=ends, **kwargs), SyntheticProvider(), ends


def start(
    gens: Generations, provider: SyntheticProvider, viewer: Viewer, **params: Any
) -> tuple[Generation, Run]:
    gen = gens.start(
        as_provider(provider), ask(**params), viewer.stream, started_at=time.monotonic()
    )
    run = gen.feed
    assert isinstance(run, Run)
    return gen, run


def as_provider(provider: SyntheticProvider) -> Provider:
    # SyntheticProvider.models is inferred as ``tuple[str]``, not the protocol's
    # ``tuple[str, ...]``: a typing detail of the provider, not of these tests.
    return cast(Provider, provider)


def expected(tokens: int) -> list[str]:
    return [token_text(i) for i in range(tokens)]


# --------------------------------------------------------------------------------------


async def test_pushed_generation_is_published_without_a_task() -> None:
    gens, provider, ends = setup()
    viewer = Viewer()
    tasks_before = len(asyncio.all_tasks())
    gen, run = start(gens, provider, viewer, tokens=12, interval_ms=1)
    assert gen.task is None  # no producer task: the clock pushes
    assert len(asyncio.all_tasks()) == tasks_before
    await ends.wait(gen)
    assert viewer.types() == ["start"] + ["message"] * 12 + ["metrics", "[DONE]"]
    assert viewer.texts() == expected(12)
    ids = [e.last_event_id for e in viewer.events()]
    assert ids == [f"{gen.id}:{seq}" for seq in range(15)]
    metrics = json.loads(viewer.events()[-2].data)
    assert metrics["tokens"] == 12 and metrics["ttft_ms"] is not None
    assert gen.finished and gen.feed is None and gen.error_code is None
    assert run.cancelled  # done: off the clock
    assert viewer.stream.state == "done"  # the final update ended the body
    assert gens.running == 0 and gens.ended == 1
    assert [what for _, what in ends.seen] == ["first_token", "end"]


async def test_paused_reader_pauses_the_feed_and_when_drained_resumes_it() -> None:
    gens, provider, ends = setup()
    viewer = Viewer()
    tokens = 60
    gen, run = start(gens, provider, viewer, tokens=tokens, interval_ms=5)
    await eventually(lambda: gen.tokens >= 3, within=5, what="three tokens")

    viewer.pause()
    # the next delta finds the reader behind: the feed is paused, then parked
    await eventually(lambda: gen.held and run.paused, within=5, what="the feed to be held")
    await eventually(lambda: run.parked, within=5, what="the run to be parked")
    frozen = gen.tokens
    # several deadlines pass (an observation window): nothing more is produced
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, run.start + (frozen + 5) * run.interval - loop.time()))
    assert gen.tokens == frozen
    assert not gen.finished

    viewer.resume()  # the reader caught up: ``when_drained`` resumes the feed
    await ends.wait(gen)
    assert not gen.held
    assert viewer.texts() == expected(tokens)  # in order, none lost, none twice
    assert viewer.types()[-2:] == ["metrics", "[DONE]"]


async def test_feed_stays_held_while_another_throttling_reader_is_behind() -> None:
    gens, provider, ends = setup()
    first, second = Viewer(), Viewer()
    gen, run = start(gens, provider, first, tokens=40, interval_ms=5)
    assert await gens.join(gen, second.stream, None, throttle=True)
    await eventually(lambda: gen.tokens >= 3, within=5, what="three tokens")

    first.pause()  # the feed is held on the first reader's drain
    await eventually(lambda: run.parked, within=5, what="the run to be parked")
    second.pause()
    first.resume()  # it caught up; the recheck finds the second behind: still held
    await loop_turns(5)
    assert gen.held and run.paused and run.parked
    frozen = gen.tokens
    await loop_turns(5)
    assert gen.tokens == frozen

    second.resume()
    await ends.wait(gen)
    assert not gen.held
    assert first.texts() == second.texts() == expected(40)


async def test_a_reader_that_leaves_while_behind_releases_the_feed() -> None:
    """``when_drained`` also fires when the client is gone: the generation does not stay
    held, and with no viewer left it is cancelled as abandoned."""
    gens, provider, ends = setup()
    viewer = Viewer()
    gen, run = start(gens, provider, viewer, tokens=10_000, interval_ms=5)
    await eventually(lambda: gen.tokens >= 2, within=5, what="two tokens")
    viewer.pause()
    await eventually(lambda: gen.held, within=5, what="the feed to be held")

    viewer.conn.lose()
    viewer.stream.connection_lost()
    await ends.wait(gen)
    assert gen.cancel_reason == "abandoned"
    assert gen.error_code == "abandoned"
    assert run.cancelled and run.sink is NO_SINK
    assert gens.running == 0


async def test_cancel_ends_with_an_error_event_then_done() -> None:
    gens, provider, ends = setup()
    viewer = Viewer()
    gen, run = start(gens, provider, viewer, tokens=10_000, interval_ms=5)
    await eventually(lambda: gen.tokens >= 3, within=5, what="three tokens")

    assert gens.cancel(gen, "cancelled")
    assert gen.finished  # at once: no task to wait for
    assert run.cancelled and run.sink is NO_SINK
    sent = viewer.types()
    assert sent[-3:] == ["error", "metrics", "[DONE]"]
    assert set(sent[1:-3]) == {"message"}
    error = viewer.error()
    assert error == {"code": "cancelled", "message": "generation cancelled", "retryable": False}
    heard = len(viewer.events())

    # the clock pops the cancelled run at its next deadline: nothing more is written
    clock = provider._clock
    assert clock is not None
    await eventually(lambda: len(clock) == 0, within=5, what="the run to leave the heap")
    assert len(viewer.events()) == heard
    assert not gens.cancel(gen, "cancelled")  # once
    assert [what for _, what in ends.seen].count("end") == 1


async def test_shutdown_lets_short_generations_end_and_cancels_the_rest() -> None:
    gens, provider, _ = setup()
    short_viewer, long_viewer = Viewer(), Viewer()
    short, _ = start(gens, provider, short_viewer, tokens=5, interval_ms=10)
    long, long_run = start(gens, provider, long_viewer, tokens=1_000_000, interval_ms=10)

    loop = asyncio.get_running_loop()
    began = loop.time()
    await gens.shutdown(0.3)
    took = loop.time() - began
    assert 0.29 <= took < 2.0

    assert short.error_code is None and short_viewer.texts() == expected(5)
    assert long.finished and long.cancel_reason == "shutdown"
    assert long_viewer.error() == {
        "code": "shutdown",
        "message": "server shutting down",
        "retryable": True,
    }
    assert long_viewer.types()[-3:] == ["error", "metrics", "[DONE]"]
    assert long_run.cancelled
    assert gens.running == 0


async def test_shutdown_returns_as_soon_as_every_generation_has_ended() -> None:
    gens, provider, _ = setup()
    viewers = [Viewer() for _ in range(3)]
    started = [start(gens, provider, v, tokens=4, interval_ms=10)[0] for v in viewers]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await gens.shutdown(30.0)
    assert loop.time() - began < 5.0  # not the grace: the end of the last one
    assert all(g.finished and g.error_code is None for g in started)
    assert all(v.texts() == expected(4) for v in viewers)


async def test_bad_parameters_end_the_generation_at_start() -> None:
    gens, provider, _ = setup()
    viewer = Viewer()
    gen = gens.start(
        as_provider(provider), ask(tokens=-1), viewer.stream, started_at=time.monotonic()
    )
    assert gen.finished and gen.feed is None
    assert viewer.types() == ["start", "error", "metrics", "[DONE]"]
    assert viewer.error()["code"] == "bad_request"


async def test_a_failing_publish_ends_the_generation_not_the_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gens, provider, ends = setup()
    viewer, other_viewer = Viewer(), Viewer()
    gen, run = start(gens, provider, viewer, tokens=50, interval_ms=2)
    other, _ = start(gens, provider, other_viewer, tokens=5, interval_ms=2)
    ends.fail_on = (gen.id, "first_token")  # raised inside the clock's callback
    with caplog.at_level(logging.ERROR, logger="sseserver.generations"):
        await ends.wait(gen)
    assert gen.error_code == "internal_error"
    assert viewer.error() == {
        "code": "internal_error",
        "message": "RuntimeError",
        "retryable": True,
    }
    assert viewer.types()[-3:] == ["error", "metrics", "[DONE]"]
    assert run.cancelled and run.sink is NO_SINK
    assert any(r.getMessage() == f"generation {gen.id} failed" for r in caplog.records)
    # the shared clock goes on for the other generation
    await ends.wait(other)
    assert other.error_code is None
    assert other_viewer.texts() == expected(5)


async def test_a_watcher_that_falls_behind_is_dropped_and_holds_nothing() -> None:
    """Watchers that only joined (``throttle=False``) are cut when behind; they never
    pause the feed of the generation's own reader."""
    gens, provider, ends = setup()
    viewer, watcher = Viewer(), Viewer()
    gen, run = start(gens, provider, viewer, tokens=30, interval_ms=2)
    assert await gens.join(gen, watcher.stream, None, throttle=False)
    await eventually(lambda: gen.tokens >= 2, within=5, what="two tokens")
    watcher.pause()
    await ends.wait(gen)
    assert watcher.stream.close_reason == "slow_client"
    assert watcher.stream not in gen.viewers
    assert not run.parked
    assert viewer.texts() == expected(30)


async def test_a_failing_end_does_not_stall_other_generations() -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # the escaped error
    try:
        gens, provider, ends = setup()
        viewers = [Viewer() for _ in range(3)]
        before, _ = start(gens, provider, viewers[0], tokens=10, interval_ms=10)
        failing, _ = start(gens, provider, viewers[1], tokens=1, interval_ms=10)
        after, _ = start(gens, provider, viewers[2], tokens=10, interval_ms=10)
        ends.fail_on = (failing.id, "end")
        await ends.wait(before, after, within=2.0)
        assert viewers[0].texts() == viewers[2].texts() == expected(10)
    finally:
        loop.set_exception_handler(None)
