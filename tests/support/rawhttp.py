"""Raw HTTP/1.1 over loopback sockets for protocol tests, with h11 as the response oracle.

The client writes request bytes exactly as given (so tests can send malformed, HTTP/1.0,
pipelined or slowloris requests) and parses what comes back with
``h11.Connection(h11.CLIENT)``: if h11 accepts the server's bytes, a real HTTP client will.
Every received byte is also kept in ``raw`` so that tests can check the chunk framing
themselves (h11 hides it; ``tests.support.chunks`` decodes it).

Also here: reading an event-stream response (``SSEReader``, ``open_stream``,
``start_generation``) and a bare read until a marker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import h11

from tests.support.sse_parser import Event, SSEParser

HOST = "127.0.0.1"
READ_SIZE = 65536


# -- responses ---------------------------------------------------------------------------


@dataclass
class Response:
    """One response as h11 parsed it."""

    status: int
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    names = set()
    for name, value in headers:
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    if "host" not in names and version == "1.1":
        lines.append("Host: 127.0.0.1")
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the client --------------------------------------------------------------------------


class Loopback:
    """One test TCP connection with an h11 client as the oracle of what comes back;
    closed (bounded) on leaving its ``async with``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.oracle = h11.Connection(h11.CLIENT)

    def expect(self, method: str = "GET", target: str = "/") -> None:
        """Tell the oracle which request the next response answers (it writes nothing:
        the bytes on the wire are whatever the test wrote)."""
        oracle = self.oracle
        if oracle.our_state is h11.DONE and oracle.their_state is h11.DONE:
            oracle.start_next_cycle()
        oracle.send(h11.Request(method=method, target=target, headers=[("Host", HOST)]))
        oracle.send(h11.EndOfMessage())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(2.0):
                await self.writer.wait_closed()
        except (ConnectionError, OSError, TimeoutError):
            pass


class RawClient(Loopback):
    """One TCP connection: raw writes, h11-checked reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.raw = bytearray()  # every byte received, in order
        self.eof = False

    @classmethod
    async def connect(cls, port: int, within: float = 5.0) -> RawClient:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    # writing

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "1.1",
    ) -> None:
        self.write(build_request(method, target, headers, body, version))
        self.expect(method, target)

    # reading

    async def recv(self, within: float = 5.0) -> bytes:
        """The next bytes from the socket (b"" at EOF); also fed to the oracle."""
        async with asyncio.timeout(within):
            try:
                data = await self.reader.read(READ_SIZE)
            except ConnectionError:  # reset: the server closed with unread data
                data = b""
        if data:
            self.raw += data
        else:
            self.eof = True
        self.oracle.receive_data(data)
        return data

    async def next_event(self, within: float = 5.0) -> Any:
        """The oracle's next event, reading from the socket as needed."""
        deadline = time.monotonic() + within
        while True:
            event = self.oracle.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.eof:
                raise AssertionError("connection closed before the response was complete")
            await self.recv(max(0.0, deadline - time.monotonic()))

    async def head(self, within: float = 5.0) -> Response:
        event = await self.next_event(within)
        while isinstance(event, h11.InformationalResponse):
            event = await self.next_event(within)
        assert isinstance(event, h11.Response), f"expected a response head, got {event!r}"
        return Response(event.status_code, event.http_version, list(event.headers))

    async def body(self, within: float = 5.0) -> bytes:
        """The rest of the current response's body (until its end)."""
        out = bytearray()
        deadline = time.monotonic() + within
        while True:
            event = await self.next_event(max(0.0, deadline - time.monotonic()))
            if isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(out)
            else:
                raise AssertionError(f"unexpected {event!r} inside a body")

    async def response(self, within: float = 5.0) -> Response:
        deadline = time.monotonic() + within
        resp = await self.head(within)
        resp.body = await self.body(max(0.0, deadline - time.monotonic()))
        return resp

    async def read_to_eof(self, within: float = 5.0) -> bytes:
        """Read raw bytes until the server closes; returns the bytes read meanwhile."""
        out = bytearray()
        deadline = time.monotonic() + within
        while not self.eof:
            out += await self.recv(max(0.0, deadline - time.monotonic()))
        return bytes(out)

    async def closed_by_server(self, within: float = 5.0) -> bool:
        """True once the server has closed (EOF); reads and keeps what comes first."""
        try:
            await self.read_to_eof(within)
        except TimeoutError:
            return False
        return True


