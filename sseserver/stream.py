"""The app-facing side of one request: a plain response, or an event stream.

``EventStream`` writes straight to the transport (``transport.write`` is synchronous, so
frames written from the loop never interleave and no lock is needed). Heartbeats for all
streams come from ONE shared ``StreamRegistry`` tick, never a timer per stream.

Slow readers (SPEC §5): the transport pauses writing past ``write_buffer_bytes``. A
producer that owns its stream (one LLM answer) awaits ``drain()`` and so throttles the
upstream; a stream fed by fan-out (``on_full="drop"``) is disconnected instead, after a
final comment, so it never holds the other subscribers back.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs

from .chunked import Frame, frame
from .errors import error_body
from .flow import FlowControl
from .sse import encode_comment, encode_event, encode_retry

HeaderList = list[tuple[bytes, bytes]]
OnFull = Literal["wait", "drop"]

PING = Frame.of(encode_comment("ping"))
TOKEN_EXPIRED = encode_event(
    '{"code":"token_expired","message":"access token expired","retryable":true}', event="error"
)


@lru_cache(maxsize=64)
def preamble(retry_ms: int | None) -> bytes:
    """A stream's first bytes: ``retry: <ms>``, then a comment (SPEC §4) that makes
    proxies flush the head at once. Encoded once per value."""
    opening = encode_comment("stream open")
    return encode_retry(retry_ms)[:-1] + opening if retry_ms else opening


SLOW_GOODBYE = Frame.of(encode_comment("slow consumer: disconnecting, resume with Last-Event-ID"))

STREAM_HEADERS: HeaderList = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    # nginx honours this per response: no proxy buffering of the stream.
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class Request:
    """A parsed request head plus its (size-checked) body."""

    method: str
    target: str
    path: str
    query_string: str
    headers: HeaderList
    http_version: str
    body: bytes = b""
    client: tuple[str, int] | None = None
    received_at: float = 0.0
    params: dict[str, str] = field(default_factory=dict)  # from the route's {name} parts
    claims: Any = None  # set by the auth middleware: the caller's verified JWT claims
    id: str = ""  # request id (X-Request-ID from the proxy, or generated)
    _query: dict[str, list[str]] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (lower case), decoded as latin-1."""
        key = name.encode("ascii")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        key = name.encode("ascii")
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = parse_qs(self.query_string, keep_blank_values=True)
        return self._query

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON. Raises ValueError when it is not."""
        return json.loads(self.body)

    def release(self) -> None:
        """Drop what only the handler needed (headers, body, parsed query): a stream
        that outlives its handler keeps just what its log line names. Browsers send a
        dozen headers, a kilobyte or two that thousands of idle streams would hold."""
        self.headers = []
        self.body = b""
        self._query = None


class Channel(Protocol):
    """What a stream needs of its connection (implemented by ``HTTPProtocol``)."""

    transport: asyncio.WriteTransport | None
    flow: FlowControl

    def send_head(
        self, status: int, headers: HeaderList, body: bytes = b"", preamble: bytes = b""
    ) -> bool: ...
    def end_response(self) -> None: ...
    def close_connection(self, abort: bool = False) -> None: ...


class EventStream:
    """One response: ``respond()`` for a plain body, or ``start()`` then events."""

    __slots__ = (
        "_channel",
        "_chunked",
        "_on_close",
        "_registry",
        "bytes_sent",
        "close_reason",
        "deadline",
        "deadline_reason",
        "detached",
        "extra_headers",
        "idle_ticks",
        "log",
        "on_full",
        "request",
        "state",
        "status",
    )

    def __init__(self, request: Request, channel: Channel, registry: StreamRegistry) -> None:
        self.request = request
        self._channel = channel
        self._registry = registry
        self._chunked = False
        self._on_close: list[Callable[[EventStream], None]] | None = None
        self.state: Literal["new", "streaming", "done", "lost"] = "new"
        self.status = 0
        self.bytes_sent = 0
        self.idle_ticks = 0
        self.close_reason = ""
        self.deadline = 0.0  # monotonic time the stream must end by (0: never)
        self.deadline_reason = "max_duration"
        self.extra_headers: HeaderList = []  # added to whichever head is sent (CORS, ids)
        self.detached = False
        self.on_full: OnFull = "wait"
        self.log: dict[str, Any] = {}

    # -- plain responses -------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.state != "new"

    @property
    def open(self) -> bool:
        """True while events can still be written."""
        return self.state == "streaming"

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        content_type: str | None = "application/json",
    ) -> None:
        """A complete response with a Content-Length (HEAD gets the head only)."""
        if self.state != "new":
            return
        head: HeaderList = []
        if content_type is not None:
            head.append((b"content-type", content_type.encode("latin-1")))
        head.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        head.extend(self.extra_headers)
        if status not in (204, 304):  # RFC 9110 §8.6: no Content-Length on a 204
            head.append((b"content-length", str(len(body)).encode()))
        self.status = status
        self.state = "done"
        if self.request.method == "HEAD":
            body = b""
        self._channel.send_head(status, head, body)
        self.bytes_sent += len(body)
        self._channel.end_response()

    def respond_json(
        self, status: int, obj: object, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.respond(status, json.dumps(obj, separators=(",", ":")).encode(), headers)

    def respond_error(
        self, status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.close_reason = code
        self.respond(status, error_body(code, message), headers)

    # -- event streams ---------------------------------------------------------------

    def start(
        self,
        headers: Iterable[tuple[str, str]] = (),
        *,
        retry_ms: int | None = None,
        status: int = 200,
    ) -> bool:
        """Send the stream's head, then ``retry:`` and a comment so that proxies flush the
        headers at once. Returns False when no body follows (HEAD, or the client left)."""
        if self.state != "new":
            return self.state == "streaming"
        head = [*STREAM_HEADERS, (b"connection", b"keep-alive")]
        head.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        head.extend(self.extra_headers)
        self.status = status
        if self.request.method == "HEAD":
            self._channel.send_head(status, head)
            self.state = "done"
            self._channel.end_response()
            return False
        first = preamble(retry_ms)
        self._chunked = self._channel.send_head(status, head, preamble=first)
        self.extra_headers = []  # sent; a long-lived stream need not hold them
        if self._channel.transport is None:
            self.state = "done"
            self._channel.end_response()
            return False
        self.state = "streaming"
        self.bytes_sent += len(first)
        self._registry.add(self)
        limit = self._registry.deadline()
        if limit and (not self.deadline or limit < self.deadline):
            self.deadline, self.deadline_reason = limit, "max_duration"
        return True

    def write(self, payload: bytes) -> None:
        """Write one already SSE-encoded payload to this connection."""
        transport = self._channel.transport
        if self.state != "streaming" or transport is None:
            return
        transport.write(frame(payload) if self._chunked else payload)
        self.bytes_sent += len(payload)
        self.idle_ticks = 0

    def send(
        self,
        data: str | None = None,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
    ) -> None:
        """Encode and write one event. Raises ValueError for an invalid id or event name."""
        self.write(encode_event(data, event=event, id=id, retry=retry))

    def write_frame(self, f: Frame) -> bool:
        """Write a frame shared with other connections (fan-out). Returns False if the
        stream is (now) closed; with ``on_full="drop"`` a reader that is behind is cut."""
        if self.state != "streaming":
            return False
        channel = self._channel
        if channel.flow.paused and self.on_full == "drop":
            self.drop_slow()
            return False
        transport = channel.transport
        if transport is None:
            return False
        transport.write(f.chunked if self._chunked else f.raw)
        self.bytes_sent += f.size
        self.idle_ticks = 0
        return True

    @property
    def paused(self) -> bool:
        """True while the client is behind (its buffer is over the bound)."""
        return self._channel.flow.paused

    async def drain(self) -> None:
        """Wait while the client is behind. Raises ClientGone when it has left."""
        await self._channel.flow.drain()

    def drop_slow(self) -> None:
        """Disconnect a reader that fell behind its buffer bound (hub policy, §5)."""
        if self.state != "streaming":
            return
        transport = self._channel.transport
        if transport is not None:
            transport.write(SLOW_GOODBYE.chunked if self._chunked else SLOW_GOODBYE.raw)
        self._finish("slow_client", terminate=False)
        self._registry.linger(self)
        self._channel.close_connection()

    def finish(self, reason: str = "complete") -> None:
        """End the body cleanly (chunked terminator or close for HTTP/1.0)."""
        if self.state == "streaming":
            self._finish(reason, terminate=True)

    def close(self, reason: str = "complete") -> None:
        """End the body and close the connection, so the client reconnects (elsewhere)."""
        if self.state == "streaming":
            self._finish(reason, terminate=True)
            self._channel.close_connection()

    def abort_connection(self) -> None:
        self._channel.close_connection(abort=True)

    def on_close(self, callback: Callable[[EventStream], None]) -> None:
        """Call ``callback(stream)`` once when the stream ends, whatever the reason."""
        if self.state in ("done", "lost"):
            callback(self)
            return
        if self._on_close is None:
            self._on_close = []
        self._on_close.append(callback)

    def _finish(self, reason: str, *, terminate: bool) -> None:
        self.state = "done"
        if not self.close_reason:
            self.close_reason = reason
        self._registry.discard(self)
        if terminate:
            self._channel.end_response()
        self._run_close_callbacks()

    def connection_lost(self) -> None:
        """Called by the connection when the peer is gone."""
        if self.state in ("new", "streaming"):
            self.state = "lost"
            if not self.close_reason:
                self.close_reason = "client_disconnect"
            self._registry.discard(self)
            self._run_close_callbacks()

    def _run_close_callbacks(self) -> None:
        callbacks, self._on_close = self._on_close, None
        for callback in callbacks or ():
            callback(self)


class StreamRegistry:
    """All open streams of one server, and the one shared timer that pings idle ones.

    The tick runs several times per heartbeat interval; each stream counts ticks since its
    last write (an int store on the hot path, no clock read), and gets ``: ping`` once it
    has been idle for a whole interval.
    """

    TICKS_PER_HEARTBEAT = 5
    LINGER_S = 2.0  # time a dropped slow reader gets to take its last comment

    def __init__(
        self, heartbeat_s: float, *, max_stream_s: float = 0.0, retry_ms: int = 2000
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.max_stream_s = max_stream_s
        self.retry_ms = retry_ms
        self.streams: set[EventStream] = set()
        self._lingering: list[tuple[float, EventStream]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pings_sent = 0
        self.ticks = 0
        self.on_tick: Callable[[], None] | None = None
        # Told of each stream opening (+1) and ending (-1): gauges true at any moment.
        self.on_count: Callable[[EventStream, int], None] | None = None

    def add(self, stream: EventStream) -> None:
        self.streams.add(stream)
        if self.on_count is not None:
            self.on_count(stream, 1)

    def discard(self, stream: EventStream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
            if self.on_count is not None:
                self.on_count(stream, -1)

    def deadline(self) -> float:
        """When a stream opened now must end: ``max_stream_s`` less up to 10 %, at random,
        so that a fleet of clients does not reconnect all at once."""
        if self.max_stream_s <= 0:
            return 0.0
        return time.monotonic() + self.max_stream_s * random.uniform(0.9, 1.0)

    def linger(self, stream: EventStream) -> None:
        self._lingering.append((time.monotonic() + self.LINGER_S, stream))

    @property
    def tick_s(self) -> float:
        return self.heartbeat_s / self.TICKS_PER_HEARTBEAT

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        self.ticks += 1
        due = self.TICKS_PER_HEARTBEAT
        now = time.monotonic()
        for stream in list(self.streams):
            if stream.deadline and stream.deadline <= now:
                self._expire(stream)
                continue
            stream.idle_ticks += 1
            if stream.idle_ticks >= due:
                if stream.write_frame(PING):
                    self.pings_sent += 1
        if self.on_tick is not None:
            self.on_tick()
        if self._lingering:
            keep = []
            for deadline, stream in self._lingering:
                if deadline <= now:
                    stream.abort_connection()
                else:
                    keep.append((deadline, stream))
            self._lingering = keep
        self._schedule()

    def _expire(self, stream: EventStream) -> None:
        if stream.deadline_reason == "token_expired":
            stream.write(TOKEN_EXPIRED)
        else:
            # Maximum life reached: end cleanly and tell the client when to come back.
            stream.write(encode_retry(self.retry_ms))
        stream.close(stream.deadline_reason)

    def broadcast(self, payload: bytes) -> None:
        """Write the same payload to every open stream (framed once)."""
        f = Frame.of(payload)
        for stream in list(self.streams):
            stream.write_frame(f)

    def close_all(self, reason: str) -> None:
        for stream in list(self.streams):
            stream.close(reason)
