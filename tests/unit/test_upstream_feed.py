"""Pushed generations over the lean upstream client (``upstream_feed.UpstreamFeed``):
``LeanOpenAIProvider.push`` and ``LeanGeminiProvider.push`` against the fake upstreams of
``tests.upstreams`` run in-process on a free loopback port (they record every connection:
when and by whom it was closed, and how many chunks were written on it).

What is pinned: the same deltas and the same errors as the pull path (``stream()``), one
``on_end``; an answer that fails mid-stream closes its connection; ``cancel()`` before the
head or mid-body closes the upstream connection within 100 ms (SPEC §7) and the sink hears
nothing more; ``pause()`` stops reading the socket while the upstream keeps writing and
``resume()`` brings the rest; a finished answer's connection goes back to the pool.

Waits are on futures set by the sink or on the fake's records; timing bounds are loose
except the 100 ms of the SPEC (measured at the upstream's socket).
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from sseserver.providers.base import (
    Delta,
    GenerationRequest,
    Message,
    ProviderError,
    UpstreamConnectionError,
    UpstreamHTTPError,
)
from sseserver.providers.gemini_lean import LeanGeminiProvider
from sseserver.providers.openai_lean import LeanOpenAIProvider
from sseserver.providers.upstream_feed import UpstreamFeed
from tests.support.sinks import Recorder, ended, loop_turns
from tests.upstreams import ConnectionRecord, FakeUpstream, token_text
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.openai_wire import OpenAIWire

pytestmark = pytest.mark.timeout(30)

CANCEL_CLOSES_WITHIN_S = 0.100  # SPEC §7: cancel -> upstream connection closed
LeanProvider = LeanOpenAIProvider | LeanGeminiProvider


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    wire: type[FakeUpstream]
    provider: Callable[..., LeanProvider]


KINDS = [
    Kind("openai-lean", OpenAIWire, LeanOpenAIProvider),
    Kind("gemini-lean", GeminiWire, LeanGeminiProvider),
]


@dataclass(slots=True)
class Env:
    kind: Kind
    up: FakeUpstream
    provider: LeanProvider

    def push(self, prompt: str, sink: Recorder) -> UpstreamFeed:
        return self.provider.push(ask(prompt), sink)

    async def pull_error(self, prompt: str) -> ProviderError:
        """The error the pull path (``stream()``) raises for the same answer."""
        deltas: list[Delta] = []
        with pytest.raises(ProviderError) as caught:
            async for delta in self.provider.stream(ask(prompt)):
                deltas.append(delta)
        return caught.value

    def connection(self) -> ConnectionRecord:
        """The connection the last request came on."""
        return self.up.requests[-1].connection

    def pooled(self) -> int:
        """Idle connections in the provider's pool."""
        return sum(len(idle) for idle in self.provider._client._idle.values())

    def busy(self) -> int:
        return len(self.provider._client._busy)


@asynccontextmanager
async def environment(kind: Kind) -> AsyncIterator[Env]:
    up = await kind.wire().start()
    provider = kind.provider(base_url=up.base_url, api_key="test-key", timeout_s=5.0)
    # Error statuses are answered at once: no retry waits (the retries have their tests).
    provider._client.max_retries = 0
    try:
        yield Env(kind, up, provider)
    finally:
        await provider.aclose()
        await up.aclose()
        assert up.errors == []


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with environment(request.param) as e:
        yield e


def ask(text: str) -> GenerationRequest:
    return GenerationRequest(model=None, messages=(Message("user", text),))


def expected(tokens: int) -> list[str]:
    return [token_text(i) for i in range(tokens)]


async def closed_after(env: Env, rec: ConnectionRecord, t0: float) -> float:
    """Seconds from ``t0`` (time.monotonic()) until the upstream saw ``rec`` closed by
    the client."""
    assert await env.up.wait_closed(rec, within=2.0), f"{env.kind.name}: upstream left open"
    assert rec.closed_at is not None
    assert rec.closed_by == "peer"
    return rec.closed_at - t0


# --------------------------------------------------------------------------------------
# The answer
# --------------------------------------------------------------------------------------


async def test_deltas_in_order_then_one_end(env: Env) -> None:
    rec = Recorder()
    feed = env.push("hello [fake tokens=7]", rec)
    await ended(rec)
    await loop_turns()
    assert rec.texts == expected(7)
    assert rec.ends == [None]
    assert feed._task is None  # the opening task is gone once the body is piped
    # the same texts as the pull path
    pulled = [d.text async for d in env.provider.stream(ask("hello [fake tokens=7]")) if d.text]
    assert rec.texts == pulled


async def test_long_answer_over_many_reads(env: Env) -> None:
    rec = Recorder()
    env.push("[fake tokens=400 interval_ms=0]", rec)
    await ended(rec)
    assert rec.texts == expected(400)
    assert rec.ends == [None]


