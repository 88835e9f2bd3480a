"""A small loopback client for protocol tests: raw requests written by hand, every answer
parsed by h11 as an oracle (so a framing mistake of the server fails the test), SSE
bodies parsed by the WHATWG parser of ``tests.support.sse_parser``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any

import h11

from tests.support.rawhttp import Loopback, Response
from tests.support.sse_parser import Event, SSEParser


class Client(Loopback):
    """Requests by method and target, answers as ``Response``; SSE events of a body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.parser = SSEParser()
        self.ended = False

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> Client:
        sock = None
        if rcvbuf is not None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send_raw(self, head: bytes, method: str = "GET", target: str = "/") -> None:
        self.writer.write(head)
        self.expect(method, target)

    def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.send_raw(head, method, target)

    async def _event(self, within: float) -> Any:
        async with asyncio.timeout(within):
            while True:
                event = self.oracle.next_event()
                if event is not h11.NEED_DATA:
                    return event
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    data = b""
                self.oracle.receive_data(data)

    async def head(self, within: float = 5.0) -> Response:
        event = await self._event(within)
        assert isinstance(event, h11.Response), event
        return Response(event.status_code, event.http_version, list(event.headers))

    async def body(self, within: float = 5.0) -> bytes:
        out = bytearray()
        while True:
            event = await self._event(within)
            if isinstance(event, h11.EndOfMessage):
                self.ended = True
                return bytes(out)
            assert isinstance(event, h11.Data), event
            out += event.data

    async def response(self, within: float = 5.0) -> Response:
        resp = await self.head(within)
        resp.body = await self.body(within)
        return resp

    async def next_event(self, within: float = 5.0) -> Event:
        """The next SSE event of the current (streaming) body."""
        async with asyncio.timeout(within):
            while not self.parser.events:
                assert not self.ended, "the stream ended"
                event = await self._event(within)
                if isinstance(event, h11.EndOfMessage):
                    self.ended = True
                else:
                    assert isinstance(event, h11.Data), event
                    self.parser.feed(event.data)
            return self.parser.events.pop(0)

    async def rest(self, within: float = 10.0) -> list[Event]:
        body = await self.body(within)
        self.parser.feed(body)
        out, self.parser.events = list(self.parser.events), []
        return out


async def fetch(
    port: int,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    method: str = "GET",
    body: bytes = b"",
) -> Response:
    async with await Client.open(port) as client:
        client.send(method, target, headers, body)
        return await client.response(10)
