"""``GET /v1/test/stream`` over real loopback sockets (SPEC §6): every scenario's bytes
exactly as planned, read boundaries that fall on planned cuts, the same bytes twice, the
waits (with generous margins), the endings (close, reset), resumption, refusals, bounds,
and that the endpoint exists only with ``--test-endpoints``."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from sseserver.http.server import Server
from sseserver.routes import test_stream
from sseserver.wire.scenario import parse_scenario
from sseserver.wire.scenario_wire import Plan, build_plan
from tests.support.servers import app_server
from tests.support.sse_parser import SSEParser
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

PATH = "/v1/test/stream"


@dataclass
class Recording:
    """Every read of one connection: (seconds since the request, bytes), and how it
    ended: "eof", "reset" or "open" (still open when recording stopped)."""

    reads: list[tuple[float, bytes]] = field(default_factory=list)
    outcome: str = "open"

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.reads)

    def boundaries(self) -> list[int]:
        """Offsets where each read ended."""
        out, total = [], 0
        for _, data in self.reads:
            total += len(data)
            out.append(total)
        return out


def request_bytes(
    target: str, headers: dict[str, str] | None = None, version: str = "1.1"
) -> bytes:
    # Connection: close, so that refusals (kept alive otherwise) end at once too.
    lines = [f"GET {target} HTTP/{version}", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def record(
    port: int,
    target: str,
    headers: dict[str, str] | None = None,
    *,
    version: str = "1.1",
    within: float = 10.0,
    until: int | None = None,
) -> Recording:
    """Send one request and record every read until the server closes (or ``until``
    bytes have come)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rec = Recording()
    start = time.monotonic()
    writer.write(request_bytes(target, headers, version))
    try:
        async with asyncio.timeout(within):
            while until is None or len(rec.data) < until:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    rec.outcome = "reset"
                    break
                if not data:
                    rec.outcome = "eof"
                    break
                rec.reads.append((time.monotonic() - start, data))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return rec


def plan_for(query: str, **kwargs: object) -> Plan:
    return build_plan(parse_scenario(query, path=PATH, **kwargs))  # type: ignore[arg-type]


@asynccontextmanager
async def scenario_server(**overrides: object) -> AsyncIterator[Server]:
    options: dict[str, Any] = {"test_endpoints": True, "shutdown_grace_s": 0.5}
    options.update(overrides)
    async with app_server(**options) as (server, _ctx):
        yield server


# One scenario per parameter (and a few together): the bytes on the socket are the plan's.
SCENARIOS = [
    "",
    "events=0",
    "line_endings=crlf",
    "line_endings=cr",
    "line_endings=mixed&events=6",
    "bom=1&comments=1",
    "data_lines=3&space=0&unknown=1",
    "payload=empty&event=ping",
    "payload=unicode&split=1",
    "payload=json&data_lines=2",
    "payload=openai&ids=0",
    "order=rotate&event=e&retry=abc&events=6",
    "id_reset=2&id_nul=3&events=4",
    "retry=100",
    "split=1",
    "split_at=1,4,9",
    "chunk=5&chunk_ext=a=b",
    "chunk=3&split=2&line_endings=crlf",
    "framing=length",
    "framing=close",
    "version=1.0",
    "content_type=text/plain",
    "content_type=none",
    "status=204",
    "status=500",
    "status=301&events=2",
    "status=503",
    "partial=7&end=close",
    "end=close",
    "interval_ms=5&heartbeat_ms=10&pause_after=1&pause_ms=25",
    "drop_after=2&events=5",
    "size=3000&events=2&split=1000",
]


@pytest.mark.parametrize("query", SCENARIOS, ids=[q or "defaults" for q in SCENARIOS])
async def test_scenario_bytes_on_the_socket_are_exactly_the_plan(query: str) -> None:
    plan = plan_for(query)
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    assert rec.data == plan.wire
    assert rec.outcome == "eof"
    # Each read ends where a planned write ends: the cuts are real boundaries (reads may
    # join several writes, never split one, as long as each is small).
    assert set(rec.boundaries()) <= set(plan.cuts), (rec.boundaries(), plan.cuts)


async def test_the_same_scenario_twice_writes_the_same_bytes() -> None:
    query = "events=8&line_endings=mixed&split=3&chunk=11&bom=1&order=rotate&partial=4"
    async with scenario_server() as server:
        first = await record(server.port, f"{PATH}?{query}")
        second = await record(server.port, f"{PATH}?{query}")
    assert first.data == second.data == plan_for(query).wire


async def test_server_heartbeats_never_touch_a_scenario() -> None:
    # The server's own heartbeat (every 50 ms here) must not add ": ping" to a scenario
    # that stays silent for 400 ms: its bytes are the plan's alone.
    query = "events=2&pause_after=1&pause_ms=400"
    async with scenario_server(heartbeat_s=0.05) as server:
        rec = await record(server.port, f"{PATH}?{query}")
    assert rec.data == plan_for(query).wire


async def test_a_slow_drip_sends_one_byte_at_a_time_on_schedule() -> None:
    query = "events=1&split=1&drip_ms=20&framing=close"  # 21 bytes, 20 waits of 20 ms
    plan = plan_for(query)
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    assert rec.data == plan.wire
    body_reads = [(t, d) for t, d in rec.reads if not d.startswith(b"HTTP/")]
    # The schedule is absolute: the last byte goes 400 ms after the first, which goes
    # with the head, after the request (so never sooner than 0.4 s after it, however the
    # timers fire or the reads lag; the first byte may share the head's read), and a
    # generous bound above.
    assert 0.399 <= body_reads[-1][0] < 5.0, rec.reads
    # Most bytes arrive alone (a busy machine may join a few; none is ever split).
    assert len(body_reads) >= 10, [d for _, d in body_reads]
    assert all(len(d) <= 3 for _, d in body_reads[1:]), body_reads


