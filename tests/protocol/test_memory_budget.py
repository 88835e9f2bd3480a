"""Flat memory (SPEC §8) over real sockets: many generations through a server with a small
history budget; what it holds stays under the budget, and resume keeps its promises at
the boundary — the exact suffix while the events are held, ``missed_events`` once they
were dropped, 204 past the end of a generation still known — and an ended generation is
forgotten, record and all, after the resume window.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sseserver.generations import topic_of
from sseserver.providers.synthetic import token_text
from tests.support.rawhttp import RawClient, open_stream, seq_of
from tests.support.servers import app_server
from tests.support.sse_parser import Event
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(120)

BUDGET = 256 * 1024  # ended generations' records (~150 here) count too
TOKENS = 40
QUERY = f"tokens={TOKENS}&interval_ms=0"


async def run_generation(port: int) -> tuple[str, list[Event]]:
    client, resp, reader = await open_stream(port, f"/v1/stream?{QUERY}")
    async with client:
        assert resp.status == 200
        events = await reader.rest()
    assert events[0].type == "start" and events[-1].data == "[DONE]"
    return json.loads(events[0].data)["id"], events


async def resume(port: int, target: str, last_id: str) -> tuple[int, list[Event]]:
    client, resp, reader = await open_stream(port, target, headers=[("Last-Event-ID", last_id)])
    async with client:
        if resp.status != 200:
            return resp.status, []
        return resp.status, await reader.rest()


async def test_held_bytes_stay_under_the_budget_and_resume_holds_at_the_boundary() -> None:
    async with app_server(history_bytes=BUDGET, resume_window_s=600) as (server, ctx):
        port, hub = server.port, ctx.hub
        finished: list[tuple[str, list[Event]]] = []
        for _batch in range(15):
            batch = await asyncio.gather(*(run_generation(port) for _ in range(10)))
            finished.extend(batch)
            assert 0 < hub.held_bytes <= BUDGET
        assert hub.evicted > 0, "the budget never had to drop anything: make it smaller"
        assert ctx.generations.ended == len(finished)  # all within the resume window

        # The newest generation is whole: a resume from the middle gets the exact suffix.
        newest_id, newest = finished[-1]
        status, events = await resume(port, f"/v1/stream?{QUERY}", f"{newest_id}:5")
        assert status == 200
        assert [seq_of(e) for e in events] == [seq_of(e) for e in newest[6:]]
        assert [e.data for e in events] == [e.data for e in newest[6:]]
        assert json.loads(newest[1].data)["text"] == token_text(0)

        # The oldest one's events were dropped: a resume says so, then ends with [DONE].
        oldest_id, _ = finished[0]
        assert hub.held(topic_of(oldest_id)) == []
        for target in (f"/v1/stream?{QUERY}", f"/v1/streams/{oldest_id}"):
            status, events = await resume(port, target, f"{oldest_id}:5")
            assert status == 200, target
            assert [e.type for e in events] == ["error", "message"], target
            assert json.loads(events[0].data)["code"] == "missed_events"
            assert events[1].data == "[DONE]"
        # Watching it from the start cannot be honest either.
        status, events = await resume(port, f"/v1/streams/{oldest_id}", "")
        assert status == 200 and json.loads(events[0].data)["code"] == "missed_events"

        # Past the end of a generation still known, held or not: 204 (EventSource stops).
        for _gen_id, events in (finished[0], finished[-1]):
            last = events[-1].last_event_id
            status, _ = await resume(port, f"/v1/stream?{QUERY}", last)
            assert status == 204
        assert hub.held_bytes <= BUDGET


async def test_an_ended_generation_is_forgotten_after_the_resume_window() -> None:
    window = 0.3
    async with app_server(resume_window_s=window) as (server, ctx):
        port, hub = server.port, ctx.hub
        gen_id, events = await run_generation(port)
        assert ctx.generations.get(gen_id) is not None
        assert hub.held(topic_of(gen_id))
        # The hub's sweep timer forgets it; nothing else happens meanwhile.
        await eventually(
            lambda: ctx.generations.get(gen_id) is None and not hub.held(topic_of(gen_id)),
            within=5.0,
            what="generation forgotten",
        )
        assert ctx.generations.ended == 0 and hub.held_bytes == 0
        # A reconnect naming it is a reconnect naming no known generation: a new one
        # starts (its start event carries a new id), as for an id never seen.
        status, again = await resume(port, f"/v1/stream?{QUERY}", events[5].last_event_id)
        assert status == 200 and again[0].type == "start"
        assert json.loads(again[0].data)["id"] != gen_id
        # Watching or cancelling it: unknown.
        async with await RawClient.connect(port) as client:
            client.request("GET", f"/v1/streams/{gen_id}")
            assert (await client.response()).status == 404
        async with await RawClient.connect(port) as client:
            client.request("POST", f"/v1/streams/{gen_id}/cancel")
            assert (await client.response()).status == 404
