"""Graceful shutdown of a real ``python -m sseserver`` process (SPEC §10): on SIGTERM it
stops accepting, tells open streams to reconnect (``retry:``), lets generations finish
within ``--shutdown-grace-s``, then cancels, ends every body with the chunked terminator
(not a bare close) and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import pytest

from sseserver.providers.synthetic import token_text
from tests.support.chunks import split_chunks
from tests.support.procs import server_process
from tests.support.rawhttp import RawClient, SSEReader, open_stream, text_of

pytestmark = pytest.mark.timeout(60)

RETRY_MS = 1500


async def wait_exit(proc: subprocess.Popen[Any], within: float = 15.0) -> int:
    return await asyncio.to_thread(proc.wait, within)


def body_bytes(client: RawClient) -> bytes:
    return bytes(client.raw).partition(b"\r\n\r\n")[2]


async def test_sigterm_long_stream_gets_retry_then_chunked_terminator() -> None:
    grace = 0.5
    with server_process("--shutdown-grace-s", str(grace), "--retry-ms", str(RETRY_MS)) as (
        proc,
        port,
    ):
        client, resp, reader = await open_stream(port, "/v1/stream?tokens=1000000&interval_ms=50")
        async with client:
            assert resp.status == 200
            assert resp.header("transfer-encoding") == "chunked"
            await reader.until(lambda r: len(r.arrivals) >= 3)
            mark = len(reader.data)
            signalled_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            await reader.rest(within=10)  # until h11 sees the body's end
            ended_after = time.monotonic() - signalled_at
            tail = bytes(client.raw)
            closed = await client.closed_by_server(5.0)
            extra = bytes(client.raw)[len(tail) :]

        after = bytes(reader.data[mark:])
        # 1. The open stream is told to reconnect (elsewhere) after RETRY_MS.
        assert f"retry: {RETRY_MS}".encode() in after.split(b"\n"), after[:300]
        assert reader.parser.retry == RETRY_MS
        # 2. After the grace period the body ends with the chunked terminator, exactly.
        sizes, _payload, trailing = split_chunks(body_bytes(client))
        assert sizes[-1] == 0 and all(s > 0 for s in sizes[:-1])
        assert trailing == b"" and extra == b""
        assert tail.endswith(b"\r\n0\r\n\r\n")
        assert closed
        assert grace - 0.1 <= ended_after < grace + 5.0, ended_after
        # 3. The last event is still [DONE] (SPEC §6), any error before it is "shutdown".
        events = [ev for _t, ev in reader.arrivals]
        assert events[-1].data == "[DONE]"
        for ev in events:
            if ev.type == "error":
                assert json.loads(ev.data)["code"] == "shutdown"
        # 4. The process exits 0.
        assert await wait_exit(proc) == 0


async def test_sigterm_short_generation_completes_within_grace() -> None:
    tokens = 10
    with server_process("--shutdown-grace-s", "5", "--retry-ms", str(RETRY_MS)) as (proc, port):
        client, resp, reader = await open_stream(port, f"/v1/stream?tokens={tokens}&interval_ms=50")
        async with client:
            assert resp.status == 200
            await reader.until(lambda r: len(r.arrivals) >= 2)
            proc.send_signal(signal.SIGTERM)
            await reader.rest(within=10)
        events = [ev for _t, ev in reader.arrivals]
        assert [e.type for e in events] == ["start", *["message"] * tokens, "metrics", "message"]
        assert "error" not in [e.type for e in events]
        assert events[-1].data == "[DONE]"
        assert text_of(events) == "".join(token_text(i) for i in range(tokens))
        assert json.loads(events[-2].data)["tokens"] == tokens
        assert bytes(client.raw).endswith(b"\r\n0\r\n\r\n")
        assert await wait_exit(proc) == 0


async def test_sigterm_stops_accepting_and_closes_idle_connections() -> None:
    with server_process("--shutdown-grace-s", "2") as (proc, port):
        idle = await RawClient.connect(port)
        client, resp, reader = await open_stream(port, "/v1/stream?tokens=1000000&interval_ms=50")
        async with idle, client:
            assert resp.status == 200
            await reader.next()
            proc.send_signal(signal.SIGTERM)
            # The idle connection is closed at once (well inside the 2 s grace period).
            started = time.monotonic()
            assert await idle.closed_by_server(1.5)
            assert time.monotonic() - started < 1.5
            # New connections are refused, or answered 503 and closed.
            refused_or_503 = False
            try:
                late = await RawClient.connect(port, within=2.0)
            except (ConnectionError, OSError):
                refused_or_503 = True
            else:
                async with late:
                    late.request("GET", "/healthz")
                    try:
                        late_resp = await late.response(within=3.0)
                    except (AssertionError, ConnectionError):
                        refused_or_503 = True  # closed without a response
                    else:
                        refused_or_503 = late_resp.status == 503
                        assert late_resp.header("retry-after") is not None
            assert refused_or_503
            await reader.rest(within=10)
            assert bytes(client.raw).endswith(b"\r\n0\r\n\r\n")
        assert await wait_exit(proc) == 0


async def test_sigterm_with_http10_stream_closes_cleanly() -> None:
    """An HTTP/1.0 stream (close-delimited) ends by closing after its last event."""
    with server_process("--shutdown-grace-s", "0.3") as (proc, port):
        client, resp, reader = await open_stream(
            port, "/v1/stream?tokens=1000000&interval_ms=50", version="1.0"
        )
        async with client:
            assert resp.status == 200
            await reader.until(lambda r: len(r.arrivals) >= 2)
            proc.send_signal(signal.SIGTERM)
            await reader.rest(within=10)
            assert client.eof
        assert isinstance(reader, SSEReader)
        assert not reader.parser.pending, "the body was cut inside an event"
        assert reader.arrivals[-1][1].data == "[DONE]"
        assert await wait_exit(proc) == 0
