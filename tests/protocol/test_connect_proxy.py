"""The test proxy itself (``tests.support.connect_proxy``), in process over loopback: what
the TLS / proxy integration tests rely on it for — tunnels relay both ways and close
together, forwards reach the origin in origin form without the proxy's headers, refusals
(not loopback, no credentials) are answered by the proxy and recorded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.support.connect_proxy import ConnectProxy
from tests.support.rawhttp import read_until

pytestmark = pytest.mark.timeout(30)


class Origin:
    """A loopback server that keeps what each connection sent, answers ``reply`` once it
    has a whole request head, then closes (or echoes, for tunnels)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply  # None: echo every byte back until the peer closes
        self.received: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(b"")
        try:
            if self.reply is None:
                while data := await reader.read(65536):
                    got += data
                    self.received[-1] = bytes(got)
                    writer.write(data)
                    await writer.drain()
            else:
                got += await reader.readuntil(b"\r\n\r\n")
                self.received[-1] = bytes(got)
                writer.write(self.reply)
                await writer.drain()
        finally:
            writer.close()
            self.closed.set()

    async def __aenter__(self) -> Origin:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy() as running:
        yield running


@contextlib.asynccontextmanager
async def ask(
    proxy: ConnectProxy, request: bytes
) -> AsyncIterator[tuple[bytes, asyncio.StreamReader]]:
    """Send ``request`` to the proxy; its answer's head (and what came with it), and the
    reader for what follows. The connection is closed on exit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(request)
        yield await read_until(reader, b"\r\n\r\n", 5), reader
    finally:
        writer.close()
        await writer.wait_closed()


async def test_connect_tunnel_relays_both_ways_and_closes_with_the_target(
    proxy: ConnectProxy,
) -> None:
    async with Origin(reply=None) as origin:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert await read_until(reader, b"\r\n\r\n", 5) == (
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        writer.write(b"ping through the tunnel")
        assert await read_until(reader, b"tunnel", 5) == b"ping through the tunnel"
        writer.close()  # the client closes: the proxy closes the target's side too
        await writer.wait_closed()
        await asyncio.wait_for(origin.closed.wait(), 5)
    (tunnel,) = proxy.tunnels
    assert (tunnel.method, tunnel.target, tunnel.status) == (
        "CONNECT",
        f"127.0.0.1:{origin.port}",
        200,
    )
    assert tunnel.bytes_to_target == tunnel.bytes_to_client == len(b"ping through the tunnel")


async def test_forward_rewrites_to_origin_form_without_the_proxys_headers(
    proxy: ConnectProxy,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with Origin(reply=answer) as origin:
        request = (
            f"POST http://127.0.0.1:{origin.port}/v1/x?a=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{origin.port}\r\nProxy-Connection: keep-alive\r\n"
            "Proxy-Authorization: Basic eDp5\r\nContent-Length: 0\r\n\r\n"
        )
        async with ask(proxy, request.encode()) as (head, reader):
            assert head + await reader.read() == answer  # the origin's answer, then EOF
    (sent,) = origin.received
    assert (
        sent
        == (
            f"POST /v1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    (tunnel,) = proxy.tunnels
    assert (tunnel.method, tunnel.status, tunnel.bytes_to_target) == ("forward", 200, len(sent))


@pytest.mark.parametrize("target", ["10.0.0.1:443", "example.com:443", "[2001:db8::1]:443"])
async def test_targets_off_loopback_are_refused(proxy: ConnectProxy, target: str) -> None:
    async with ask(proxy, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()) as (head, reader):
        assert head.startswith(b"HTTP/1.1 403 ")
        assert await reader.read() == b""  # and closed
    (tunnel,) = proxy.tunnels
    assert (tunnel.target, tunnel.status) == (target, 403)


async def test_credentials_are_required_when_configured() -> None:
    async with ConnectProxy(require_auth="u:p") as proxy, Origin(reply=None) as origin:
        connect = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n"
        async with ask(proxy, f"{connect}\r\n".encode()) as (head, _):
            assert head.startswith(b"HTTP/1.1 407 ")
            assert b'Proxy-Authenticate: Basic realm="connect_proxy"' in head
        for credentials, status in ((b"u:wrong", b"407"), (b"u:p", b"200")):
            authorization = f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}"
            async with ask(proxy, f"{connect}{authorization}\r\n\r\n".encode()) as (head, _):
                assert head.startswith(b"HTTP/1.1 " + status + b" "), head
    assert [(t.status, t.authorized) for t in proxy.tunnels] == [
        (407, False),
        (407, False),
        (200, True),
    ]
