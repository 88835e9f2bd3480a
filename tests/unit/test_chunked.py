"""sseserver.wire.chunked: exact chunk bytes, and h11 as the oracle.

The server lets h11 write the response head and the terminator and writes the chunks in
between itself (STYLE.md, "h11 with hand-written chunk framing"). That relies on h11
behaviour which is pinned here, so an h11 upgrade that changes it fails these tests rather
than corrupting bodies:
- to an HTTP/1.1 peer, a response without Content-Length gets ``Transfer-Encoding:
  chunked``; ``Data`` frames exactly as ``frame()`` does; ``EndOfMessage`` is
  ``0\\r\\n\\r\\n``; the state machine ends ``DONE`` even though h11 never saw our chunks;
- to an HTTP/1.0 peer, h11 picks close-delimited framing: no Transfer-Encoding,
  ``Connection: close`` added, ``Data`` passed through raw, ``EndOfMessage`` is ``b""``;
- to a HEAD request the head says chunked but the body must stay empty, and
  ``EndOfMessage`` is ``b""``: no chunk, not even the terminator, may be written.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import h11
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sseserver.wire.chunked import LAST_CHUNK, Frame, frame
from sseserver.wire.sse import encode_comment, encode_event
from tests.support.sse_parser import Event, SSEParser

Buffer = bytes | bytearray | memoryview

FRAME_CASES: list[tuple[bytes, bytes]] = [
    (b"a", b"1\r\na\r\n"),
    (b"hello", b"5\r\nhello\r\n"),
    (b"x" * 15, b"f\r\n" + b"x" * 15 + b"\r\n"),
    (b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n"),
    (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),  # lower-case hex, no leading zeros
    (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
    # A payload that looks like the terminator is just data inside a chunk.
    (LAST_CHUNK, b"5\r\n0\r\n\r\n\r\n"),
    (b"\x00\r\n\xff", b"4\r\n\x00\r\n\xff\r\n"),
    (b"data: x\n\n", b"9\r\ndata: x\n\n\r\n"),
]


@pytest.mark.parametrize(("payload", "expected"), FRAME_CASES)
def test_frame_bytes(payload: bytes, expected: bytes) -> None:
    assert frame(payload) == expected
    assert frame(bytearray(payload)) == expected
    assert frame(memoryview(payload)) == expected


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_frame_of_nothing_is_nothing(empty: Buffer) -> None:
    # Never a zero-length chunk: "0\r\n\r\n" would end the body.
    assert frame(empty) == b""


def test_frame_of_a_memoryview_slice() -> None:
    assert frame(memoryview(b"..abc..")[2:5]) == b"3\r\nabc\r\n"


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_frame_value() -> None:
    f = Frame.of(b"hello")
    assert f.raw == b"hello"
    assert f.chunked == b"5\r\nhello\r\n"
    assert len(f) == 5
    assert f == Frame(b"5\r\nhello\r\n", 5)
    # One copy of the bytes: the HTTP/1.0 form is a view into the chunk.
    assert isinstance(f.raw, memoryview) and f.raw.obj is f.chunked
    with pytest.raises(AttributeError):
        f.raw = b"x"  # type: ignore[misc]


def test_joined_frame_keeps_each_chunk() -> None:
    parts = [Frame.of(b"ab"), Frame.of(b"cde")]
    joined = Frame.joined(parts)
    assert joined.chunked == b"2\r\nab\r\n3\r\ncde\r\n"
    assert joined.raw == b"abcde" and len(joined) == 5


def test_frame_value_of_nothing() -> None:
    f = Frame.of(b"")
    assert (f.raw, f.chunked, len(f)) == (b"", b"", 0)


# --------------------------------------------------------------------------------------
# h11 as the oracle
# --------------------------------------------------------------------------------------

HEAD_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8")]


def _server_after_request(request: bytes) -> h11.Connection:
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    return server


def _http11_exchange() -> tuple[h11.Connection, h11.Connection, bytes]:
    """A client's GET, received by a server that has sent its (chunked) head."""
    client = h11.Connection(h11.CLIENT)
    request = client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    request += client.send(h11.EndOfMessage())
    server = _server_after_request(request)
    head = server.send(h11.Response(status_code=200, headers=HEAD_HEADERS))
    return client, server, head


def _client_events(
    client: h11.Connection, wire: bytes, cuts: Sequence[int] = ()
) -> list[h11.Event]:
    """Feed ``wire`` (cut at ``cuts``) to ``client``; return every event up to the end of
    the response, Data merged into one so that chunk boundaries do not matter."""
    points = sorted({c % len(wire) for c in cuts} | {0, len(wire)})
    events: list[h11.Event] = []
    for a, b in itertools.pairwise(points):
        client.receive_data(wire[a:b])  # never b"": to h11 that means end of stream
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                break
            assert isinstance(event, h11.Event)  # not PAUSED: we never pipeline here
            if isinstance(event, h11.Data) and events and isinstance(events[-1], h11.Data):
                events[-1] = h11.Data(data=bytes(events[-1].data) + bytes(event.data))
            else:
                events.append(event)
            if isinstance(event, h11.EndOfMessage):
                return events
    return events


def test_h11_chunked_head() -> None:
    _, server, head = _http11_exchange()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert b"Content-Length" not in head
    assert b"Connection: close" not in head
    assert server.our_state is h11.SEND_BODY


@pytest.mark.parametrize("payload", [p for p, _ in FRAME_CASES] + [b""])
def test_frame_equals_h11_data(payload: bytes) -> None:
    _, server, _ = _http11_exchange()
    h11_bytes = server.send(h11.Data(data=payload))
    assert frame(payload) == h11_bytes
    pieces = server.send_with_data_passthrough(h11.Data(data=payload))
    assert pieces is not None
    assert frame(payload) == b"".join(pieces)
    assert server.send(h11.EndOfMessage()) == LAST_CHUNK


