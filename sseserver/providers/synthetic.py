"""The synthetic provider: a deterministic model answer with no API key.

Token ``i`` is due at ``start + ttft + i * interval`` (absolute deadlines: timer overhead
never accumulates into drift), and its text depends only on ``i`` and ``size``, so a
resumed stream can be checked against an uninterrupted one.

Generations are pushed (``push``) by ONE shared ``Clock`` per provider: a heap of next
deadlines under a single loop timer, as heartbeats are ticked — no task, coroutine or
timer handle per generation. ``stream`` (the pull form) serves the compat routes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .base import BadRequest, Delta, DeltaSink, GenerationRequest, Usage

log = logging.getLogger("sseserver.providers.synthetic")

WORDS = (
    "stream",
    "token",
    "event",
    "server",
    "browser",
    "answer",
    "model",
    "socket",
    "proxy",
    "reader",
    "chunk",
    "buffer",
    "latency",
    "resume",
    "signal",
    "topic",
)

# (default, minimum, maximum) of each parameter
LIMITS: Mapping[str, tuple[float, float, float]] = {
    "tokens": (32, 0, 1_000_000_000),
    "interval_ms": (30, 0, 600_000),
    "size": (0, 0, 1_048_576),  # 0: natural word length
    "ttft_ms": (0, 0, 600_000),
}

YIELD_EVERY = 32  # at interval 0, let the loop run other work every this many tokens


def token_text(i: int, size: int = 0) -> str:
    """The deterministic text of token ``i``: a word and a space, cut or padded by
    repetition to ``size`` characters when ``size`` is given."""
    word = WORDS[(i * 7) % len(WORDS)] + " "
    if not size:
        return word
    if len(word) >= size:
        return word[:size]
    return (word * (size // len(word) + 1))[:size]


def parse_params(params: Mapping[str, Any]) -> dict[str, float]:
    """Validated synthetic parameters. Raises BadRequest naming the bad field."""
    out: dict[str, float] = {}
    for name, (default, low, high) in LIMITS.items():
        raw = params.get(name)
        if raw is None or raw == "":
            out[name] = default
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number") from None
        if not low <= value <= high or value != value:
            raise BadRequest(f"{name} must be between {low:g} and {high:g}")
        out[name] = value
    return out


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """``asyncio.sleep`` on an absolute deadline, with the loop passed in: on Python 3.11
    every ``get_running_loop()`` (which ``asyncio.sleep`` calls) is a getpid system call,
    paid here once per token of every stream."""
    future = loop.create_future()
    handle = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        handle.cancel()


class _NoSink:
    """What a cancelled run feeds: nothing."""

    def on_delta(self, text: str) -> None:
        pass

    def on_end(self, error: object) -> None:
        pass


NO_SINK: DeltaSink = _NoSink()


class Run:
    """One pushed synthetic generation: where it is, and what its consumer asked."""

    __slots__ = (
        "_clock",
        "cancelled",
        "due",
        "interval",
        "next",
        "parked",
        "paused",
        "queued",
        "sink",
        "size",
        "start",
        "tokens",
    )

    def __init__(self, clock: Clock, sink: DeltaSink, p: Mapping[str, float], now: float) -> None:
        self._clock = clock
        self.sink = sink
        self.tokens = int(p["tokens"])
        self.size = int(p["size"])
        self.interval = p["interval_ms"] / 1000
        self.start = now + p["ttft_ms"] / 1000  # token 0's deadline
        self.next = 0  # the next token's index
        self.due = self.start  # when the clock next looks at this run
        self.paused = False
        self.parked = False  # paused when its deadline came: off the clock until resumed
        self.cancelled = False  # cancelled, or ended: the clock skips it
        self.queued = False  # on the clock's heap

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.parked and not self.cancelled:
            self.parked = False
            self._clock.schedule(self)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.sink = NO_SINK  # what it fed can go at once, whenever the clock pops it
            if self.queued:
                self._clock.stale()

    def step(self, now: float) -> bool:
        """Emit every token due by ``now`` (at most YIELD_EVERY: the loop runs other work
        between batches); True when the run wants the clock again."""
        i, tokens, sink = self.next, self.tokens, self.sink
        start, interval, size = self.start, self.interval, self.size
        budget = YIELD_EVERY
        while i < tokens and budget and start + i * interval <= now:
            sink.on_delta(token_text(i, size))
            i += 1
            budget -= 1
            if self.paused or self.cancelled:
                break
        self.next = i
        if self.cancelled:
            return False
        if i >= tokens:
            self.cancelled = True  # done: nothing more from the clock
            sink.on_end(None)
            return False
        self.due = start + i * interval
        if self.paused:
            self.parked = True
            return False
        return True


class Clock:
    """The one timer behind every pushed synthetic generation of a provider."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Run]] = []
        self._order = itertools.count()  # ties broken by arrival, never by comparing runs
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")

        self._stale = 0  # cancelled runs still on the heap

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, run: Run) -> None:
        run.queued = True
        heapq.heappush(self._heap, (run.due, next(self._order), run))
        if run.due < self._armed_at:
            self._arm(run.due)

    def stale(self) -> None:
        """A queued run was cancelled. Runs far in the future (a long ``ttft_ms``) would
        sit on the heap until their deadline: past half the heap, it is rebuilt."""
        self._stale += 1
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap[:] = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._stale = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = float("inf")
        heap = self._heap
        now = self.loop.time()
        again: list[Run] = []
        while heap and heap[0][0] <= now:
            run = heapq.heappop(heap)[2]
            run.queued = False
            if run.cancelled:
                self._stale = max(0, self._stale - 1)
                continue
            if run.paused:
                run.parked = True
                continue
            try:
                wants_more = run.step(now)
            except Exception:  # a sink's bug ends its run, never the clock of the others
                log.exception("synthetic generation failed")
                run.cancel()
                continue
            if wants_more:
                again.append(run)  # after the loop: a batch-limited run waits its turn
        for run in again:
            run.queued = True
            heapq.heappush(heap, (run.due, next(self._order), run))
        if heap:
            self._arm(heap[0][0])


class SyntheticProvider:
    name = "synthetic"
    default_model = "synthetic-1"
    models: tuple[str, ...] = ("synthetic-1",)

    def __init__(self, **_options: Any) -> None:
        self._clock: Clock | None = None

    def validate(self, request: GenerationRequest) -> None:
        parse_params(request.params)

    def push(self, request: GenerationRequest, sink: DeltaSink) -> Run:
        """Start pushing ``request``'s tokens to ``sink`` on the shared clock."""
        p = parse_params(request.params)
        clock = self._clock
        if clock is None:
            clock = self._clock = Clock(asyncio.get_running_loop())
        run = Run(clock, sink, p, clock.loop.time())
        clock.schedule(run)
        return run

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        p = parse_params(request.params)
        tokens = int(p["tokens"])
        size = int(p["size"])
        interval = p["interval_ms"] / 1000
        ttft = p["ttft_ms"] / 1000
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(tokens):
            due = start + ttft + i * interval
            if due > loop.time():
                await _sleep_until(loop, due)
            elif i and i % YIELD_EVERY == 0:  # not before the first: TTFT
                await asyncio.sleep(0)
            yield Delta(token_text(i, size))
        prompt = sum(len(m.content.split()) for m in request.messages)
        yield Delta("", finish_reason="stop", usage=Usage(prompt, tokens, prompt + tokens))

    async def aclose(self) -> None:
        return None
