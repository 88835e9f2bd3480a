"""HTTP behaviour over real sockets (SPEC §3): stream heads, HTTP/1.0 framing, HEAD,
keep-alive, pipelining, and chunk framing. h11 (as a client) is the oracle for every
response; chunk framing is also checked byte by byte."""

from __future__ import annotations

import json

import h11
import pytest

from tests.support.chunks import split_chunks
from tests.support.rawhttp import RawClient, SSEReader, open_stream, text_of
from tests.support.servers import app_server
from tests.support.sse_parser import parse

pytestmark = pytest.mark.timeout(30)

STREAM_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}


async def test_stream_response_headers_exact() -> None:
    async with app_server() as (server, _ctx):
        client, resp, reader = await open_stream(server.port, "/v1/stream?tokens=3&interval_ms=0")
        async with client:
            assert resp.status == 200
            assert resp.http_version == b"1.1"
            for name, value in STREAM_HEADERS.items():
                assert resp.header_values(name) == [value], name
            assert resp.header_values("transfer-encoding") == ["chunked"]
            assert resp.header("content-length") is None
            assert resp.header("connection") == "keep-alive"
            events = await reader.rest()
            assert events[-1].data == "[DONE]"


async def test_http10_gets_close_delimited_body_and_connection_close() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/v1/stream?tokens=5&interval_ms=0", version="1.0")
            resp = await client.head()
            assert resp.status == 200
            assert resp.header("transfer-encoding") is None
            assert resp.header("content-length") is None
            assert resp.header("connection") == "close"
            assert resp.header("content-type") == STREAM_HEADERS["content-type"]
            # The oracle reads a body without length or chunking until the close.
            body = await client.body(within=10)
            assert client.eof, "an HTTP/1.0 body must be delimited by closing"
            # Raw bytes: SSE text directly after the head, no chunk-size lines.
            _head, _, raw_body = bytes(client.raw).partition(b"\r\n\r\n")
            assert raw_body == body
            assert not raw_body.startswith(b"0") and b"\r\n0\r\n\r\n" not in raw_body
            events = parse(raw_body)
            assert [e.type for e in events] == ["start", *["message"] * 5, "metrics", "message"]
            assert events[-1].data == "[DONE]"


