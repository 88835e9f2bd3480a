"""Generations as hub topics (SPEC §8) over real sockets: many viewers and one upstream
call; a reconnect with ``Last-Event-ID`` resumes the same generation instead of paying for
a new one; 204 past the end; the upstream is cancelled when the last viewer leaves, or
after ``resume_grace_s`` when nobody came back.

The provider is the synthetic one wrapped in a ``CountingProvider`` that counts upstream
calls and records when each call's stream was closed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from sseserver.generations import Generation, topic_of
from sseserver.providers.base import Delta, GenerationRequest, Provider
from sseserver.providers.synthetic import token_text
from sseserver.web.context import Context
from tests.support import rawhttp
from tests.support.rawhttp import RawClient, SSEReader, open_stream, seq_of, text_of
from tests.support.servers import app_server
from tests.support.sse_parser import Event
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)


class CountingProvider:
    """Wraps a provider: counts ``stream()`` calls and deltas, records closes."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name = inner.name
        self.default_model = inner.default_model
        self.models = inner.models
        self.calls = 0
        self.deltas = 0
        self.closed_at: list[float] = []

    def validate(self, request: GenerationRequest) -> None:
        self.inner.validate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.calls += 1
        try:
            async for delta in self.inner.stream(request):
                self.deltas += 1
                yield delta
        finally:
            self.closed_at.append(time.monotonic())

    async def aclose(self) -> None:
        await self.inner.aclose()


def counting(ctx: Context) -> CountingProvider:
    provider = CountingProvider(ctx.providers["synthetic"])
    ctx.providers["synthetic"] = provider
    return provider


async def start_generation(port: int, query: str) -> tuple[RawClient, SSEReader, str]:
    client, reader, gen_id = await rawhttp.start_generation(port, f"/v1/stream?{query}")
    start = reader.parser.events[0]
    assert start.last_event_id.endswith(":0")
    assert start.last_event_id == f"{gen_id}:0"
    return client, reader, gen_id


def generation(ctx: Context, gen_id: str) -> Generation:
    gen = ctx.generations.get(gen_id)
    assert gen is not None
    return gen


def all_events(reader: SSEReader) -> list[Event]:
    return list(reader.parser.events)


async def test_many_viewers_one_upstream_call() -> None:
    tokens, viewers, watchers = 60, 30, 5
    async with app_server() as (server, ctx):
        provider = counting(ctx)
        origin, o_reader, gen_id = await start_generation(
            server.port, f"tokens={tokens}&interval_ms=15"
        )
        async with AsyncExitStack() as stack:
            stack.push_async_callback(origin.close)
            readers = []
            for _ in range(viewers):
                client, resp, reader = await open_stream(server.port, f"/v1/streams/{gen_id}")
                assert resp.status == 200
                stack.push_async_callback(client.close)
                readers.append(reader)
            # Mercure subscribers of the generation's topic see the same events.
            mercure = []
            for _ in range(watchers):
                client, resp, reader = await open_stream(
                    server.port,
                    f"/.well-known/mercure?topic={topic_of(gen_id)}&lastEventID=earliest",
                )
                assert resp.status == 200
                stack.push_async_callback(client.close)
                mercure.append(reader)
            assert len(generation(ctx, gen_id).viewers) == 1 + viewers
            await o_reader.rest(within=20)
            origin_events = all_events(o_reader)
            for reader in [*readers, *mercure]:
                await reader.rest(within=20)  # every body ends after [DONE]
                assert all_events(reader) == origin_events
        assert provider.calls == 1
        assert provider.deltas == tokens + 1  # the tokens and the final (empty) delta
        assert origin_events[-1].data == "[DONE]"
        assert [seq_of(e) for e in origin_events] == list(range(len(origin_events)))
        assert text_of(origin_events) == "".join(token_text(i) for i in range(tokens))
        assert ctx.generations.running == 0
        held = ctx.hub.held(topic_of(gen_id))
        assert [u.id for u in held] == [e.last_event_id for e in origin_events]


