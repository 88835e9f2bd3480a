"""How a client author tests an SSE client with sseserver's pytest plugin: install
sseserver (the plugin comes with it), ask for the ``sse_server`` fixture, point the client
at ``sse_server.scenario(...)`` and compare what it read with ``sse_server.expected(...)``,
the events a client that follows the standard dispatches.

Run: ``pytest examples/sse_client_tests``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import httpx_sse
import pytest
from tiny_client import Event, StreamRefused, read_events

from sseserver.testing import SSEServer


def read(url: str) -> list[tuple[str, str, str]]:
    """One connection's events (the stream ends with 204 on the reconnect)."""
    return [(e.type, e.data, e.last_event_id) for e in read_events(url)]


def expected(sse_server: SSEServer, **params: Any) -> list[tuple[str, str, str]]:
    return [(e.type, e.data, e.last_event_id) for e in sse_server.expected(**params)]


# Every awkward wire shape the client must survive; each is a query of /v1/test/stream.
SHAPES: list[dict[str, Any]] = [
    {"line_endings": "crlf"},
    {"line_endings": "cr"},
    {"line_endings": "mixed", "events": 6},
    {"bom": True, "order": "dier"},
    {"comments": True, "unknown": True, "space": False},
    {"data_lines": 3, "payload": "unicode", "split": 1},
    {"payload": "empty", "event": "ping"},
    {"id_reset": 2, "id_nul": 3, "events": 4},
    {"chunk": 5, "chunk_ext": "x=1", "split_at": [2, 7]},
    {"framing": "length"},
    {"framing": "close", "version": "1.0"},
    {"partial": 9},
    {"pause_after": 1, "pause_ms": 100, "heartbeat_ms": 30},
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_client_reads_awkward_wire_shapes(sse_server: SSEServer, shape: dict[str, Any]) -> None:
    # retry=10: the client's reconnect after the stream ends is quick, and answered 204.
    url = sse_server.scenario(retry=10, **shape)
    assert read(url) == expected(sse_server, retry=10, **shape)


def test_client_resumes_with_last_event_id_until_204(sse_server: SSEServer) -> None:
    # Two events per connection, the connection reset after each pair.
    url = sse_server.scenario(events=7, drop_after=2, end="rst", retry=10)
    assert read(url) == [("message", f"event {n}", str(n)) for n in range(1, 8)]


@pytest.mark.parametrize("shape", [{"status": 500}, {"content_type": "text/plain"}])
def test_client_refuses_what_is_not_an_event_stream(
    sse_server: SSEServer, shape: dict[str, Any]
) -> None:
    with pytest.raises(StreamRefused):
        read(sse_server.scenario(**shape))


def test_client_reads_a_synthetic_model_answer(sse_server: SSEServer) -> None:
    # The synthetic provider: a model answer as the server streams it (start, tokens,
    # metrics, [DONE]); it ends there (204 when the client reconnects past its end).
    events: list[Event] = []
    for event in read_events(sse_server.stream(tokens=5, interval_ms=0, q="hi")):
        events.append(event)
        if event.data == "[DONE]":
            break
    assert [e.type for e in events] == ["start", *["message"] * 5, "metrics", "message"]


async def test_an_asyncio_client_on_the_hub(sse_server: SSEServer) -> None:
    # asyncio tests use the same fixture (the server runs in a thread of its own); here
    # httpx-sse subscribes to a hub topic and a publish reaches it.
    async with httpx.AsyncClient(timeout=10) as client:
        async with httpx_sse.aconnect_sse(client, "GET", sse_server.mercure("books/1")) as source:
            updates = source.aiter_sse()
            update_id = await asyncio.to_thread(sse_server.publish, "books/1", "hello", type="book")
            event = await anext(updates)
            while event.event != "book":
                event = await anext(updates)
    assert (event.data, event.id) == ("hello", update_id)