def test_full_scheme_h11_head_our_frames_h11_end() -> None:
    client, server, head = _http11_exchange()
    payloads = [b"retry: 2000\n\n", b": hello\n\n", b"data: one\n\n", b"", b"data: two\n\n"]
    # h11 never sees our chunks: SEND_BODY --Data--> SEND_BODY is a self-loop and the
    # ChunkedWriter has no state, so skipping it leaves the machine where it was.
    body_frames = b"".join(frame(p) for p in payloads)
    end = server.send(h11.EndOfMessage())
    assert end == LAST_CHUNK
    assert server.our_state is h11.DONE
    assert server.their_state is h11.DONE

    events = _client_events(client, head + body_frames + end)
    assert [type(e) for e in events] == [h11.Response, h11.Data, h11.EndOfMessage]
    response, data, _ = events
    assert isinstance(response, h11.Response) and isinstance(data, h11.Data)
    assert response.status_code == 200
    assert (b"transfer-encoding", b"chunked") in list(response.headers)
    assert data.data == b"".join(payloads)
    assert client.our_state is h11.DONE
    assert client.their_state is h11.DONE

    # Keep-alive: both sides are DONE, so the next request can be served.
    server.start_next_cycle()
    client.start_next_cycle()
    assert server.states == {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}


def test_chunk_boundaries_are_ours() -> None:
    client, server, head = _http11_exchange()
    wire = head + frame(b"abc") + frame(b"defg") + server.send(h11.EndOfMessage())
    client.receive_data(wire)
    chunks = []
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            chunks.append((bytes(event.data), event.chunk_start, event.chunk_end))
    assert chunks == [(b"abc", True, True), (b"defg", True, True)]


def test_sse_through_chunks_end_to_end() -> None:
    client, server, head = _http11_exchange()
    body = [
        encode_event(retry=2000, comment="stream start"),
        encode_event('{"id": "g"}', event="start", id="g:0"),
        encode_event("hé\r\nllo", id="g:1"),
        encode_comment("ping"),
        encode_event("[DONE]", id="g:2"),
    ]
    wire = head + b"".join(map(frame, body)) + server.send(h11.EndOfMessage())
    events = _client_events(client, wire)
    data = events[1]
    assert isinstance(data, h11.Data)
    parser = SSEParser()
    assert parser.feed(data.data) == [
        Event("start", '{"id": "g"}', "g:0"),
        Event("message", "hé\nllo", "g:1"),
        Event("message", "[DONE]", "g:2"),
    ]
    assert parser.retry == 2000
    assert parser.comments == ["stream start", "ping"]


def test_http10_peer_gets_close_delimited_raw_body() -> None:
    server = _server_after_request(b"GET /v1/stream HTTP/1.0\r\n\r\n")
    assert server.their_http_version == b"1.0"
    head = server.send(h11.Response(status_code=200, headers=HEAD_HEADERS))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length" not in head
    assert b"\r\nConnection: close\r\n" in head
    assert server.send(h11.Data(data=b"data: x\n\n")) == b"data: x\n\n"  # raw, unframed
    assert server.send(h11.EndOfMessage()) == b""  # no terminator: closing ends the body
    assert server.our_state is h11.MUST_CLOSE

    # A client reads such a body until the connection closes.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(head + b"data: x\n\n")
    client.receive_data(b"")
    events = [client.next_event() for _ in range(4)]
    assert [type(e) for e in events] == [
        h11.Response,
        h11.Data,
        h11.EndOfMessage,
        h11.ConnectionClosed,
    ]
    assert isinstance(events[1], h11.Data) and events[1].data == b"data: x\n\n"


def test_http10_keep_alive_request_is_still_closed() -> None:
    # nginx's default proxy_http_version is 1.0; even if it asks for keep-alive, h11 has
    # no way to delimit a streamed body other than by closing.
    server = _server_after_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = server.send(h11.Response(status_code=200, headers=HEAD_HEADERS))
    assert b"\r\nConnection: close\r\n" in head
    assert b"Transfer-Encoding" not in head
    assert server.send(h11.EndOfMessage()) == b""
    assert server.our_state is h11.MUST_CLOSE


def test_head_request_gets_no_body_and_no_terminator() -> None:
    server = _server_after_request(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = server.send(h11.Response(status_code=200, headers=HEAD_HEADERS))
    # The head is the one a GET would get (RFC 9110 §9.3.2)...
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    # ...but the body is empty: not even LAST_CHUNK may be written.
    with pytest.raises(h11.LocalProtocolError):
        server.send(h11.Data(data=b"x"))
    server = _server_after_request(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    server.send(h11.Response(status_code=200, headers=HEAD_HEADERS))
    assert server.send(h11.EndOfMessage()) == b""
    assert server.our_state is h11.DONE


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=10),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
@example(payloads=[b"0\r\n\r\n", b"", b"\r\n"], cuts=[])
def test_any_bytes_survive_framing(payloads: list[bytes], cuts: list[int]) -> None:
    client, server, head = _http11_exchange()
    for payload in payloads:
        assert frame(payload) == server.send(h11.Data(data=payload))
    wire = head + b"".join(frame(p) for p in payloads) + server.send(h11.EndOfMessage())
    events = _client_events(client, wire, cuts)
    assert isinstance(events[0], h11.Response)
    assert isinstance(events[-1], h11.EndOfMessage)
    body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
    assert body == b"".join(payloads)
    assert len(events) == (3 if body else 2)
    assert client.their_state is h11.DONE