async def test_viewer_keeps_generation_after_origin_leaves() -> None:
    async with app_server() as (server, ctx):
        provider = counting(ctx)
        origin, _o_reader, gen_id = await start_generation(server.port, "tokens=40&interval_ms=20")
        viewer, resp, v_reader = await open_stream(server.port, f"/v1/streams/{gen_id}")
        assert resp.status == 200
        async with viewer:
            await origin.close()
            events = await v_reader.rest(within=10)
            assert events[-1].data == "[DONE]"
            assert "error" not in [e.type for e in events]
        gen = generation(ctx, gen_id)
        assert gen.finished and gen.cancel_reason is None and gen.tokens == 40
        assert provider.calls == 1


async def test_reconnect_with_last_event_id_resumes_same_generation() -> None:
    tokens = 50
    async with app_server(resume_grace_s=5.0) as (server, ctx):
        provider = counting(ctx)
        query = f"tokens={tokens}&interval_ms=20"
        origin, o_reader, gen_id = await start_generation(server.port, query)
        async with origin:
            await o_reader.until(lambda r: len(r.parser.events) >= 10)
        first = all_events(o_reader)
        last_seen = first[-1].last_event_id
        for resumed_via in ("header", "query"):
            headers = [("Last-Event-ID", last_seen)] if resumed_via == "header" else []
            target = f"/v1/stream?{query}" + (
                f"&lastEventID={last_seen}" if resumed_via == "query" else ""
            )
            client, resp, reader = await open_stream(server.port, target, headers=headers)
            async with client:
                assert resp.status == 200
                rest = await reader.rest(within=10)
            assert "start" not in [e.type for e in rest]
            assert all(e.last_event_id.startswith(f"{gen_id}:") for e in rest)
            assert [seq_of(e) for e in rest] == list(
                range(seq_of(first[-1]) + 1, seq_of(first[-1]) + 1 + len(rest))
            )
            assert rest[-1].data == "[DONE]"
            assert text_of(first) + text_of(rest) == "".join(token_text(i) for i in range(tokens))
        assert provider.calls == 1, "a resume must not call the upstream again"
        # Past the end: 204, and still no new upstream call.
        final = rest[-1].last_event_id
        for target in (f"/v1/stream?{query}", f"/v1/streams/{gen_id}"):
            async with await RawClient.connect(server.port) as client:
                client.request("GET", target, [("Last-Event-ID", final)])
                resp = await client.response()
                assert resp.status == 204, target
                assert resp.body == b""
        assert provider.calls == 1
        # A stream without Last-Event-ID is a new generation (the counter works).
        client, reader, other_id = await start_generation(server.port, "tokens=2&interval_ms=0")
        async with client:
            await reader.rest()
        assert other_id != gen_id and provider.calls == 2


async def test_unknown_generation_in_last_event_id_starts_a_new_one() -> None:
    async with app_server() as (server, ctx):
        provider = counting(ctx)
        client, resp, reader = await open_stream(
            server.port,
            "/v1/stream?tokens=3&interval_ms=0",
            headers=[("Last-Event-ID", "no-such-generation:7")],
        )
        async with client:
            assert resp.status == 200
            events = await reader.rest()
        assert events[0].type == "start"
        assert json.loads(events[0].data)["id"] != "no-such-generation"
        assert provider.calls == 1


async def test_last_viewer_leaving_cancels_the_upstream() -> None:
    async with app_server(resume_grace_s=0.0) as (server, ctx):
        provider = counting(ctx)
        origin, o_reader, gen_id = await start_generation(
            server.port, "tokens=100000&interval_ms=10"
        )
        viewer, _resp, v_reader = await open_stream(server.port, f"/v1/streams/{gen_id}")
        await o_reader.until(lambda r: len(r.parser.events) >= 5)
        gen = generation(ctx, gen_id)
        await origin.close()
        await v_reader.until(lambda r: len(r.parser.events) >= 10)
        assert not gen.finished and provider.closed_at == [], "a viewer is still there"
        left = time.monotonic()
        await viewer.close()
        await eventually(lambda: bool(provider.closed_at), within=2.0, what="upstream closed")
        latency = provider.closed_at[0] - left
        assert latency < 0.1, f"upstream closed {latency * 1000:.0f} ms after the last viewer"
        await eventually(lambda: gen.finished, within=1.0, what="generation finished")
        assert gen.cancel_reason == "abandoned"
        assert gen.task is None and gen.feed is None  # done, and released
        tokens = gen.tokens
        assert tokens < 1000
        assert ctx.generations.running == 0
        assert provider.calls == 1


