"""Real nginx in front of a real sseserver process (SPEC §3, §10, §11).

Two nginx configurations:
- ``bare``: one ``proxy_pass`` and nginx's defaults, i.e. HTTP/1.0 to the upstream with
  ``Connection: close`` and ``proxy_buffering on``. Streams must still flow event by
  event (the server's ``X-Accel-Buffering: no`` turns buffering off per response) and
  end by the server closing the connection (no chunked encoding over HTTP/1.0);
- ``deploy``: ``deploy/nginx.conf`` itself, with only its upstream address, listen
  address and log folder rewritten; upstream keep-alive must then carry one stream after
  another on the same connection.

In both, a browser that goes away mid-stream must stop the generation on the server.
The client side is raw asyncio streams; nothing here trusts an HTTP library's framing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sseserver.providers.synthetic import token_text
from tests.support.chunks import ChunkedDecoder
from tests.support.logtail import LogTail
from tests.support.nginx import Nginx, bare_proxy_config, deploy_config, nginx_running
from tests.support.procfs import TCP_ESTABLISHED, tcp_sockets
from tests.support.procs import server_process
from tests.support.sse_parser import Event, SSEParser

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONFIGS = ("bare", "deploy")

# 20 tokens 100 ms apart: token i is due at i * 0.1 s, the stream lasts ~1.9 s.
TOKENS, INTERVAL_S = 20, 0.1
STREAM_PATH = f"/v1/stream?tokens={TOKENS}&interval_ms={int(INTERVAL_S * 1000)}"
# How late a token may reach the client, through nginx, after it was due. Buffering
# anywhere on the way would hold tokens for the whole stream (~2 s) instead.
MAX_LATENESS_S = 0.5


# -- the sseserver process and its log ---------------------------------------------------


def of_generation(gen: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the access log record of a stream of generation ``gen``."""
    return lambda record: record.get("generation") == gen


@dataclass
class Upstream:
    port: int
    log: LogTail


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with server_process("--log-format", "json", "--shutdown-grace-s", "1") as (proc, port):
        assert proc.stdout is not None
        yield Upstream(port, LogTail(proc.stdout))


def start_nginx(kind: str, tmp_path: Path, upstream_port: int) -> AbstractContextManager[Nginx]:
    prefix = tmp_path / f"nginx-{kind}"
    if kind == "bare":
        return nginx_running(prefix, lambda port: bare_proxy_config(port, upstream_port))
    logs = prefix / "logs"
    return nginx_running(prefix, lambda port: deploy_config(port, upstream_port, logs))


# -- a raw HTTP/1.1 client that timestamps every event ----------------------------------


@dataclass
class Timed:
    at: float  # seconds since the request was sent
    event: Event


@dataclass
class StreamResponse:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent_at: float
    status: int
    headers: dict[str, str]
    parser: SSEParser = field(default_factory=SSEParser)
    body: bytearray = field(default_factory=bytearray)
    events: list[Timed] = field(default_factory=list)
    ended_at: float | None = None  # when the body's end (terminator or EOF) arrived
    clean_end: bool = False  # a chunked body ended with its terminator (not a bare EOF)
    _chunked: ChunkedDecoder | None = None

    async def read_some(self) -> bool:
        """Read what has arrived; False at the end of the body."""
        if self.ended_at is not None:
            return False
        data = await self.reader.read(65536)
        now = time.monotonic() - self.sent_at
        if not data:
            self.ended_at = now
            self.parser.feed_eof()
            return False
        if self._chunked is not None:
            payload = self._chunked.feed(data)
        else:
            payload = data
        self.body += payload
        self.events.extend(Timed(now, e) for e in self.parser.feed(payload))
        if self._chunked is not None and self._chunked.done:
            self.ended_at = now
            self.clean_end = True
            self.parser.feed_eof()
            return False
        return True

    async def read_until(self, predicate: Callable[[Event], bool], within_s: float) -> Event:
        async with asyncio.timeout(within_s):
            while True:
                for timed in self.events:
                    if predicate(timed.event):
                        return timed.event
                if not await self.read_some():
                    raise AssertionError(f"body ended before the expected event; got {self.body!r}")

    async def read_to_end(self, within_s: float) -> None:
        async with asyncio.timeout(within_s):
            while await self.read_some():
                pass

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def open_stream(port: int, target: str, within_s: float = 10.0) -> StreamResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent_at = time.monotonic()
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
        f"Connection: close\r\n\r\n".encode()
    )
    async with asyncio.timeout(within_s):
        head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    response = StreamResponse(reader, writer, sent_at, status, headers)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        response._chunked = ChunkedDecoder()
    return response


