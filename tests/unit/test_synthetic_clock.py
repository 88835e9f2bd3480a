"""The synthetic provider's push form (``SyntheticProvider.push``): every run of a provider
is driven by ONE shared ``Clock`` — a heap of absolute deadlines under a single
``loop.call_at`` timer — with no task, coroutine or timer handle per generation.

Runs on a real event loop with a recording sink. Synchronisation is always a future set
by the sink (or a polled condition); the only plain waits are observation windows that
must pass for "nothing more happened" to mean anything, and they wait until an absolute
deadline of the run itself. Timing bounds are generous: the machine may be busy.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import pytest

from sseserver.providers.base import BadRequest, GenerationRequest, Message, ProviderError
from sseserver.providers.synthetic import (
    NO_SINK,
    YIELD_EVERY,
    Clock,
    Run,
    SyntheticProvider,
    token_text,
)
from tests.support.sinks import END_WITHIN_S, Recorder, ended, loop_turns
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)

# How late a token may be, at most, on a busy machine (its deadline is a lower bound).
LATE_S = 0.25


def ask(**params: Any) -> GenerationRequest:
    return GenerationRequest(model=None, messages=(Message("user", "hi"),), params=params)


def expected(tokens: int, size: int = 0, start: int = 0) -> list[str]:
    return [token_text(i, size) for i in range(start, tokens)]


def deadline(run: Run, i: int) -> float:
    """Token ``i``'s deadline, computed as ``Run.step`` computes it (the same float)."""
    return run.start + i * run.interval


def clock_of(provider: SyntheticProvider) -> Clock:
    clock = provider._clock
    assert clock is not None
    return clock


def live_timers(loop: asyncio.AbstractEventLoop) -> int:
    """Timer handles the loop will still run (``BaseEventLoop._scheduled`` keeps cancelled
    ones until they reach the top of its heap)."""
    scheduled: list[asyncio.TimerHandle] = getattr(loop, "_scheduled")  # noqa: B009
    return sum(1 for handle in scheduled if not handle.cancelled())


async def until(when: float) -> None:
    """An observation window: let the loop run until ``loop.time() >= when``. Not a
    synchronisation: used only to show that nothing happens meanwhile."""
    loop = asyncio.get_running_loop()
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------------------
# What is pushed, and when
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 40])
async def test_texts_in_order_then_one_end(size: int) -> None:
    provider = SyntheticProvider()
    rec = Recorder()
    run = provider.push(ask(tokens=40, interval_ms=1, size=size), rec)
    await ended(rec)
    await loop_turns()
    assert rec.texts == expected(40, size)
    assert rec.ends == [None]
    assert run.next == 40 and run.cancelled  # done: the clock skips it
    clock = clock_of(provider)
    assert len(clock) == 0
    assert clock._timer is None  # nothing left to time: no handle kept armed


async def test_zero_tokens_end_at_once_without_delta() -> None:
    rec = Recorder()
    SyntheticProvider().push(ask(tokens=0, ttft_ms=0), rec)
    await ended(rec)
    assert rec.deltas == [] and rec.ends == [None]


async def test_bad_parameter_is_refused_at_push() -> None:
    provider = SyntheticProvider()
    with pytest.raises(BadRequest, match="interval_ms"):
        provider.push(ask(interval_ms=-1), Recorder())
    assert provider._clock is None or len(provider._clock) == 0


async def test_tokens_come_on_their_deadlines_never_before() -> None:
    rec = Recorder()
    run = SyntheticProvider().push(ask(tokens=12, interval_ms=20, ttft_ms=30), rec)
    await ended(rec)
    assert rec.texts == expected(12)
    for i, t in enumerate(rec.times):
        assert t >= deadline(run, i), f"token {i} came {deadline(run, i) - t:.6f}s early"
        assert t - deadline(run, i) < LATE_S, f"token {i} came {t - deadline(run, i):.3f}s late"
    # absolute deadlines: no drift accumulates over the answer
    assert rec.times[-1] - deadline(run, 11) < LATE_S