async def test_generation_survives_a_reconnect_within_grace() -> None:
    grace = 1.0
    tokens = 80
    async with app_server(resume_grace_s=grace) as (server, ctx):
        provider = counting(ctx)
        query = f"tokens={tokens}&interval_ms=20"
        origin, o_reader, gen_id = await start_generation(server.port, query)
        await o_reader.until(lambda r: len(r.parser.events) >= 5)
        gen = generation(ctx, gen_id)
        await origin.close()
        first = all_events(o_reader)
        await eventually(lambda: not gen.viewers, what="the origin detached")
        await eventually(
            lambda: gen.seq > seq_of(first[-1]) + 5,
            within=2.0,
            what="production went on without viewers",
        )
        assert not gen.finished and provider.closed_at == []
        # Back within the grace period: the same generation, replay then live.
        client, resp, reader = await open_stream(
            server.port, f"/v1/stream?{query}", headers=[("Last-Event-ID", first[-1].last_event_id)]
        )
        async with client:
            assert resp.status == 200
            rest = await reader.rest(within=10)
        assert provider.calls == 1
        assert gen.cancel_reason is None and gen.finished
        assert text_of(first) + text_of(rest) == "".join(token_text(i) for i in range(tokens))


async def test_generation_cancelled_when_nobody_returns_within_grace() -> None:
    grace = 1.0
    async with app_server(resume_grace_s=grace) as (server, ctx):
        provider = counting(ctx)
        origin, o_reader, gen_id = await start_generation(
            server.port, "tokens=100000&interval_ms=10"
        )
        await o_reader.until(lambda r: len(r.parser.events) >= 3)
        gen = generation(ctx, gen_id)
        left = time.monotonic()
        await origin.close()
        await eventually(
            lambda: bool(provider.closed_at),
            within=grace + 2.0,
            what="upstream closed after the grace period",
        )
        waited = provider.closed_at[0] - left
        assert grace * 0.95 <= waited <= grace + 0.3, f"cancelled after {waited:.3f}s"
        assert gen.cancel_reason == "abandoned"
        # Its history is still held: a late reconnect replays up to the error and the end.
        client, resp, reader = await open_stream(
            server.port, "/v1/stream", headers=[("Last-Event-ID", f"{gen_id}:0")]
        )
        async with client:
            assert resp.status == 200
            rest = await reader.rest(within=5)
        assert [e.type for e in rest][-3:] == ["error", "metrics", "message"]
        assert json.loads(rest[-3].data)["code"] == "abandoned"
        assert rest[-1].data == "[DONE]"
        assert provider.calls == 1


async def test_leave_and_return_twice_within_grace_keeps_one_generation() -> None:
    grace = 1.0
    async with app_server(resume_grace_s=grace) as (server, ctx):
        provider = counting(ctx)
        query = "tokens=100000&interval_ms=10"
        client, reader, gen_id = await start_generation(server.port, query)
        gen = generation(ctx, gen_id)
        seen = []
        for _ in range(3):  # bounded: three leave/return cycles
            await reader.until(lambda r: len(r.parser.events) >= 3)
            seen.extend(all_events(reader))
            await client.close()
            await eventually(lambda: not gen.viewers, what="viewer detached")
            client, resp, reader = await open_stream(
                server.port,
                f"/v1/stream?{query}",
                headers=[("Last-Event-ID", seen[-1].last_event_id)],
            )
            assert resp.status == 200
        await reader.until(lambda r: len(r.parser.events) >= 3)
        seen.extend(all_events(reader))
        await client.close()
        assert [seq_of(e) for e in seen] == list(range(len(seen))), "gap or duplicate"
        assert provider.calls == 1
        assert not gen.finished, "left less than the grace period ago"
        await eventually(lambda: gen.finished, within=grace + 2.0, what="finally abandoned")
        assert gen.cancel_reason == "abandoned"