async def test_a_pause_is_filled_with_heartbeats_when_asked() -> None:
    query = "events=2&pause_after=1&pause_ms=300&heartbeat_ms=100&framing=close"
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    assert rec.data == plan_for(query).wire
    times = {}
    seen = b""
    for t, data in rec.reads:
        seen += data
        for marker in (b"event 1", b": ping\n\n: ping", b"event 2"):
            if marker in seen and marker not in times:
                times[marker] = t
    # The schedule starts after the request: the second ping goes 200 ms after event 1,
    # event 2 300 ms after it, so never sooner after the request, however late the reads
    # come (a lower bound on each, not on the gaps: event 1's read may lag its write).
    assert times[b": ping\n\n: ping"] >= 0.199, times
    assert times[b"event 2"] >= 0.299, times
    # Event 1 comes before the pause, not with event 2 (unless the reader stalls for the
    # whole 300 ms pause).
    assert times[b"event 1"] < times[b"event 2"], times


async def test_rst_resets_the_connection_after_the_events() -> None:
    query = "events=2&end=rst"
    plan = plan_for(query)
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    assert rec.outcome == "reset"
    # What came before the reset was the plan's bytes (the kernel may drop unread ones).
    assert plan.wire.startswith(rec.data)


async def test_close_mid_event_leaves_the_event_undispatched() -> None:
    query = "events=2&partial=12&end=close"
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.receive_data(rec.data)
    client.receive_data(b"")
    parser = SSEParser()
    with pytest.raises(h11.RemoteProtocolError):  # no chunked terminator: incomplete body
        while (event := client.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Data):
                parser.feed(event.data)
    assert parser.pending
    assert [e.data for e in parser.events] == ["event 1", "event 2"]


async def test_http10_request_and_head_request() -> None:
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?events=1", version="1.0")
        head_plan = plan_for("events=2", http10_request=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"HEAD {PATH}?events=2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert rec.data == plan_for("events=1", http10_request=True).wire
    assert b"transfer-encoding" not in rec.data and rec.outcome == "eof"
    assert head == head_plan.wire[: head_plan.head_size]


async def test_resumption_after_last_event_id_and_204_past_the_end() -> None:
    query = "events=5&drop_after=2"
    async with scenario_server() as server:
        first = await record(server.port, f"{PATH}?{query}")
        second = await record(server.port, f"{PATH}?{query}", {"Last-Event-ID": "2"})
        third = await record(server.port, f"{PATH}?{query}&lastEventID=4")
        done = await record(server.port, f"{PATH}?{query}", {"Last-Event-ID": "5"})
        bad = await record(server.port, f"{PATH}?{query}", {"Last-Event-ID": "x"})
    assert first.data == plan_for(query).wire
    assert second.data == plan_for(query, last_event_id="2").wire
    assert b"id: 3\n" in second.data and b"id: 5" not in second.data
    assert third.data == plan_for(query, last_event_id="4").wire
    assert done.data.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert bad.data.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("events=abc", "events must be a whole number"),
        ("bogus=1", "unknown parameter 'bogus'"),
        ("events=1000&split=1", "writes, over"),
        ("status=299", "status must be one of"),
    ],
)
async def test_bad_parameters_answer_400_with_the_short_json_error(
    query: str, message: str
) -> None:
    async with scenario_server() as server:
        rec = await record(server.port, f"{PATH}?{query}")
    head, _, body = rec.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and message in error["message"]
    assert len(body) < 2000


async def test_the_endpoint_exists_only_with_test_endpoints() -> None:
    async with app_server() as (server, _ctx):
        rec = await record(server.port, f"{PATH}?events=1", until=12)
    assert rec.data.startswith(b"HTTP/1.1 404 ")


async def test_scenarios_at_once_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_stream, "MAX_CONCURRENT", 2)
    held = request_bytes(f"{PATH}?events=2&pause_after=1&pause_ms=5000")
    async with scenario_server() as server:
        holders = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for reader, writer in holders:  # both playing: their first event has come
            writer.write(held)
            await asyncio.wait_for(reader.readuntil(b"event 1\n\n"), 5)
        refused = await record(server.port, f"{PATH}?events=1")
        assert refused.data.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in refused.data.lower()
        assert b"too_many_scenarios" in refused.data
        # One ends: there is room again.
        holders[0][1].close()
        await eventually(
            lambda: sum(1 for c in server.state.connections if c._task is not None) == 1,
            what="the first holder's scenario to stop",
        )
        again = await record(server.port, f"{PATH}?events=1")
        assert again.data == plan_for("events=1").wire
        holders[1][1].close()


async def test_a_reader_that_stops_holds_at_most_one_write_in_the_server() -> None:
    # 900 kB in 60-kB writes to a client that reads nothing (with a small receive
    # buffer): each write waits for the previous one to drain, so the server's own buffer
    # never holds more than one.
    query = "events=15&size=60000&split=60000&framing=close"
    plan = plan_for(query)
    async with scenario_server() as server:
        # Small kernel buffers on both sides (accepted sockets inherit the listener's), or
        # the kernel would take the whole body and nothing would be held back.
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(request_bytes(f"{PATH}?{query}"))
        conns = server.state.connections

        def buffered() -> int:
            return max(
                (c.transport.get_write_buffer_size() for c in conns if c.transport), default=-1
            )

        await eventually(lambda: buffered() > 0, within=10, what="the server to be held back")
        assert buffered() <= 60_100
        got = bytearray()
        async with asyncio.timeout(20):
            while data := await reader.read(65536):
                got += data
                assert buffered() <= 60_100
        writer.close()
    assert bytes(got) == plan.wire
