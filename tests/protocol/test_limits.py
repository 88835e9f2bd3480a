"""Limits and refusals over real sockets (SPEC §3): each answered with the right status and
a short JSON body (``application/json``, under 2 KB), never a crash or a hang."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.rawhttp import RawClient, Response
from tests.support.servers import app_server
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(30)

MAX_ERROR_BODY = 2048


def assert_json_error(resp: Response, status: int) -> dict[str, object]:
    assert resp.status == status, (resp.status, resp.body)
    ctype = resp.header("content-type") or ""
    assert ctype.split(";")[0].strip() == "application/json", ctype
    assert len(resp.body) < MAX_ERROR_BODY
    assert resp.header("content-length") == str(len(resp.body))
    body = json.loads(resp.body)
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return error


async def still_serving(port: int) -> None:
    """The server survived: a fresh connection gets /healthz."""
    async with await RawClient.connect(port) as client:
        client.request("GET", "/healthz")
        resp = await client.response()
        assert resp.status == 200


async def test_malformed_request_line_400() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(b"THIS IS NOT HTTP\r\n\r\n")
            client.expect()
            assert_json_error(await client.response(), 400)
            assert await client.closed_by_server(2.0)
        await still_serving(server.port)


async def test_malformed_header_line_400() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            client.expect()
            assert_json_error(await client.response(), 400)
            assert await client.closed_by_server(2.0)


async def test_unknown_path_404() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/no/such/path")
            error = assert_json_error(await client.response(), 404)
            assert error["code"] == "not_found"


async def test_wrong_method_405_with_allow() -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("DELETE", "/v1/stream")
            resp = await client.response()
            assert_json_error(resp, 405)
            allow = {m.strip() for m in (resp.header("allow") or "").split(",")}
            assert {"GET", "POST"} <= allow
            assert "DELETE" not in allow
        async with await RawClient.connect(server.port) as client:
            client.request("POST", "/healthz", body=b"{}")
            resp = await client.response()
            assert_json_error(resp, 405)
            assert "GET" in (resp.header("allow") or "")


async def test_slowloris_cut_at_header_deadline() -> None:
    """A head trickled one byte every 0.1 s is cut at about ``header_timeout_s``: the
    bytes do not extend the deadline."""
    timeout_s = 0.3
    async with app_server(header_timeout_s=timeout_s) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            start = time.monotonic()
            client.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            client.expect()

            async def trickle() -> None:
                for _ in range(40):  # at most 4 s of trickling
                    await asyncio.sleep(0.1)  # the slowloris pace, not a synchronisation
                    if client.eof:
                        return
                    try:
                        client.write(b"a")
                        await client.writer.drain()
                    except (ConnectionError, OSError):
                        return

            trickler = asyncio.create_task(trickle())
            try:
                data = await client.read_to_eof(within=3.0)
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
            elapsed = time.monotonic() - start
            assert elapsed < timeout_s + 0.5, f"cut after {elapsed:.2f}s, not ~{timeout_s}s"
            assert elapsed >= timeout_s - 0.05
            if data:  # 408 is optional: a close alone is allowed (SPEC §3)
                assert_json_error(await client.response(), 408)
        await still_serving(server.port)


async def test_silent_connection_closed_after_header_timeout() -> None:
    async with app_server(header_timeout_s=0.3) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            start = time.monotonic()
            data = await client.read_to_eof(within=3.0)
            elapsed = time.monotonic() - start
            assert 0.25 <= elapsed < 1.0
            if data:
                client.expect()
                assert_json_error(await client.response(), 408)
        await eventually(lambda: not server.state.connections, what="connection dropped")


async def test_body_too_large_by_content_length_413() -> None:
    async with app_server(max_body_bytes=1024) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            # Only the head: the server must answer on the declared length alone.
            client.write(
                b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1025\r\n\r\n"
            )
            client.expect("POST", "/v1/stream")
            error = assert_json_error(await client.response(within=3.0), 413)
            assert error["code"] == "body_too_large"
            assert await client.closed_by_server(2.0)
        await still_serving(server.port)


async def test_body_at_limit_accepted() -> None:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "params": {"tokens": 1}}
    ).encode()
    body = body + b" " * (1024 - len(body))
    async with app_server(max_body_bytes=1024) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("POST", "/v1/stream", [("Content-Type", "application/json")], body=body)
            resp = await client.response()
            assert resp.status == 200


async def test_chunked_body_too_large_413() -> None:
    async with app_server(max_body_bytes=1024) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(
                b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            piece = b"[" + b" " * 798 + b"]"
            for _ in range(2):
                client.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            client.expect("POST", "/v1/stream")
            error = assert_json_error(await client.response(within=3.0), 413)
            assert error["code"] == "body_too_large"
            assert await client.closed_by_server(2.0)
        await still_serving(server.port)


async def test_head_too_large_431() -> None:
    async with app_server(max_head_bytes=1024) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
            client.expect()
            assert_json_error(await client.response(within=3.0), 431)
            assert await client.closed_by_server(2.0)
        await still_serving(server.port)


async def test_head_too_large_431_even_without_end() -> None:
    """An endless head (no CRLFCRLF yet) is refused once it passes the limit."""
    async with app_server(max_head_bytes=1024) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000)
            client.expect()
            assert_json_error(await client.response(within=3.0), 431)


async def test_over_max_connections_503_with_retry_after() -> None:
    async with app_server(max_connections=2) as (server, _ctx):
        held = [await RawClient.connect(server.port) for _ in range(2)]
        try:
            await eventually(lambda: len(server.state.connections) == 2, what="2 connections")
            async with await RawClient.connect(server.port) as extra:
                extra.expect()
                resp = await extra.response(within=3.0)
                assert_json_error(resp, 503)
                retry_after = resp.header("retry-after")
                assert retry_after is not None and retry_after.isdigit()
                assert await extra.closed_by_server(2.0)
            assert len(server.state.connections) == 2
        finally:
            for client in held:
                await client.close()
        # Room again once the held ones have gone.
        await eventually(lambda: not server.state.connections, what="held connections gone")
        await still_serving(server.port)


async def test_keepalive_idle_timeout_closes_idle_connection() -> None:
    async with app_server(keepalive_timeout_s=0.3) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/v1/stream?tokens=1&interval_ms=0")
            resp = await client.response()
            assert resp.status == 200
            idle_from = time.monotonic()
            extra = await client.read_to_eof(within=3.0)
            elapsed = time.monotonic() - idle_from
            assert extra == b""
            assert 0.2 <= elapsed < 1.5, f"idle connection closed after {elapsed:.2f}s"
        await eventually(lambda: not server.state.connections, what="connection dropped")


async def test_keepalive_timer_does_not_cut_a_running_stream() -> None:
    async with app_server(keepalive_timeout_s=0.2, header_timeout_s=0.2) as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", "/v1/stream?tokens=8&interval_ms=100")
            resp = await client.response(within=5.0)
            assert resp.status == 200
            assert resp.body.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]},
            "messages[1].content",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "params": {"tokens": -1}}, "tokens"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "params": {"interval_ms": "abc"}},
            "interval_ms",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "params": "fast"}, "params"),
        ({"messages": [{"role": "user", "content": "hi"}], "params": []}, "params"),
    ],
)
async def test_post_stream_bad_json_field_400(body: object, field: str) -> None:
    async with app_server() as (server, ctx):
        async with await RawClient.connect(server.port) as client:
            client.request(
                "POST",
                "/v1/stream",
                [("Content-Type", "application/json")],
                body=json.dumps(body).encode(),
            )
            error = assert_json_error(await client.response(), 400)
            assert field in str(error["message"]), error
        assert ctx.generations.running == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_post_stream_invalid_json_400(raw: bytes) -> None:
    async with app_server() as (server, _ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("POST", "/v1/stream", [("Content-Type", "application/json")], raw)
            assert_json_error(await client.response(), 400)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("tokens=-1", "tokens"),
        ("interval_ms=abc", "interval_ms"),
        ("size=-5", "size"),
        ("ttft_ms=nan", "ttft_ms"),
    ],
)
async def test_get_stream_bad_synthetic_params_400(query: str, field: str) -> None:
    async with app_server() as (server, ctx):
        async with await RawClient.connect(server.port) as client:
            client.request("GET", f"/v1/stream?{query}")
            error = assert_json_error(await client.response(), 400)
            assert field in str(error["message"]), error
        assert ctx.generations.running == 0
        assert ctx.hub.last_id() is None