async def test_ttft_is_respected() -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    pushed_at = loop.time()
    run = SyntheticProvider().push(ask(tokens=3, interval_ms=0, ttft_ms=150), rec)
    assert run.start >= pushed_at + 0.150
    await ended(rec)
    assert rec.texts == expected(3)
    first = rec.times[0]
    assert first >= pushed_at + 0.150
    assert first - (pushed_at + 0.150) < LATE_S
    # interval 0: every token is due at the first one's deadline
    assert rec.times[-1] - first < LATE_S


# --------------------------------------------------------------------------------------
# One timer for every run, no task
# --------------------------------------------------------------------------------------


async def test_many_runs_share_one_timer_and_no_task() -> None:
    loop = asyncio.get_running_loop()
    provider = SyntheticProvider()
    tasks_before = len(asyncio.all_tasks())
    timers_before = live_timers(loop)

    recs = [Recorder() for _ in range(200)]
    runs = [
        provider.push(ask(tokens=5, interval_ms=10, ttft_ms=i % 7), r) for i, r in enumerate(recs)
    ]

    clock = clock_of(provider)
    assert all(run._clock is clock for run in runs)
    assert len(clock) == 200  # one heap entry per run
    assert isinstance(clock._timer, asyncio.TimerHandle)
    assert live_timers(loop) - timers_before == 1  # the clock's, and nothing per run
    assert len(asyncio.all_tasks()) == tasks_before

    # mid-way, still one timer and no task
    async with asyncio.timeout(END_WITHIN_S):
        await asyncio.gather(*(r.reached(2) for r in recs))
    assert live_timers(loop) - timers_before <= 1
    assert len(asyncio.all_tasks()) == tasks_before

    await ended(*recs)
    for rec in recs:
        assert rec.texts == expected(5)
        assert rec.ends == [None]
    assert len(clock) == 0
    assert clock._timer is None
    assert live_timers(loop) == timers_before


async def test_one_clock_per_provider() -> None:
    a, b = SyntheticProvider(), SyntheticProvider()
    ra, rb = Recorder(), Recorder()
    run_a = a.push(ask(tokens=2, interval_ms=1), ra)
    run_b = b.push(ask(tokens=2, interval_ms=1), rb)
    assert run_a._clock is clock_of(a) and run_b._clock is clock_of(b)
    assert clock_of(a) is not clock_of(b)
    await ended(ra, rb)


async def test_interval_zero_emits_batches_of_yield_every_per_loop_iteration() -> None:
    """At interval 0 a run emits at most YIELD_EVERY tokens per fire, then lets the
    loop run: a callback re-queued with ``call_soon`` runs between every two batches."""
    loop = asyncio.get_running_loop()
    ticks = 0
    ticking = True

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticking:
            loop.call_soon(tick)

    tokens = 5 * YIELD_EVERY + 7
    seen: list[int] = []  # the tick count at each delta
    rec = Recorder(hook=lambda n: seen.append(ticks))
    loop.call_soon(tick)
    SyntheticProvider().push(ask(tokens=tokens, interval_ms=0), rec)
    try:
        await ended(rec)
    finally:
        ticking = False
    assert rec.texts == expected(tokens)
    batches = [count for _, count in sorted(Counter(seen).items())]
    assert batches == [YIELD_EVERY] * 5 + [7]
    assert len(set(seen)) == 6  # one batch per loop iteration


async def test_batch_limited_runs_take_turns() -> None:
    """Two runs at interval 0: each gets one batch per fire, neither starves."""
    order: list[str] = []
    a = Recorder(hook=lambda n: order.append("a"))
    b = Recorder(hook=lambda n: order.append("b"))
    provider = SyntheticProvider()
    provider.push(ask(tokens=3 * YIELD_EVERY, interval_ms=0), a)
    provider.push(ask(tokens=3 * YIELD_EVERY, interval_ms=0), b)
    await ended(a, b)
    runs = ["".join(group) for _, group in itertools.groupby(order)]
    assert runs == ["a" * YIELD_EVERY, "b" * YIELD_EVERY] * 3
    assert a.texts == b.texts == expected(3 * YIELD_EVERY)


