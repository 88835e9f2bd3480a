"""Resuming, joining and cancelling generations over real sockets (SPEC §4, §6, §8).

A reconnect to ``/v1/stream`` carrying ``Last-Event-ID: {gen}:{k}`` of a running
generation replays after ``k`` and continues live — the same generation, no new upstream
call — so the text pieced together equals an uninterrupted stream's. Past the end of an
ended generation the answer is 204 (``EventSource`` stops).
"""

from __future__ import annotations

import json

import pytest

from sseserver.providers.synthetic import token_text
from tests.support.rawhttp import RawClient, open_stream, seq_of, text_of
from tests.support.servers import app_server
from tests.support.sse_parser import Event
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)

TOKENS = 40
QUERY = f"tokens={TOKENS}&interval_ms=20"
FULL_TEXT = "".join(token_text(i) for i in range(TOKENS))


def ids(events: list[Event]) -> list[str]:
    return [e.last_event_id for e in events]


async def uninterrupted_text(port: int) -> str:
    client, _resp, reader = await open_stream(port, f"/v1/stream?{QUERY}")
    async with client:
        return text_of(await reader.rest())


async def read_first(port: int, k: int) -> tuple[str, list[Event]]:
    """Open a stream, read events up to seq ``k`` and hang up; (generation id, events)."""
    client, resp, reader = await open_stream(port, f"/v1/stream?{QUERY}")
    async with client:
        assert resp.status == 200
        events = [await reader.next() for _ in range(k + 1)]
    gen = json.loads(events[0].data)["id"]
    assert [seq_of(e) for e in events] == list(range(k + 1))
    return gen, events


@pytest.mark.parametrize("via", ["header", "query", "post"])
async def test_reconnect_resumes_running_generation(via: str) -> None:
    k = 10
    async with app_server(resume_grace_s=5.0) as (server, ctx):
        gen_id, first = await read_first(server.port, k)
        gen = ctx.generations.get(gen_id)
        assert gen is not None and not gen.finished
        last_id = f"{gen_id}:{k}"
        if via == "header":
            target, headers, method, body = (
                f"/v1/stream?{QUERY}",
                [("Last-Event-ID", last_id)],
                "GET",
                b"",
            )
        elif via == "query":
            target, headers, method, body = (
                f"/v1/stream?{QUERY}&lastEventID={last_id}",
                [],
                "GET",
                b"",
            )
        else:
            target, method = "/v1/stream", "POST"
            headers = [("Last-Event-ID", last_id), ("Content-Type", "application/json")]
            body = json.dumps(
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "params": {"tokens": TOKENS, "interval_ms": 20},
                }
            ).encode()
        client, resp, reader = await open_stream(
            server.port, target, method=method, headers=headers, body=body
        )
        async with client:
            assert resp.status == 200
            assert resp.header("content-type") == "text/event-stream; charset=utf-8"
            assert ctx.generations.running == 1, "a resume must not start a new generation"
            rest = await reader.rest(within=10)
        assert reader.parser.retry is not None
        assert "start" not in [e.type for e in rest]
        assert all(i.startswith(f"{gen_id}:") for i in ids(rest))
        assert [seq_of(e) for e in rest] == list(range(k + 1, k + 1 + len(rest)))
        assert [e.type for e in rest][-2:] == ["metrics", "message"]
        assert rest[-1].data == "[DONE]"
        assert ctx.generations.get(gen_id) is gen
        assert gen.finished and gen.tokens == TOKENS
        text = text_of(first) + text_of(rest)
        assert text == FULL_TEXT
        assert text == await uninterrupted_text(server.port)


async def test_reconnect_resumes_live_part() -> None:
    """Replay and live meet without a gap or a duplicate: the resumed stream still
    receives tokens that were produced after it connected."""
    k = 3
    async with app_server(resume_grace_s=5.0) as (server, ctx):
        gen_id, first = await read_first(server.port, k)
        gen = ctx.generations.get(gen_id)
        assert gen is not None
        client, resp, reader = await open_stream(
            server.port, f"/v1/stream?{QUERY}", headers=[("Last-Event-ID", f"{gen_id}:{k}")]
        )
        async with client:
            assert resp.status == 200
            connected_at_seq = gen.seq
            rest = await reader.rest(within=10)
        assert connected_at_seq < seq_of(rest[-1]), "nothing arrived live"
        assert [seq_of(e) for e in rest] == list(range(k + 1, seq_of(rest[-1]) + 1))
        assert text_of(first) + text_of(rest) == FULL_TEXT


