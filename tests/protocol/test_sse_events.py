"""The event stream a client sees (SPEC §4, §6): preamble, event sequence, ids, start
data, deterministic text and synthetic timing — parsed as a browser would."""

from __future__ import annotations

import json
import re

import pytest

from sseserver.providers.synthetic import token_text
from tests.support.rawhttp import open_stream, seq_of, text_of
from tests.support.servers import app_server
from tests.support.sse_parser import SSEParser

pytestmark = pytest.mark.timeout(30)

ID_LINE = re.compile(rb"^id: (.*)$", re.MULTILINE)


async def test_stream_starts_with_retry_and_comment() -> None:
    async with app_server(retry_ms=1234) as (server, _ctx):
        client, resp, reader = await open_stream(server.port, "/v1/stream?tokens=2&ttft_ms=300")
        async with client:
            assert resp.status == 200
            # The first block arrives at once, before any token is due.
            await reader.until(lambda r: b"\n\n" in r.data, within=0.25)
            first_block = bytes(reader.data).split(b"\n\n", 1)[0] + b"\n\n"
            lines = first_block.decode().splitlines()
            assert "retry: 1234" in lines
            assert any(line.startswith(":") for line in lines), lines
            assert not any(line.startswith("data:") for line in lines), lines
            preamble = SSEParser()
            assert preamble.feed(first_block) == []
            assert preamble.retry == 1234
            assert preamble.comments
            events = await reader.rest()
            assert events[0].type == "start"


@pytest.mark.parametrize("tokens", [0, 1, 7, 100])
async def test_event_sequence_ids_and_text(tokens: int) -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, f"/v1/stream?tokens={tokens}&interval_ms=0"
        )
        async with client:
            events = await reader.rest()
            types = [e.type for e in events]
            assert types == ["start", *["message"] * tokens, "metrics", "message"]
            assert events[-1].data == "[DONE]"

            # start: {id, provider, model}, at seq 0; its id names the generation.
            start = json.loads(events[0].data)
            assert set(start) >= {"id", "provider", "model"}
            assert start["provider"] == "synthetic"
            assert start["model"] == "synthetic-1"
            gen = start["id"]
            assert isinstance(gen, str) and gen and ":" not in gen

            # Every event carries its own id line (none inherits the previous one).
            raw_ids = [m.decode() for m in ID_LINE.findall(bytes(reader.data))]
            assert len(raw_ids) == len(events)
            assert raw_ids == [e.last_event_id for e in events]
            assert all(i.startswith(f"{gen}:") for i in raw_ids)
            assert [seq_of(e) for e in events] == list(range(len(events)))

            # The text deltas: deterministic, one token each, in order.
            deltas = [json.loads(e.data) for e in events[1 : 1 + tokens]]
            assert [d["text"] for d in deltas] == [token_text(i) for i in range(tokens)]
            assert text_of(events) == "".join(token_text(i) for i in range(tokens))

            metrics = json.loads(events[-2].data)
            assert set(metrics) >= {"ttft_ms", "tokens", "tokens_per_s", "duration_ms"}
            assert metrics["tokens"] == tokens
            assert metrics["duration_ms"] >= 0


async def test_token_size_parameter_text() -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, "/v1/stream?tokens=5&interval_ms=0&size=13"
        )
        async with client:
            events = await reader.rest()
            texts = [json.loads(e.data)["text"] for e in events[1:-2]]
            assert texts == [token_text(i, 13) for i in range(5)]
            assert all(len(t) == 13 for t in texts)


async def test_post_stream_event_sequence() -> None:
    body = json.dumps(
        {
            "provider": "synthetic",
            "messages": [{"role": "user", "content": "hello"}],
            "params": {"tokens": 4, "interval_ms": 0},
        }
    ).encode()
    async with app_server() as (server, _ctx):
        client, resp, reader = await open_stream(
            server.port,
            "/v1/stream",
            method="POST",
            headers=[("Content-Type", "application/json")],
            body=body,
        )
        async with client:
            assert resp.status == 200
            events = await reader.rest()
            assert [e.type for e in events] == ["start", *["message"] * 4, "metrics", "message"]
            assert text_of(events) == "".join(token_text(i) for i in range(4))
            assert [seq_of(e) for e in events] == list(range(len(events)))


async def test_each_generation_gets_its_own_id() -> None:
    async with app_server() as (server, _ctx):
        gens = []
        for _ in range(3):
            client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=1")
            async with client:
                first = await reader.next()
                gens.append(json.loads(first.data)["id"])
                await reader.rest()
        assert len(set(gens)) == 3


async def test_synthetic_timing_tokens_on_their_deadlines() -> None:
    """interval_ms=50: token i is due at start + i*50 ms. Order is exact; timing bounds
    are generous (an early token is impossible, a late one is allowed a lot of slack)."""
    tokens, interval = 10, 0.05
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, f"/v1/stream?tokens={tokens}&interval_ms=50"
        )
        async with client:
            await reader.rest(within=10)
            arrivals = reader.arrivals
            assert next(ev.type for _t, ev in arrivals) == "start"
            t0 = arrivals[0][0]
            token_times = [t - t0 for t, ev in arrivals if ev.type == "message"][:tokens]
            texts = [json.loads(ev.data)["text"] for _t, ev in arrivals[1 : 1 + tokens]]
            assert texts == [token_text(i) for i in range(tokens)]
            assert token_times == sorted(token_times)
            for i, t in enumerate(token_times):
                assert t >= i * interval - 0.03, f"token {i} arrived early at {t:.3f}s"
                assert t <= i * interval + 1.0, f"token {i} arrived late at {t:.3f}s"
            duration = arrivals[-1][0] - t0
            assert duration >= (tokens - 1) * interval - 0.03
            metrics = json.loads(arrivals[-2][1].data)
            assert metrics["duration_ms"] >= (tokens - 1) * interval * 1000 - 30


async def test_ttft_delays_first_token() -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, "/v1/stream?tokens=2&interval_ms=0&ttft_ms=200"
        )
        async with client:
            await reader.rest()
            t0 = reader.arrivals[0][0]
            first_token = next(t for t, ev in reader.arrivals if ev.type == "message")
            assert first_token - t0 >= 0.17
            metrics = json.loads(reader.arrivals[-2][1].data)
            assert metrics["ttft_ms"] >= 170