# --------------------------------------------------------------------------------------
# pause / resume
# --------------------------------------------------------------------------------------


async def test_pause_parks_the_run_and_resume_catches_up() -> None:
    loop = asyncio.get_running_loop()
    provider = SyntheticProvider()
    rec = Recorder()
    tokens = 40
    run = provider.push(ask(tokens=tokens, interval_ms=20), rec)
    clock = clock_of(provider)

    await rec.wait_for(3)
    run.pause()
    k = len(rec.deltas)
    # parked once its next deadline came: off the heap, no timer kept for it
    await eventually(lambda: run.parked, within=5, what="the paused run to be parked")
    assert not run.queued and len(clock) == 0
    assert clock._timer is None

    # several deadlines pass: nothing is pushed while paused
    await until(deadline(run, k + 6) + 0.010)
    assert len(rec.deltas) == k
    assert rec.ends == []

    resumed_at = loop.time()
    run.resume()
    assert not run.parked and run.queued
    await ended(rec)
    assert rec.texts == expected(tokens)
    assert rec.ends == [None]
    times = rec.times
    missed = [i for i in range(k, tokens) if deadline(run, i) <= resumed_at]
    assert len(missed) >= 6
    for i in missed:  # the missed tokens come at once
        assert resumed_at <= times[i] < resumed_at + LATE_S
    assert times[missed[-1]] - times[missed[0]] < LATE_S / 2
    for i in range(k, tokens):  # ... then the schedule goes on; never before a deadline
        assert times[i] >= deadline(run, i)
        if i not in missed:
            assert times[i] - deadline(run, i) < LATE_S


async def test_pause_from_on_delta_stops_the_batch_at_once() -> None:
    runs: list[Run] = []

    def hook(n: int) -> None:
        if n == 5:
            runs[0].pause()

    rec = Recorder(hook=hook)
    provider = SyntheticProvider()
    runs.append(provider.push(ask(tokens=100, interval_ms=0), rec))
    run = runs[0]
    await rec.wait_for(6)
    await loop_turns(5)
    assert len(rec.deltas) == 6  # the token during which it paused is the last
    assert run.parked and not run.queued
    run.resume()
    await ended(rec)
    assert rec.texts == expected(100)
    assert rec.ends == [None]


async def test_resume_before_the_deadline_keeps_the_run_queued() -> None:
    rec = Recorder()
    provider = SyntheticProvider()
    run = provider.push(ask(tokens=3, interval_ms=10, ttft_ms=100), rec)
    run.pause()
    run.resume()  # its deadline has not come: it never left the heap
    assert run.queued and not run.parked
    assert len(clock_of(provider)) == 1
    await ended(rec)
    assert rec.texts == expected(3)


# --------------------------------------------------------------------------------------
# cancel
# --------------------------------------------------------------------------------------


async def test_cancel_stops_the_run_and_never_ends_it() -> None:
    provider = SyntheticProvider()
    rec = Recorder()
    run = provider.push(ask(tokens=20, interval_ms=10), rec)
    await rec.wait_for(3)
    run.cancel()
    k = len(rec.deltas)
    assert run.sink is NO_SINK  # what it fed can be collected at once
    clock = clock_of(provider)
    assert clock._stale == 1  # still on the heap until its deadline pops it

    await until(deadline(run, 19) + 0.050)  # past what would have been the end
    await eventually(lambda: len(clock) == 0, within=5, what="the stale entry to be popped")
    assert len(rec.deltas) == k
    assert rec.ends == []
    assert clock._stale == 0
    run.resume()  # a cancelled run is never put back
    assert len(clock) == 0