@dataclass
class SSEReader:
    """Reads one event-stream response from a ``RawClient`` (after its head)."""

    client: RawClient
    parser: SSEParser = field(default_factory=SSEParser)
    data: bytearray = field(default_factory=bytearray)  # the de-chunked body so far
    arrivals: list[tuple[float, Event]] = field(default_factory=list)
    ended: bool = False
    _queue: list[Event] = field(default_factory=list)

    async def _pump(self, within: float) -> None:
        event = await self.client.next_event(within)
        if isinstance(event, h11.Data):
            self.data += event.data
            now = time.monotonic()
            for ev in self.parser.feed(event.data):
                self.arrivals.append((now, ev))
                self._queue.append(ev)
        elif isinstance(event, h11.EndOfMessage):
            self.ended = True
        else:
            raise AssertionError(f"unexpected {event!r} inside a stream")

    async def next(self, within: float = 5.0) -> Event:
        """The next dispatched event; fails if the stream ends first."""
        deadline = time.monotonic() + within
        while not self._queue:
            if self.ended:
                raise AssertionError("the stream ended")
            await self._pump(max(0.0, deadline - time.monotonic()))
        return self._queue.pop(0)

    async def until(self, predicate: Callable[[SSEReader], bool], within: float = 5.0) -> None:
        """Read until ``predicate(self)`` holds (or fail at the deadline / stream end)."""
        deadline = time.monotonic() + within
        while not predicate(self):
            if self.ended:
                raise AssertionError("the stream ended before the condition held")
            await self._pump(max(0.0, deadline - time.monotonic()))

    async def rest(self, within: float = 10.0) -> list[Event]:
        """Every remaining event, until the body ends."""
        deadline = time.monotonic() + within
        while not self.ended:
            await self._pump(max(0.0, deadline - time.monotonic()))
        out, self._queue = self._queue, []
        return out


async def read_until_id(reader: SSEReader, last_id: str, within: float = 10.0) -> list[Event]:
    """Read until an event with ``last_id`` has been dispatched; every event so far."""
    await reader.until(
        lambda r: bool(r.parser.events) and r.parser.events[-1].last_event_id == last_id,
        within=within,
    )
    return list(reader.parser.events)


async def open_stream(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> tuple[RawClient, Response, SSEReader]:
    """Connect, send one request, read the response head; the stream is ready to read."""
    client = await RawClient.connect(port)
    client.request(method, target, headers, body, version)
    resp = await client.head()
    return client, resp, SSEReader(client)


async def start_generation(
    port: int, target: str, headers: Iterable[tuple[str, str]] = ()
) -> tuple[RawClient, SSEReader, str]:
    """Open a generation's stream and read its ``start`` event; the generation id."""
    client, resp, reader = await open_stream(port, target, headers=headers)
    assert resp.status == 200
    start = await reader.next()
    assert start.type == "start"
    return client, reader, json.loads(start.data)["id"]


async def read_until(reader: asyncio.StreamReader, marker: bytes, limit_s: float = 10.0) -> bytes:
    """Read until ``marker`` has been seen (or EOF); returns all bytes read."""
    buf = bytearray()
    async with asyncio.timeout(limit_s):
        while marker not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
    return bytes(buf)


def text_of(events: Iterable[Event]) -> str:
    """The answer's text: the concatenated ``text`` of the default message events."""
    out = []
    for ev in events:
        if ev.type == "message" and ev.data != "[DONE]":
            out.append(json.loads(ev.data)["text"])
    return "".join(out)


def seq_of(event: Event) -> int:
    gen, _, seq = event.last_event_id.rpartition(":")
    assert gen and seq.isdigit(), f"not a {{gen}}:{{seq}} id: {event.last_event_id!r}"
    return int(seq)
