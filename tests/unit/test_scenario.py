"""The scripted wire scenarios (``wire.scenario``, ``wire.scenario_wire``) without sockets:
exact bytes of each parameter (tables), where writes and chunks are cut, the waits, the
refusals and bounds, determinism; then every scenario of a grid read by the independent
WHATWG parser (tests/support/sse_parser.py) against what the standard says a client must
dispatch, with h11 as the oracle of the HTTP framing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import h11
import pytest

from sseserver.wire.scenario import (
    MAX_BODY_BYTES,
    MAX_DURATION_MS,
    MAX_WRITES,
    ORDERS,
    Scenario,
    parse_scenario,
)
from sseserver.wire.scenario_body import expected_data, expected_events, expected_retry
from sseserver.wire.scenario_wire import Plan, build_plan
from tests.support.sse_parser import Event, SSEParser


def plan_of(query: str, **kwargs: object) -> Plan:
    return build_plan(parse_scenario(query, **kwargs))  # type: ignore[arg-type]


def body_of(query: str) -> bytes:
    """The de-framed body (SSE bytes) of a scenario."""
    return framed_body(plan_of(query))


def body_reads(plan: Plan) -> list[bytes]:
    """The body as an HTTP client reads it, write by write, with h11 as the oracle of the
    framing (it fails on any framing error); the connection's close comes last."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    reads = []
    for data in [*(bytes(d) for _, d in plan.writes()), b""]:
        client.receive_data(data)
        out = bytearray()
        while (event := client.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
            else:
                assert isinstance(event, h11.Response), event
        reads.append(bytes(out))
    return reads


def framed_body(plan: Plan) -> bytes:
    return b"".join(body_reads(plan))


# -- exact bytes --------------------------------------------------------------------------

# (query, the exact SSE body)
BODY_CASES: list[tuple[str, bytes]] = [
    ("", b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n\nid: 3\ndata: event 3\n\n"),
    ("events=0", b""),
    ("events=1&line_endings=crlf", b"id: 1\r\ndata: event 1\r\n\r\n"),
    ("events=1&line_endings=cr", b"id: 1\rdata: event 1\r\r"),
    # LF, CRLF, CR in turn; the blank line after a CR never ends with LF alone.
    ("events=2&line_endings=mixed", b"id: 1\ndata: event 1\r\n\rid: 2\ndata: event 2\r\n\r"),
    ("events=1&bom=1", b"\xef\xbb\xbfid: 1\ndata: event 1\n\n"),
    ("events=1&comments=1", b": note\nid: 1\n: note\ndata: event 1\n\n"),
    ("events=1&space=0&comments=1", b":note\nid:1\n:note\ndata:event 1\n\n"),
    ("events=1&unknown=1", b"x-unknown: ignored\nno-colon-ignored\nid: 1\ndata: event 1\n\n"),
    ("events=1&data_lines=2", b"id: 1\ndata: event 1, line 1\ndata: event 1, line 2\n\n"),
    ("events=1&payload=empty", b"id: 1\ndata:\n\n"),
    ("events=1&payload=empty&data_lines=2", b"id: 1\ndata:\ndata:\n\n"),
    ("events=1&ids=0&event=tick", b"event: tick\ndata: event 1\n\n"),
    ("events=1&order=drei&event=e&retry=5", b"data: event 1\nretry: 5\nevent: e\nid: 1\n\n"),
    ("events=2&id_reset=2", b"id: 1\ndata: event 1\n\nid:\ndata: event 2\n\n"),
    ("events=1&id_nul=1", b"id: 1\x00nul\ndata: event 1\n\n"),
    ("events=1&retry=-5", b"id: 1\nretry: -5\ndata: event 1\n\n"),
    ("events=1&retry=", b"id: 1\nretry:\ndata: event 1\n\n"),
    ("events=1&size=10", b"id: 1\ndata: event 1...\n\n"),
    ("events=1&payload=json", b'id: 1\ndata: {"n":1,"text":"event 1"}\n\n'),
    ("events=1&payload=json&data_lines=2", b'id: 1\ndata: {"n":1,\ndata: "text":"event 1"}\n\n'),
    ("events=1&payload=unicode", "id: 1\ndata: événement ✓ 日本 🎉 1\n\n".encode()),
    # A partial event stops before its closing blank line, however much is asked.
    ("events=1&partial=3", b"id: 1\ndata: event 1\n\nid:"),
    ("events=1&partial=999", b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n"),
    ("events=0&partial=999&line_endings=crlf", b"id: 1\r\ndata: event 1\r\n"),
    (
        "events=1&pause_after=1&pause_ms=25&heartbeat_ms=10",
        b"id: 1\ndata: event 1\n\n: ping\n\n: ping\n\n",
    ),
    ("events=5&drop_after=2", b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n\n"),
]


@pytest.mark.parametrize(
    ("query", "body"), BODY_CASES, ids=[q or "defaults" for q, _ in BODY_CASES]
)
def test_body_bytes(query: str, body: bytes) -> None:
    assert body_of(query) == body


def test_openai_payload_is_chat_completion_chunks_then_done() -> None:
    body = body_of("events=2&payload=openai&ids=0")
    assert body == (
        b'data: {"id":"chatcmpl-sseserver-test","object":"chat.completion.chunk","created":0,'
        b'"model":"sseserver-test","choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":"event 1 "},"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-sseserver-test","object":"chat.completion.chunk","created":0,'
        b'"model":"sseserver-test","choices":[{"index":0,"delta":{"content":"event 2 "},'
        b'"finish_reason":null}]}\n\n'
        b"data: [DONE]\n\n"
    )
    # No [DONE] when the stream is cut short (dropped, or ending mid-event).
    assert b"[DONE]" not in body_of("events=2&payload=openai&drop_after=1")
    assert b"[DONE]" not in body_of("events=2&payload=openai&partial=5")


HEAD_CASES: list[tuple[str, bytes]] = [
    (
        "events=0",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\nx-accel-buffering: no\r\naccess-control-allow-origin: *\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n0\r\n\r\n",
    ),
    (
        "events=1&framing=length&content_type=none",
        b"HTTP/1.1 200 OK\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\n"
        b"access-control-allow-origin: *\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
        b"id: 1\ndata: event 1\n\n",
    ),
    (
        "events=1&version=1.0&content_type=text/plain",
        b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncache-control: no-cache\r\n"
        b"x-accel-buffering: no\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n"
        b"id: 1\ndata: event 1\n\n",
    ),
    (
        "status=204",
        b"HTTP/1.1 204 No Content\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n",
    ),
    (
        "events=2&status=301&split=1",
        b"HTTP/1.1 301 Moved Permanently\r\naccess-control-allow-origin: *\r\n"
        b"location: /v1/test/stream?events=2&split=1\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n",
    ),
    (
        "status=307&location=/elsewhere",
        b"HTTP/1.1 307 Temporary Redirect\r\naccess-control-allow-origin: *\r\n"
        b"location: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ),
    (
        "status=503",
        b"HTTP/1.1 503 Service Unavailable\r\naccess-control-allow-origin: *\r\n"
        b"content-type: application/json\r\ncontent-length: 74\r\nretry-after: 1\r\n"
        b'connection: close\r\n\r\n{"error": {"code": "scripted_status", "message": '
        b'"a scripted 503 answer"}}',
    ),
]


@pytest.mark.parametrize(("query", "wire"), HEAD_CASES, ids=[q for q, _ in HEAD_CASES])
def test_whole_response_bytes(query: str, wire: bytes) -> None:
    assert plan_of(query).wire == wire


def test_an_http10_request_gets_a_close_delimited_body() -> None:
    plan = plan_of("events=1", http10_request=True)
    assert b"transfer-encoding" not in plan.wire and b"content-length" not in plan.wire
    assert plan.body == b"id: 1\ndata: event 1\n\n"
    with pytest.raises(ValueError, match=r"HTTP/1\.1 on both sides"):
        plan_of("framing=chunked", http10_request=True)


def test_head_requests_get_the_head_alone() -> None:
    whole = plan_of("events=2&framing=length")
    head = build_plan(parse_scenario("events=2&framing=length"), head_only=True)
    assert head.wire == whole.wire[: whole.head_size]
    assert head.cuts == (len(head.wire),)


def test_resuming_after_a_last_event_id() -> None:
    assert body_of("events=4&drop_after=2") == body_of("events=2")
    resumed = build_plan(parse_scenario("events=4&drop_after=2", last_event_id="2"))
    assert resumed.events == (3, 4)
    assert resumed.body.startswith(b"15\r\nid: 3\n")
    # Past the end: 204, so that EventSource stops reconnecting.
    assert plan_of("events=4", last_event_id="4").status == 204
    assert plan_of("events=4", last_event_id="9").status == 204
    with pytest.raises(ValueError, match="Last-Event-ID"):
        plan_of("events=4", last_event_id="abc")


# -- writes, chunks and waits -------------------------------------------------------------


def writes(plan: Plan) -> list[bytes]:
    return [bytes(data) for _, data in plan.writes()][1:]  # without the head


def test_split_every_byte_puts_each_body_byte_in_its_own_write() -> None:
    plan = plan_of("events=1&split=1&framing=length")
    assert writes(plan) == [bytes([b]) for b in b"id: 1\ndata: event 1\n\n"]
    # Chunked: each event is one chunk whose size line goes with its first byte.
    chunked = writes(plan_of("events=1&split=1"))
    assert chunked[0] == b"15\r\ni" and chunked[1] == b"d" and chunked[-2] == b"\n\r\n"
    assert chunked[-1] == b"0\r\n\r\n"
    assert len(chunked) == 21 + 1


def test_split_at_offsets_cuts_every_event_there() -> None:
    plan = plan_of("events=2&split_at=3,8,500&framing=close")
    assert writes(plan) == [
        b"id:",
        b" 1\nda",
        b"ta: event 1\n\n",
        b"id:",
        b" 2\nda",
        b"ta: event 2\n\n",
    ]
    # The same cuts counted from each piece: a BOM and heartbeats are pieces too.
    with_bom = writes(plan_of("events=1&bom=1&split_at=2&framing=close"))
    assert with_bom == [b"\xef\xbb", b"\xbf", b"id", b": 1\ndata: event 1\n\n"]


def test_chunk_boundaries_are_independent_of_events_and_writes() -> None:
    plan = plan_of("events=2&chunk=16&chunk_ext=sse=1")
    body = b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n\n"
    expected = b"".join(
        b"%x;sse=1\r\n%b\r\n" % (len(body[i : i + 16]), body[i : i + 16])
        for i in range(0, len(body), 16)
    )
    assert plan.body == expected + b"0\r\n\r\n"
    assert framed_body(plan) == body
    # Writes still start at each event: the second event starts inside the second chunk.
    first, second, terminator = writes(plan)
    assert first == b"10;sse=1\r\n" + body[:16] + b"\r\n10;sse=1\r\n" + body[16:21]
    assert second == body[21:32] + b"\r\na;sse=1\r\n" + body[32:] + b"\r\n"
    assert terminator == b"0\r\n\r\n"


def test_waits_interval_drip_pause_and_heartbeats() -> None:
    assert plan_of("events=3&interval_ms=40&framing=close").waits_ms == (0, 0, 40, 40)
    drip = plan_of("events=1&split=5&drip_ms=7&framing=close")
    assert drip.waits_ms == (0, 0, 7, 7, 7, 7)
    assert drip.duration_ms == 28
    paused = plan_of("events=2&pause_after=1&pause_ms=100&heartbeat_ms=30")
    assert [bytes(d) for _, d in paused.writes()][2] == b"8\r\n: ping\n\n\r\n"
    assert paused.waits_ms == (0, 0, 30, 30, 30, 10, 0)
    # A pause after the last event comes before the end (here: the terminator).
    tail = plan_of("events=1&pause_after=1&pause_ms=50")
    assert tail.waits_ms == (0, 0, 50) and tail.end_wait_ms == 0
    tail_close = plan_of("events=1&pause_after=1&pause_ms=50&end=close")
    assert tail_close.waits_ms == (0, 0) and tail_close.end_wait_ms == 50


@pytest.mark.parametrize(
    ("query", "end", "terminated"),
    [
        ("end=clean", "close", True),
        ("end=close", "close", False),
        ("end=rst", "rst", False),
        ("end=close&framing=length", "close", False),
    ],
)
def test_endings(query: str, end: str, terminated: bool) -> None:
    plan = plan_of(query)
    assert plan.end == end
    assert plan.wire.endswith(b"\r\n0\r\n\r\n") is terminated


def test_the_same_scenario_gives_the_same_bytes_and_cuts() -> None:
    query = "events=20&line_endings=mixed&split=3&chunk=11&interval_ms=1&bom=1&order=rotate"
    first, second = plan_of(query), plan_of(query)
    assert first == second
    assert first.wire == second.wire and first.cuts == second.cuts


def test_order_rotate_goes_through_every_permutation() -> None:
    assert len(ORDERS) == 24
    body = body_of("events=24&order=rotate&event=e&retry=1&framing=close").decode()
    orders = []
    for block in body.split("\n\n")[:-1]:
        orders.append("".join(line[0] for line in block.split("\n")))
    assert sorted(orders) == sorted(ORDERS)


# -- refusals and bounds ------------------------------------------------------------------

REFUSALS = [
    ("nope=1", "unknown parameter 'nope'"),
    ("events=1&events=2", "events is given twice"),
    ("events=-1", "events must be a whole number"),
    ("events=1001", "events must be between 0 and 1000"),
    ("line_endings=lfcr", "line_endings must be one of lf, crlf, cr, mixed"),
    ("order=ied", "order must be one of"),
    ("split=0", "split must be between"),
    ("split=2&split_at=3", "split or split_at"),
    ("split_at=", "split_at must be a comma-separated list"),
    ("chunk=4&framing=length", "chunk and chunk_ext need framing=chunked"),
    ("chunk_ext=a b", "chunk_ext must be"),
    ("version=1.0&framing=chunked", "HTTP/1.1 on both sides"),
    ("status=418", "status must be one of"),
    ("event=a%0Ab", "event must be"),
    ("retry=1%0D", "retry must be"),
    ("location=http://evil.example/", "location must be a path"),
    ("location=//evil.example/", "location must be a path"),
    ("heartbeat_ms=1", "heartbeat_ms must be between 10"),
    ("drip_ms=10001", "drip_ms must be between 0 and 10000"),
    ("pause_ms=300001", "pause_ms must be between 0 and 300000"),
    ("payload=openai&event=x", "payload=openai takes no event name"),
    ("bom=maybe", "bom must be 1 or 0"),
]


@pytest.mark.parametrize(("query", "message"), REFUSALS, ids=[q for q, _ in REFUSALS])
def test_bad_parameters_are_refused_naming_them(query: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        plan_of(query)
    assert message in str(caught.value)


def test_bounds_keep_every_response_small_and_short() -> None:
    with pytest.raises(ValueError, match="body would"):
        plan_of("events=1000&size=65536")
    with pytest.raises(ValueError, match=f"over {MAX_BODY_BYTES}"):
        plan_of("events=20&size=65536")
    with pytest.raises(ValueError, match=f"over {MAX_WRITES}"):
        plan_of("events=1000&split=1")
    with pytest.raises(ValueError, match=f"more than {MAX_DURATION_MS}"):
        plan_of("events=1000&interval_ms=1000")
    with pytest.raises(ValueError, match=f"over {MAX_DURATION_MS}"):
        plan_of("events=100&split=10&drip_ms=10000")
    with pytest.raises(ValueError, match="heartbeats"):
        plan_of("events=2&pause_after=1&pause_ms=300000&heartbeat_ms=10")
    with pytest.raises(ValueError, match="chunks"):
        plan_of("events=1000&size=1000&chunk=1")
    # The largest that fits is built, at its bounds.
    assert len(plan_of("events=15&size=65536&framing=length").body) <= MAX_BODY_BYTES


def test_query_accepts_parsed_mappings_and_ignores_resume_and_token_parameters() -> None:
    parsed = parse_scenario({"events": ["2"], "lastEventID": ["1"], "access_token": ["t"]})
    assert parsed == parse_scenario("events=2")
    assert parsed.framing == "chunked"


# -- what a conforming client must make of every scenario --------------------------------


@dataclass(frozen=True)
class Expect:
    """What the WHATWG standard makes a client dispatch (computed here, not by the
    generator: ids, types and resets follow the standard's rules from the parameters)."""

    events: list[Event]
    last_event_id: str
    retry: int | None


def expected(s: Scenario) -> Expect:
    last_id = str(s.after) if s.after else ""
    out = []
    end = min(s.events, s.after + s.drop_after) if s.drop_after else s.events
    for n in range(s.after + 1, end + 1):
        if n in s.id_reset:
            last_id = ""
        elif n in s.id_nul:
            pass  # an id holding NUL is ignored: the last one stays
        elif s.ids:
            last_id = str(n)
        out.append(Event(s.event or "message", expected_data(s, n), last_id))
    if s.payload == "openai" and end == s.events and not s.partial:
        out.append(Event("message", "[DONE]", last_id))
    retry = int(s.retry) if s.retry and s.retry.isascii() and s.retry.isdigit() else None
    return Expect(out, last_id, retry if out else None)


GRID = {
    "line_endings": [f"line_endings={e}" for e in ("lf", "crlf", "cr", "mixed")],
    "shape": [
        "",
        "bom=1&comments=1",
        "space=0&unknown=1&data_lines=3",
        "payload=empty&event=ping&id_reset=2",
        "payload=unicode&id_nul=2&retry=1500&order=rotate",
        "payload=json&data_lines=2&retry=x1",
        "payload=openai&ids=0&data_lines=4",
        "retry=-5&order=drei&event=tick",
    ],
    "cut": ["", "split=1", "split_at=1,2,5,11", "chunk=1&chunk_ext=x", "chunk=7&split=3"],
    "tail": ["", "partial=9", "drop_after=2&pause_after=1&pause_ms=20&heartbeat_ms=10"],
}


@pytest.mark.parametrize(
    "query",
    ["&".join(p for p in combo if p) for combo in itertools.product(*GRID.values())],
)
def test_every_scenario_reads_as_the_standard_says(query: str) -> None:
    s = parse_scenario("events=4&" + query)
    plan = build_plan(s)
    want = expected(s)
    # Fed write by write, as the writes arrive (each split point a read boundary).
    parser = SSEParser()
    for data in body_reads(plan):
        parser.feed(data)
    parser.feed_eof()
    assert parser.events == want.events
    assert parser.last_event_id == want.last_event_id
    assert parser.retry == want.retry
    # The package's own expectations (for client authors' tests) say the same.
    mine = [Event(e.type, e.data, e.last_event_id) for e in expected_events(s)]
    assert mine == want.events
    assert expected_retry(s) == want.retry