@pytest.mark.parametrize("at", [5, 99])
async def test_cancel_from_on_delta_of_the_same_run(at: int) -> None:
    """Even on the last token: a run cancelled during ``on_delta`` never ends."""
    runs: list[Run] = []

    def hook(n: int) -> None:
        if n == at:
            runs[0].cancel()

    rec = Recorder(hook=hook)
    provider = SyntheticProvider()
    runs.append(provider.push(ask(tokens=100, interval_ms=0), rec))
    # a companion run on the same clock tells when the clock has moved well past it
    companion = Recorder()
    provider.push(ask(tokens=4 * YIELD_EVERY, interval_ms=0), companion)
    await ended(companion)
    await loop_turns()
    assert rec.texts == expected(at + 1)
    assert rec.ends == []
    assert len(clock_of(provider)) == 0


async def test_cancel_of_another_run_from_on_delta() -> None:
    """A's ``on_delta`` cancels B (queued behind it) and C (already stepped this fire)."""
    runs: dict[str, Run] = {}
    provider = SyntheticProvider()

    def cancel_b(n: int) -> None:
        if n == 2:
            runs["b"].cancel()

    def cancel_a(n: int) -> None:
        if n == 3:
            runs["a"].cancel()

    a = Recorder(hook=cancel_b)
    b = Recorder()
    c = Recorder(hook=cancel_a)  # C is pushed last: it steps after A in each fire
    runs["a"] = provider.push(ask(tokens=10, interval_ms=10), a)
    runs["b"] = provider.push(ask(tokens=10, interval_ms=10), b)
    runs["c"] = provider.push(ask(tokens=10, interval_ms=10), c)
    await ended(c)
    await eventually(lambda: len(clock_of(provider)) == 0, within=5, what="an empty heap")

    # B's deadlines are behind A's (pushed later): it had tokens 0 and 1, never more
    assert b.texts == expected(2)
    assert b.ends == []
    # A had had token 3 before C's token 3 cancelled it: nothing after that
    assert a.texts == expected(4)
    assert a.ends == []
    assert c.texts == expected(10)
    assert c.ends == [None]
    assert clock_of(provider)._stale == 0


async def test_stale_entries_are_compacted() -> None:
    """Runs far in the future (a long ttft) sit on the heap once cancelled: past 64 and
    half the heap, it is rebuilt in place, and the live runs keep their schedule."""
    provider = SyntheticProvider()
    far = [provider.push(ask(tokens=5, ttft_ms=600_000), Recorder()) for _ in range(200)]
    clock = clock_of(provider)
    heap = clock._heap
    assert len(clock) == 200

    for run in far[:100]:
        run.cancel()
    assert len(clock) == 200 and clock._stale == 100  # not yet half and more than 64
    far[100].cancel()  # the 101st: more than half of 200
    assert len(clock) == 99 and clock._stale == 0
    assert clock._heap is heap  # rebuilt in place
    assert all(not entry[2].cancelled for entry in clock._heap)

    live = Recorder()
    provider.push(ask(tokens=5, interval_ms=1), live)  # a near run on the rebuilt heap
    for run in far[101:]:
        run.cancel()
    # 99 + 1 entries: compacted again at 65 stale (> 64 and more than half of 100)
    assert len(clock) <= 64
    assert clock._stale < 65
    await ended(live)
    assert live.texts == expected(5) and live.ends == [None]
    assert all(run.sink is NO_SINK for run in far)


class FailingSink(Recorder):
    """A sink whose ``on_end`` raises (a bug in the consumer)."""

    def on_end(self, error: ProviderError | None) -> None:
        super().on_end(error)
        raise RuntimeError("sink failed in on_end")


async def test_a_failing_sink_does_not_stall_the_other_runs() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        provider = SyntheticProvider()
        before, after = Recorder(), Recorder()
        provider.push(ask(tokens=10, interval_ms=10), before)  # steps first in each fire
        provider.push(ask(tokens=1, interval_ms=10), FailingSink())
        provider.push(ask(tokens=10, interval_ms=10), after)
        await ended(before, after, within=2.0)
        assert before.texts == after.texts == expected(10)
    finally:
        loop.set_exception_handler(None)