async def test_finished_answer_goes_back_to_the_pool(env: Env) -> None:
    """After ``[DONE]`` (OpenAI) or the body's end (Gemini) the connection is pooled and
    the next push reuses it: one connection, two requests."""
    first = Recorder()
    env.push("[fake tokens=3]", first)
    await ended(first)
    assert await env.up.wait_until(lambda: env.pooled() == 1, within=2.0), "not pooled"
    second = Recorder()
    env.push("[fake tokens=4]", second)
    await ended(second)
    assert first.texts == expected(3) and first.ends == [None]
    assert second.texts == expected(4) and second.ends == [None]
    (conn,) = env.up.api_connections()
    assert conn.requests == 2
    assert conn.is_open
    assert await env.up.wait_until(lambda: env.pooled() == 1, within=2.0)
    assert env.busy() == 0


# --------------------------------------------------------------------------------------
# Failures: the pull path's errors, one on_end, the connection closed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_error_status_is_the_pull_paths_error(env: Env, status: int) -> None:
    prompt = f"[fake fail={status}]"
    rec = Recorder()
    env.push(prompt, rec)
    await ended(rec)
    await loop_turns()
    pushed = rec.error
    pulled = await env.pull_error(prompt)
    assert rec.deltas == []
    assert isinstance(pushed, UpstreamHTTPError)
    assert type(pushed) is type(pulled)
    assert (pushed.code, pushed.status, pushed.retryable, pushed.message) == (
        pulled.code,
        pulled.status,
        pulled.retryable,
        pulled.message,
    )
    assert pushed.retry_after_s == pulled.retry_after_s
    assert pushed.status == status
    assert pushed.code == ("rate_limited" if status == 429 else f"upstream_{status}")


@pytest.mark.parametrize("failure", ["error_event", "malformed", "shape"])
async def test_bad_event_mid_stream_ends_once_and_closes_upstream(env: Env, failure: str) -> None:
    prompt = f"[fake tokens=6 fail={failure} after=2]"
    rec = Recorder()
    env.push(prompt, rec)
    await ended(rec)
    conn = env.connection()
    assert await env.up.wait_closed(conn, within=2.0), "upstream connection left open"
    assert conn.closed_by == "peer"
    await loop_turns()
    pushed = rec.error  # one end, an error
    assert rec.texts == expected(2)
    pulled = await env.pull_error(prompt)
    assert type(pushed) is type(pulled)
    assert (pushed.code, pushed.retryable, pushed.message) == (
        pulled.code,
        pulled.retryable,
        pulled.message,
    )
    assert env.pooled() == 0 and env.busy() == 0


async def test_upstream_drop_mid_stream_is_a_dropped_connection(env: Env) -> None:
    prompt = "[fake tokens=6 fail=drop after=3]"
    rec = Recorder()
    env.push(prompt, rec)
    await ended(rec)
    await loop_turns()
    pushed = rec.error
    assert rec.texts == expected(3)
    assert isinstance(pushed, UpstreamConnectionError)
    pulled = await env.pull_error(prompt)
    assert (type(pushed), pushed.code, pushed.message) == (
        type(pulled),
        pulled.code,
        pulled.message,
    )


async def test_refused_connection_ends_with_a_connection_error() -> None:
    up = await OpenAIWire().start()
    url = up.base_url
    await up.aclose()  # nothing listens there any more
    provider = LeanOpenAIProvider(base_url=url, api_key="k", timeout_s=2.0)
    provider._client.max_retries = 0
    try:
        rec = Recorder()
        provider.push(ask("hi"), rec)
        await ended(rec)
        assert isinstance(rec.error, UpstreamConnectionError)
        assert rec.deltas == []
    finally:
        await provider.aclose()


# --------------------------------------------------------------------------------------
# cancel
# --------------------------------------------------------------------------------------


async def test_cancel_before_the_head_closes_upstream_within_100ms(env: Env) -> None:
    rec = Recorder()
    feed = env.push("[fake fail=hang]", rec)  # the upstream accepts and never answers
    assert await env.up.wait_for_requests(1, within=2.0)
    conn = env.connection()
    task = feed._task
    assert task is not None
    t0 = time.monotonic()
    feed.cancel()
    assert await closed_after(env, conn, t0) < CANCEL_CLOSES_WITHIN_S
    await asyncio.wait([task], timeout=2.0)
    assert task.done()
    await loop_turns()
    assert rec.deltas == [] and rec.ends == []
    assert env.busy() == 0 and env.pooled() == 0