def assert_sse_lines(body: bytes) -> None:
    """Every line is an SSE field or comment: no chunk-size line or other framing leaked
    into the event stream (a parser would silently ignore such lines)."""
    text = body.decode("utf-8")
    for line in text.replace("\r\n", "\n").split("\n"):
        assert line == "" or line.startswith((":", "data:", "id:", "event:", "retry:")), (
            f"not an SSE line: {line!r} in body {text[:500]!r}"
        )


def check_token_stream(
    response: StreamResponse, tokens: int = TOKENS, interval_s: float = INTERVAL_S
) -> str:
    """The complete stream as SPEC §6 has it, each token on time; returns the
    generation id."""
    assert response.status == 200, response.headers
    assert response.headers.get("content-type", "").startswith("text/event-stream")
    assert response.ended_at is not None
    assert response.clean_end, "the body to the client did not end with the chunked terminator"
    assert_sse_lines(bytes(response.body))
    events = [t.event for t in response.events]
    types = [e.type for e in events]
    assert types == ["start"] + ["message"] * tokens + ["metrics", "message"], types
    start = json.loads(events[0].data)
    gen = start["id"]
    assert [e.last_event_id for e in events] == [f"{gen}:{seq}" for seq in range(len(events))]
    texts = [json.loads(e.data)["text"] for e in events[1 : 1 + tokens]]
    assert texts == [token_text(i) for i in range(tokens)]
    assert json.loads(events[-2].data)["tokens"] == tokens
    assert events[-1].data == "[DONE]"

    token_times = [t.at for t in response.events[1 : 1 + tokens]]
    timing = ", ".join(f"{t:.3f}" for t in token_times)
    # The first token arrives at once, not when the stream ends...
    assert token_times[0] < 1.0, f"first token only after {token_times[0]:.3f}s: {timing}"
    assert response.ended_at >= (tokens - 1) * interval_s * 0.95, response.ended_at
    # ...and so does every other one: each within MAX_LATENESS_S of when it was due.
    for i, at in enumerate(token_times):
        assert at <= i * interval_s + MAX_LATENESS_S, (
            f"token {i} due at {i * interval_s:.1f}s arrived at {at:.3f}s "
            f"(held back by a buffer?): {timing}"
        )
    return str(gen)


# -- /proc/net/tcp: nginx's connections to the upstream ---------------------------------


def upstream_connections(upstream_port: int) -> set[int]:
    """Local ports of ESTABLISHED loopback TCP connections whose peer is
    ``upstream_port`` (the nginx side of nginx → sseserver connections)."""
    return {
        local
        for local, remote, state, _inode in tcp_sockets()
        if state == TCP_ESTABLISHED and remote == upstream_port
    }


async def wait_connections(
    upstream_port: int, predicate: Callable[[set[int]], bool], within_s: float = 2.0
) -> set[int]:
    deadline = time.monotonic() + within_s
    while True:
        ports = upstream_connections(upstream_port)
        if predicate(ports) or time.monotonic() >= deadline:
            return ports
        await asyncio.sleep(0.02)


# -- the tests -------------------------------------------------------------------------


async def test_bare_proxy_pass_streams_event_by_event(upstream: Upstream, tmp_path: Path) -> None:
    """nginx's defaults (HTTP/1.0 upstream, proxy_buffering on): the stream still flows
    token by token, ends with [DONE], and the server ends it by closing the connection."""
    with start_nginx("bare", tmp_path, upstream.port) as nx:
        response = await open_stream(nx.port, STREAM_PATH)
        try:
            await response.read_to_end(within_s=15)
        finally:
            await response.close()
        gen = check_token_stream(response)
        record = await upstream.log.arrival(of_generation(gen), 2.0)
        assert record is not None, f"no access log line for {gen}:\n{upstream.log.text()}"
        assert record.get("status") == 200 and record.get("reason") == "complete", record
        # HTTP/1.0 to the upstream: the body was delimited by closing the connection.
        left = await wait_connections(upstream.port, lambda ports: not ports)
        assert not left, f"an HTTP/1.0 stream left upstream connections open: {left}"
        assert "[alert]" not in nx.log() and "[emerg]" not in nx.log(), nx.log()


