"""The app-facing side of one request: a plain response, or an event stream.

``EventStream`` writes straight to the transport (``transport.write`` is synchronous, so
frames written from the loop never interleave and no lock is needed). Heartbeats for all
streams come from ONE shared ``StreamRegistry`` tick (``heartbeat.py``).

Slow readers (SPEC §5): the transport pauses writing past ``write_buffer_bytes``. A
producer that owns its stream (one LLM answer) awaits ``drain()`` and so throttles the
upstream; a stream fed by fan-out (``on_full="drop"``) is disconnected instead, after a
final comment, so it never holds the other subscribers back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Literal, Protocol

from ..wire.chunked import Frame, frame
from ..wire.errors import error_body
from ..wire.sse import encode_comment, encode_event, encode_retry
from .flow import FlowControl
from .heartbeat import StreamRegistry
from .request import HeaderList, Request

OnFull = Literal["wait", "drop"]


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
        self.state: Literal["new", "streaming", "done", "lost", "hijacked"] = "new"
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
        head.extend(_encoded(headers))
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
        head.extend(_encoded(headers))
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

    def when_drained(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the client has caught up (or left)."""
        self._channel.flow.when_drained(callback)

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

    def hijack(self) -> asyncio.WriteTransport | None:
        """Take the connection over for this response, as Go's ``http.Hijacker`` does: no
        head nor framing is written for it, the caller writes every byte (and may await
        ``drain()``), and the connection closes when the handler returns. None when the
        client has already gone. Raises RuntimeError once the response has started."""
        if self.state != "new":
            raise RuntimeError("the response has already started")
        self.state = "hijacked"
        return self._channel.transport

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


def _encoded(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header values as UTF-8 (an event id, echoed in a header, may be any text; latin-1
    would fail on it), names as the ASCII they are."""
    return [(k.encode("ascii"), v.encode("utf-8")) for k, v in headers]
