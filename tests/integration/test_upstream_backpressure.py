"""A client that stops reading throttles the upstream (SPEC §5, §7), on the paths that
push the upstream's bytes from its socket to the client's: ``/v1/stream`` (a generation
fed by the lean client) and the ``/v1/chat/completions`` relay.

The fake upstream counts the chunks it managed to write (it waits while its socket is
full), so "held" is seen at the upstream itself: its count stops growing far short of the
answer while the client reads nothing, the server's memory stays bounded meanwhile, and
once the client reads again every token arrives, in order, to the end.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.chunks import ChunkedDecoder
from tests.support.procfs import rss_bytes
from tests.support.redis_server import ServerProcess, sseserver_running
from tests.support.upstream_procs import UpstreamProcess, start_upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# ~130 bytes per chunk upstream, ~55 per event to the client: several times what the
# kernel's socket buffers on both hops hold (the server's send buffer to the client grows
# to 4 MB by itself), so a client reading nothing must stop the upstream far short.
TOKENS = 300_000
CLIENT_RCVBUF = 16 * 1024
STILL_S = 0.5  # the upstream's count did not move for this long: it is held
HELD_WITHIN_S = 30.0
RSS_GROWTH_BOUND = 48 * 1024 * 1024  # what the held answer may cost the server at most


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = start_upstream("openai")
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def server(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One per test, so its upstream connection is its own: the fake counts chunks per
    connection, and a pooled one would carry the previous test's."""
    folder = tmp_path_factory.mktemp("backpressure")
    args = ("--openai-base-url", upstream.base_url, "--openai-client", "lean")
    with sseserver_running(folder, *args, name="backpressure") as proc:
        yield proc


def _request(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _upstream_chunks(up: UpstreamProcess, client: httpx.AsyncClient, nonce: str) -> int:
    stats = (await client.get(f"{up.url}/_fake/stats")).json()
    found = [r for r in stats["requests"] if nonce in r["body"]]
    if not found:
        return 0
    (conn,) = [c for c in stats["connections"] if c["id"] == found[-1]["connection"]]
    return int(conn["chunks_written"])


async def _held_count(up: UpstreamProcess, nonce: str) -> int:
    """The upstream's chunk count once it has stopped moving (polling another process is
    the only way to see it; bounded by HELD_WITHIN_S)."""
    deadline = time.monotonic() + HELD_WITHIN_S
    async with httpx.AsyncClient(timeout=5.0) as client:
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = await _upstream_chunks(up, client, nonce)
            if count != last:
                last, since = count, time.monotonic()
            elif count > 0 and time.monotonic() - since >= STILL_S:
                return count
            await asyncio.sleep(0.05)
    raise AssertionError(f"the upstream never stopped writing (at {last} of {TOKENS} chunks)")


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    """The response's body, de-chunked (strictly), once its terminator has arrived."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert b"transfer-encoding: chunked" in head.lower(), head
    decoder = ChunkedDecoder()
    body = bytearray()
    while not decoder.done:
        piece = await asyncio.wait_for(reader.read(1 << 20), 30)
        assert piece, "the server closed the connection before the end"
        body += decoder.feed(piece)
    return bytes(body)


@pytest.mark.parametrize("route", ["/v1/stream", "/v1/chat/completions"])
async def test_a_client_reading_nothing_holds_the_upstream(
    route: str, server: ServerProcess, upstream: UpstreamProcess
) -> None:
    nonce = f"held{route.count('/')}{int(time.monotonic() * 1000)}"
    prompt = f"{nonce} [fake tokens={TOKENS} interval_ms=0]"
    messages = [{"role": "user", "content": prompt}]
    if route == "/v1/stream":
        body: dict[str, Any] = {"provider": "openai", "messages": messages}
    else:
        body = {"provider": "openai", "model": "gpt-4o-mini", "messages": messages, "stream": True}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        rss_before = rss_bytes(server.pid)
        writer.write(_request(route, body))
        held = await _held_count(upstream, nonce)
        assert held < TOKENS * 0.6, f"the upstream wrote {held} of {TOKENS} chunks unread"
        growth = rss_bytes(server.pid) - rss_before
        assert growth < RSS_GROWTH_BOUND, f"the server grew by {growth} B holding the answer"

        text = (await _read_to_end(reader)).decode()
    finally:
        writer.close()
    if route == "/v1/stream":
        tokens = [json.loads(m)["text"] for m in re.findall(r"^data: (\{\"text\".*)$", text, re.M)]
        assert "event: metrics" in text
    else:
        tokens = re.findall(r'"content":"(tok\d+ )"', text)
    assert tokens == [f"tok{i} " for i in range(TOKENS)], "tokens lost or out of order"
    assert text.rstrip().endswith("data: [DONE]")