async def test_deploy_config_streams_and_keeps_upstream_alive(
    upstream: Upstream, tmp_path: Path
) -> None:
    """deploy/nginx.conf: token by token, and two sequential streams share one upstream
    keep-alive connection."""
    with start_nginx("deploy", tmp_path, upstream.port) as nx:
        assert not upstream_connections(upstream.port)
        first = await open_stream(nx.port, STREAM_PATH)
        try:
            await first.read_to_end(within_s=15)
        finally:
            await first.close()
        gen1 = check_token_stream(first)
        idle = await wait_connections(upstream.port, lambda ports: len(ports) == 1)
        assert len(idle) == 1, f"expected one idle keep-alive upstream connection: {idle}"

        second = await open_stream(nx.port, STREAM_PATH)
        try:
            await second.read_until(lambda e: e.type == "start", within_s=5)
            during = upstream_connections(upstream.port)
            await second.read_to_end(within_s=15)
        finally:
            await second.close()
        gen2 = check_token_stream(second)
        assert gen1 != gen2
        assert during == idle, (
            f"the second stream did not reuse the keep-alive connection {idle}: {during}"
        )
        after = await wait_connections(upstream.port, lambda ports: ports == idle)
        assert after == idle, f"keep-alive connection not kept after the 2nd stream: {after}"

        for gen in (gen1, gen2):
            record = await upstream.log.arrival(of_generation(gen), 2.0)
            assert record is not None and record.get("reason") == "complete", (
                f"{gen}: {record}\n{upstream.log.text()}"
            )
        access = (nx.prefix / "logs" / "sseserver.access.log").read_text()
        assert access.count('"GET /v1/stream?') == 2 and " 200 " in access, access
        assert "[alert]" not in nx.log() and "[emerg]" not in nx.log(), nx.log()


@pytest.mark.parametrize("kind", CONFIGS)
async def test_client_disconnect_through_nginx_stops_generation(
    kind: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A browser that leaves mid-stream (through nginx) ends the generation at once:
    the server logs the disconnect, and the generation's replay, read directly from
    sseserver, ends with ``event: error`` code ``abandoned`` and [DONE]."""
    with start_nginx(kind, tmp_path, upstream.port) as nx:
        response = await open_stream(nx.port, "/v1/stream?tokens=1000&interval_ms=50")
        try:
            start = await response.read_until(lambda e: e.type == "start", within_s=5)
            gen = json.loads(start.data)["id"]
            # Make sure tokens are flowing through nginx before leaving.
            await response.read_until(
                lambda e: e.type == "message" and e.last_event_id == f"{gen}:3", within_s=5
            )
        finally:
            await response.close()
        closed_at = time.monotonic()

        record = await upstream.log.arrival(of_generation(gen), 2.0)
        assert record is not None, (
            f"sseserver logged no end of stream {gen} within 2 s of the client leaving "
            f"through nginx ({kind}).\nserver log:\n{upstream.log.text()}\n"
            f"nginx log:\n{nx.log()}"
        )
        reason = str(record.get("reason") or "")
        assert "disconnect" in reason, f"access log reason is not a disconnect: {record}"

        # Read the generation directly from sseserver, bypassing nginx. Had it not
        # ended, this viewer would keep it alive and the body would not end.
        replay = await open_stream(upstream.port, f"/v1/streams/{gen}")
        try:
            await replay.read_to_end(within_s=2.0)
        except TimeoutError:
            tail = [t.event for t in replay.events[-3:]]
            raise AssertionError(
                f"generation {gen} still running after the client left through nginx "
                f"({kind}): the replay did not end within 2 s; last events {tail}"
            ) from None
        finally:
            await replay.close()
        ended_within = time.monotonic() - closed_at
        assert replay.status == 200
        events = [t.event for t in replay.events]
        types = [e.type for e in events]
        assert types[0] == "start" and types[-3:] == ["error", "metrics", "message"], types
        error = json.loads(events[-3].data)
        assert error["code"] == "abandoned", error
        assert events[-1].data == "[DONE]"
        produced = json.loads(events[-2].data)["tokens"]
        # At least the 3 tokens read above; far from the 1000 (50 s) asked for.
        assert 3 <= produced < 100, f"{produced} tokens produced of 1000"
        assert ended_within < 4.0, ended_within