async def test_cancel_during_connect_leaves_nothing_open(env: Env) -> None:
    rec = Recorder()
    feed = env.push("[fake tokens=3]", rec)
    await asyncio.sleep(0)  # the opening task starts: it is connecting
    task = feed._task
    assert task is not None and not task.done()
    t0 = time.monotonic()
    feed.cancel()
    await asyncio.wait([task], timeout=2.0)
    assert task.cancelled()
    assert env.busy() == 0 and env.pooled() == 0  # no socket kept on our side
    # whatever the connect reached, every connection the upstream saw is closed
    assert await env.up.wait_until(
        lambda: all(not c.is_open for c in env.up.api_connections()), within=2.0
    )
    for conn in env.up.api_connections():
        assert conn.closed_at is not None and conn.closed_at - t0 < CANCEL_CLOSES_WITHIN_S
    assert env.up.requests == []  # the request itself was never sent
    await loop_turns(5)
    assert rec.deltas == [] and rec.ends == []


async def test_cancel_right_after_push_opens_nothing(env: Env) -> None:
    rec = Recorder()
    feed = env.push("[fake tokens=3]", rec)
    feed.cancel()  # before the opening task has run at all
    await loop_turns(5)
    assert not await env.up.wait_until(lambda: bool(env.up.connections), within=0.2)
    assert rec.deltas == [] and rec.ends == []


async def test_cancel_right_after_push_warns_nothing(env: Env) -> None:
    rec = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feed = env.push("[fake tokens=3]", rec)
        feed.cancel()
        await loop_turns(5)
        del feed
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


async def test_cancel_mid_body_closes_upstream_within_100ms(env: Env) -> None:
    rec = Recorder()
    feed = env.push("[fake tokens=1000 interval_ms=5]", rec)
    await rec.wait_for(3)
    conn = env.connection()
    t0 = time.monotonic()
    feed.cancel()
    heard = len(rec.deltas)
    assert await closed_after(env, conn, t0) < CANCEL_CLOSES_WITHIN_S
    await loop_turns(5)
    assert len(rec.deltas) == heard
    assert rec.ends == []
    assert env.pooled() == 0 and env.busy() == 0  # closed, never pooled
    assert conn.chunks_written < 1000


async def test_cancel_from_on_delta_stops_the_read_at_once(env: Env) -> None:
    """Many events in one network read: the sink hears none after the one during
    which it cancelled."""
    feeds: list[UpstreamFeed] = []

    def hook(n: int) -> None:
        if n == 2:
            feeds[0].cancel()

    rec = Recorder(hook=hook)
    feeds.append(env.push("[fake tokens=50 interval_ms=0]", rec))
    await rec.wait_for(3)
    conn = env.connection()
    assert await env.up.wait_closed(conn, within=2.0)
    await loop_turns(5)
    assert rec.texts == expected(3)
    assert rec.ends == []


# --------------------------------------------------------------------------------------
# pause / resume
# --------------------------------------------------------------------------------------


async def test_pause_stops_reading_while_upstream_writes_then_resume_brings_the_rest(
    env: Env,
) -> None:
    tokens = 300
    rec = Recorder()
    feed = env.push(f"[fake tokens={tokens} interval_ms=2]", rec)
    await rec.wait_for(5)
    conn = env.connection()
    feed.pause()
    heard = len(rec.deltas)
    written = conn.chunks_written
    # the upstream goes on writing (into the socket buffers) ...
    assert await env.up.wait_until(lambda: conn.chunks_written >= written + 30, within=5.0)
    await loop_turns(5)
    # ... and nothing of it reaches the sink
    assert len(rec.deltas) == heard
    assert rec.ends == []
    feed.resume()
    await ended(rec)
    assert rec.texts == expected(tokens)
    assert rec.ends == [None]


async def test_pause_and_resume_many_times(env: Env) -> None:
    tokens = 150
    rec = Recorder()
    feed = env.push(f"[fake tokens={tokens} interval_ms=1]", rec)
    for n in (5, 40, 80):
        await rec.wait_for(n)
        feed.pause()
        feed.resume()
        feed.pause()
        heard = len(rec.deltas)
        await written_more(env, env.connection(), tokens)
        await loop_turns(3)
        assert len(rec.deltas) == heard
        feed.resume()
    await ended(rec)
    assert rec.texts == expected(tokens)
    assert rec.ends == [None]


async def written_more(env: Env, conn: ConnectionRecord, tokens: int) -> None:
    """Until the upstream has written at least one more chunk on ``conn`` (or all)."""
    written = conn.chunks_written
    assert await env.up.wait_until(
        lambda: conn.chunks_written > written or conn.chunks_written >= tokens, within=5.0
    )


async def test_pause_before_the_head_holds_everything(env: Env) -> None:
    rec = Recorder()
    feed = env.push("[fake tokens=5]", rec)
    feed.pause()  # before the call is even open
    assert await env.up.wait_for_requests(1, within=2.0)
    conn = env.connection()
    assert await env.up.wait_until(lambda: conn.chunks_written >= 5, within=2.0)
    assert await env.up.wait_until(lambda: feed._task is None, within=2.0)  # piped
    await loop_turns(5)
    try:
        assert rec.deltas == [] and rec.ends == []
    finally:
        feed.resume()
        await ended(rec)
    assert rec.texts == expected(5)