async def test_reconnect_after_end_gets_204() -> None:
    async with app_server() as (server, ctx):
        client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=5&interval_ms=0")
        async with client:
            events = await reader.rest()
        last_id = events[-1].last_event_id
        gen_id = last_id.rpartition(":")[0]
        assert events[-1].data == "[DONE]"
        for headers, target in (
            ([("Last-Event-ID", last_id)], "/v1/stream?tokens=5&interval_ms=0"),
            ([], f"/v1/stream?tokens=5&interval_ms=0&lastEventID={last_id}"),
            ([("Last-Event-ID", last_id)], f"/v1/streams/{gen_id}"),
        ):
            async with await RawClient.connect(server.port) as again:
                again.request("GET", target, headers)
                resp = await again.response()
                assert resp.status == 204, target
                assert resp.body == b""
                assert resp.header("transfer-encoding") is None
        assert ctx.generations.running == 0


async def test_reconnect_inside_ended_generation_replays_rest() -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=6&interval_ms=0")
        async with client:
            events = await reader.rest()
        k = 3
        client, resp, reader = await open_stream(
            server.port,
            "/v1/stream?tokens=6&interval_ms=0",
            headers=[("Last-Event-ID", events[k].last_event_id)],
        )
        async with client:
            assert resp.status == 200
            rest = await reader.rest()
        assert ids(rest) == ids(events[k + 1 :])
        assert [e.data for e in rest] == [e.data for e in events[k + 1 :]]


async def test_join_replays_then_follows_live() -> None:
    async with app_server() as (server, ctx):
        origin, _resp, o_reader = await open_stream(server.port, f"/v1/stream?{QUERY}")
        async with origin:
            start = await o_reader.next()
            gen_id = json.loads(start.data)["id"]
            await o_reader.until(lambda r: len(r.arrivals) >= 8)
            gen = ctx.generations.get(gen_id)
            assert gen is not None and not gen.finished
            viewer, v_resp, v_reader = await open_stream(server.port, f"/v1/streams/{gen_id}")
            async with viewer:
                assert v_resp.status == 200
                assert v_resp.header("content-type") == "text/event-stream; charset=utf-8"
                joined_at_seq = gen.seq
                viewed = await v_reader.rest(within=10)
            await o_reader.rest()
            origin_events = [ev for _t, ev in o_reader.arrivals]
        assert joined_at_seq < seq_of(viewed[-1]), "the viewer saw nothing live"
        assert ids(viewed) == ids(origin_events)
        assert [(e.type, e.data) for e in viewed] == [(e.type, e.data) for e in origin_events]
        assert text_of(viewed) == FULL_TEXT
        assert ctx.generations.running == 0


async def test_join_unknown_generation_404() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/v1/streams/no-such-generation")
            resp = await client.response()
            assert resp.status == 404
            assert resp.header("content-type") == "application/json"


async def test_cancel_ends_stream_with_error_metrics_done() -> None:
    async with app_server() as (server, ctx):
        origin, _resp, o_reader = await open_stream(
            server.port, "/v1/stream?tokens=100000&interval_ms=10"
        )
        async with origin:
            start = await o_reader.next()
            gen_id = json.loads(start.data)["id"]
            viewer, _v_resp, v_reader = await open_stream(server.port, f"/v1/streams/{gen_id}")
            async with viewer:
                await o_reader.until(lambda r: len(r.arrivals) >= 5)
                await v_reader.until(lambda r: len(r.arrivals) >= 5)
                async with await RawClient.connect(server.port) as canceller:
                    canceller.request("POST", f"/v1/streams/{gen_id}/cancel")
                    resp = await canceller.response()
                assert resp.status == 200
                assert resp.json() == {"id": gen_id, "cancelled": True}
                for reader in (o_reader, v_reader):
                    await reader.rest(within=5)
                    events = [ev for _t, ev in reader.arrivals]
                    types = [e.type for e in events]
                    assert types[-3:] == ["error", "metrics", "message"], types[-5:]
                    assert "error" not in types[:-3]
                    error = json.loads(events[-3].data)
                    assert error["code"] == "cancelled"
                    assert error["retryable"] is False
                    assert events[-1].data == "[DONE]"
                    assert [seq_of(e) for e in events] == list(range(len(events)))
        gen = ctx.generations.get(gen_id)
        assert gen is not None and gen.finished
        tokens = gen.tokens
        assert tokens < 100000
        await eventually(lambda: ctx.generations.running == 0, what="generation stopped")
        # Cancelling again: known, but nothing left to cancel.
        async with await RawClient.connect(server.port) as canceller:
            canceller.request("POST", f"/v1/streams/{gen_id}/cancel")
            resp = await canceller.response()
        assert resp.status == 200
        assert resp.json() == {"id": gen_id, "cancelled": False}
        assert gen.tokens == tokens


async def test_cancel_unknown_generation_404() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("POST", "/v1/streams/nope/cancel")
            resp = await client.response()
            assert resp.status == 404
            assert resp.json()["error"]["code"] == "not_found"