async def test_head_gets_headers_only_and_starts_no_generation() -> None:
    async with app_server() as (server, ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("HEAD", "/v1/stream?tokens=3&interval_ms=0")
            resp = await client.response()
            assert resp.status == 200
            assert resp.header("content-type") == STREAM_HEADERS["content-type"]
            assert resp.body == b""
            # Nothing followed the head: the next bytes answer the next request.
            _head, sep, after = bytes(client.raw).partition(b"\r\n\r\n")
            assert sep and after == b""
            client.request("GET", "/healthz")
            health = await client.response()
            assert health.status == 200
            assert health.json() == {"status": "ok"}
            assert ctx.generations.running == 0
            assert ctx.hub.last_id() is None, "HEAD must not start a generation"


async def test_keep_alive_stream_then_healthz_on_one_connection() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/v1/stream?tokens=4&interval_ms=0")
            resp = await client.head()
            assert resp.status == 200
            events = parse(await client.body())
            assert events[-1].data == "[DONE]"
            assert client.oracle.our_state is h11.DONE and client.oracle.their_state is h11.DONE
            assert not client.eof
            client.request("GET", "/healthz")
            health = await client.response()
            assert health.status == 200
            assert health.json() == {"status": "ok"}


async def test_keep_alive_after_plain_response() -> None:
    """A Content-Length response (/healthz) leaves the connection open for the next."""
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/healthz")
            health = await client.response()
            assert health.status == 200
            assert health.header("connection") != "close"
            client.request("GET", "/v1/stream?tokens=2&interval_ms=0")
            second = await client.response()
            assert second.status == 200
            assert parse(second.body)[-1].data == "[DONE]"
            assert len(server.state.connections) == 1


async def test_pipelined_requests_answered_in_order() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /v1/stream?tokens=3&interval_ms=0 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            client.expect("GET", "/healthz")
            first = await client.response()
            client.expect("GET", "/v1/stream")
            second = await client.response()
            client.expect("GET", "/readyz")
            third = await client.response()
            assert first.status == 200 and first.json() == {"status": "ok"}
            assert second.status == 200
            assert second.header("content-type") == STREAM_HEADERS["content-type"]
            events = parse(second.body)
            assert [e.type for e in events] == [
                "start",
                "message",
                "message",
                "message",
                "metrics",
                "message",
            ]
            assert third.status == 200 and third.json() == {"status": "ready"}


async def test_pipelined_after_stream_waits_in_order_with_slow_stream() -> None:
    """A request pipelined behind a stream still running is answered only after it."""
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(
                b"GET /v1/stream?tokens=5&interval_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            client.expect("GET", "/v1/stream")
            stream = await client.response()
            client.expect("GET", "/healthz")
            health = await client.response()
            assert text_of(parse(stream.body)).count(" ") == 5
            assert health.status == 200


@pytest.mark.parametrize(
    "query",
    [
        "tokens=20&interval_ms=0",
        "tokens=5&interval_ms=0&size=1",
        "tokens=3&interval_ms=0&size=5000",
        "tokens=0&interval_ms=0",
    ],
)
async def test_no_zero_length_chunk_before_the_end(query: str) -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(server.port, f"/v1/stream?{query}")
        async with client:
            await reader.rest()
            _head, _, raw_body = bytes(client.raw).partition(b"\r\n\r\n")
            sizes, payload, after = split_chunks(raw_body)
            assert sizes[-1] == 0
            assert all(size > 0 for size in sizes[:-1]), sizes
            assert after == b""
            assert payload == bytes(reader.data)


async def test_no_zero_length_chunk_with_heartbeats() -> None:
    """Heartbeats written by the shared timer are real chunks, never ``0\\r\\n\\r\\n``."""
    async with app_server(heartbeat_s=0.1) as (server, _ctx):
        client, _resp, reader = await open_stream(
            server.port, "/v1/stream?tokens=3&interval_ms=150&ttft_ms=300"
        )
        async with client:
            await reader.rest()
            assert "ping" in reader.parser.comments
            _head, _, raw_body = bytes(client.raw).partition(b"\r\n\r\n")
            sizes, _payload, after = split_chunks(raw_body)
            assert all(size > 0 for size in sizes[:-1]), sizes
            assert sizes[-1] == 0 and after == b""


async def test_post_stream_same_head_and_framing() -> None:
    async with app_server() as (server, _ctx):
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "hi"}],
                "params": {"tokens": 3, "interval_ms": 0},
            }
        ).encode()
        client, resp, reader = await open_stream(
            server.port,
            "/v1/stream",
            method="POST",
            headers=[("Content-Type", "application/json")],
            body=body,
        )
        async with client:
            assert resp.status == 200
            for name, value in STREAM_HEADERS.items():
                assert resp.header_values(name) == [value], name
            assert resp.header("transfer-encoding") == "chunked"
            events = await reader.rest()
            assert events[0].type == "start" and events[-1].data == "[DONE]"


async def test_sse_reader_smoke() -> None:
    """The helper reads events as they arrive (guards the tests above)."""
    async with app_server() as (server, _ctx):
        client, _resp, reader = await open_stream(server.port, "/v1/stream?tokens=2")
        async with client:
            assert isinstance(reader, SSEReader)
            first = await reader.next()
            assert first.type == "start"
            await reader.rest()
            assert reader.ended


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    """A client that sends ``Expect: 100-continue`` holds its body back (curl for a
    second) until the server says so; the answer must come before any body byte."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "params": {"tokens": 2, "interval_ms": 0}}
    ).encode()
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(
                b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            interim = await client.reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            client.write(body)
            rest = await client.reader.read(65536)
            assert rest.startswith(b"HTTP/1.1 200 "), rest[:200]
