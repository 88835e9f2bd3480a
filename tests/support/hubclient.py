"""A Mercure client over raw sockets for the multi-instance tests: publish, subscribe,
ask and poll one server process by port (``tests.support.redis_server``'s processes)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from urllib.parse import urlencode

from sseserver.providers.synthetic import token_text
from tests.support.rawhttp import RawClient, Response, SSEReader, open_stream, seq_of, text_of
from tests.support.redis_server import ServerProcess
from tests.support.sse_parser import Event

PATH = "/.well-known/mercure"
FORM = [("Content-Type", "application/x-www-form-urlencoded")]


async def request(
    port: int,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    within: float = 10.0,
) -> Response:
    async with await RawClient.connect(port) as client:
        client.request(method, target, headers, body)
        return await client.response(within)


async def publish(
    port: int, topic: str, data: str, event_id: str | None = None, within: float = 10.0
) -> Response:
    fields = [("topic", topic), ("data", data)]
    if event_id is not None:
        fields.append(("id", event_id))
    return await request(port, "POST", PATH, FORM, urlencode(fields).encode(), within)


async def publish_ok(port: int, topic: str, data: str, event_id: str) -> None:
    resp = await publish(port, topic, data, event_id)
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.body.decode() == event_id


async def subscribe(
    port: int, topic: str, last_event_id: str | None = None
) -> tuple[RawClient, SSEReader]:
    headers = [("Last-Event-ID", last_event_id)] if last_event_id else []
    client, resp, reader = await open_stream(
        port, f"{PATH}?{urlencode({'topic': topic})}", headers=headers
    )
    assert resp.status == 200, resp.status
    return client, reader


async def await_status(port: int, path: str, status: int, within: float) -> float:
    """Poll ``path`` until it answers ``status``; the seconds it took."""
    start = time.monotonic()
    deadline = start + within
    last: int | str = "nothing"
    while time.monotonic() < deadline:
        try:
            resp = await request(port, "GET", path, within=2.0)
            last = resp.status
            if resp.status == status:
                return time.monotonic() - start
        except (OSError, TimeoutError, AssertionError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not answer {status} within {within}s (last: {last})")


async def metric(port: int, name: str) -> float:
    """One unlabelled sample of ``/metrics`` (0 when absent)."""
    resp = await request(port, "GET", "/metrics")
    for line in resp.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def all_ready(*servers: ServerProcess, within: float = 15) -> None:
    """Each of ``servers`` answers ``/readyz`` with 200 (its hub connected)."""
    for server in servers:
        await await_status(server.port, "/readyz", 200, within)


def logs(*servers: ServerProcess) -> str:
    return "\n".join(f"--- {s.log_path.name}\n{s.log()[-3000:]}" for s in servers)


async def move_mid_generation(
    a: ServerProcess, b: ServerProcess, tokens: int, *, pause_s: float = 0.0
) -> tuple[list[Event], list[Event]]:
    """A reader of a generation of ``tokens`` (20 ms apart) started on ``a`` leaves after
    5 events and, ``pause_s`` later, reconnects to ``b`` with its Last-Event-ID (no sticky
    sessions): (the events it read on a, the events it read on b)."""
    query = f"tokens={tokens}&interval_ms=20"
    client, resp, reader = await open_stream(a.port, f"/v1/stream?{query}")
    async with client:
        assert resp.status == 200
        await reader.until(lambda r: len(r.parser.events) >= 5)
    first = list(reader.parser.events)
    if pause_s:
        await asyncio.sleep(pause_s)
    client, resp, reader = await open_stream(
        b.port, f"/v1/stream?{query}", headers=[("Last-Event-ID", first[-1].last_event_id)]
    )
    async with client:
        assert resp.status == 200, logs(a, b)
        rest = await reader.rest(within=20)
    return first, rest


async def watch_from_start(
    producer: ServerProcess, other: ServerProcess, tokens: int
) -> tuple[list[Event], list[Event]]:
    """A generation of ``tokens`` (10 ms apart) started on ``producer`` and watched from
    ``other`` (``GET /v1/streams/{id}``) the moment its reader has its id, both read to
    the end: (every event its reader read, every event the watcher read)."""
    client, resp, reader = await open_stream(
        producer.port, f"/v1/stream?tokens={tokens}&interval_ms=10"
    )
    assert resp.status == 200
    async with client:
        await reader.until(lambda r: len(r.parser.events) >= 1)
        gen_id = json.loads(reader.parser.events[0].data)["id"]
        watch, watch_resp, watcher = await open_stream(other.port, f"/v1/streams/{gen_id}")
        async with watch:
            assert watch_resp.status == 200, logs(producer, other)
            seen = await watcher.rest(within=20)
        await reader.rest(within=20)
    return list(reader.parser.events), seen


def assert_resumed(first: list[Event], rest: list[Event], tokens: int) -> None:
    """The same generation went on where the reader left it, to its end, with no error."""
    gen_id = json.loads(first[0].data)["id"]
    assert "start" not in [e.type for e in rest], "a new generation was started on B"
    assert all(e.last_event_id.startswith(f"{gen_id}:") for e in rest)
    assert [seq_of(e) for e in rest] == list(
        range(seq_of(first[-1]) + 1, seq_of(first[-1]) + 1 + len(rest))
    )
    errors = [json.loads(e.data) for e in rest if e.type == "error"]
    assert errors == [], f"the generation on A was ended while its viewer watched on B: {errors}"
    assert rest[-1].data == "[DONE]"
    assert text_of(first) + text_of(rest) == "".join(token_text(i) for i in range(tokens))
