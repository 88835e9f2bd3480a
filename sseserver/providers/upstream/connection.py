"""One HTTP/1.1 connection to an upstream, as an asyncio ``Protocol``: a request written,
its response head parsed, its body handed on piece by piece as the network delivers it.

A reader that falls behind pauses the socket (the upstream then slows down by TCP's own
flow control), so a paused browser still throttles its upstream. ``last_io`` is read by
the client's one shared watchdog, which enforces every timeout: no timer per connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Protocol

from .parse import MAX_HEAD_BYTES, BodyReader, Head, ResponseError, parse_head

HIGH_WATER = 256 * 1024  # body bytes read but not yet taken: pause the socket above this
LOW_WATER = 64 * 1024  # ... and resume below this
# The kernel's receive buffer per upstream socket. Linux grows it by itself up to
# ``tcp_rmem``'s maximum (32 MB on many hosts): an answer held for a paused reader would
# pile up there, unseen, before the upstream felt it. A model's stream needs far less.
RECEIVE_BUFFER = 256 * 1024


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class UpstreamTimedOut(TimeoutError):
    """No byte from the upstream within the timeout (connect, first byte, or between)."""


class BodyConsumer(Protocol):
    """Takes a body pushed from the socket's reads (``Connection.deliver_to``)."""

    def body_piece(self, piece: bytes) -> None: ...

    def body_end(self, error: BaseException | None) -> None:
        """The body is complete (None) or was cut short; called once."""
        ...


class Connection(asyncio.Protocol):
    """An exchange at a time: ``send`` a request, await ``head()``, then either pull the
    body (``piece()`` until None) or have it pushed (``deliver_to``). Reusable
    (``reusable``) once a body was read to its end on a keep-alive connection with
    nothing past it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_io = loop.time()
        self.busy = False  # an exchange is under way: the watchdog times it
        self._head_buf = bytearray()
        self._head: Head | None = None
        self._body: BodyReader | None = None
        self._method = "GET"
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._ended = False  # the body is complete
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._extra = False  # bytes arrived past the body's end
        self._consumer: BodyConsumer | None = None  # the body is pushed to it
        self.held = False  # its reader paused it: silence is ours, not the upstream's

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError:
                pass  # not a socket that takes it: the kernel's default stays

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        try:
            if self._body is None:
                self._read_head(data)
            else:
                self._read_body(data)
        except ResponseError as exc:
            self._fail(exc)
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        body = self._body
        if body is not None and body.until_close and not self._ended:
            self._ended = True  # the close is the end of such a body
            self._wake()
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                consumer.body_end(None)
            return
        if not self._ended:
            self._fail(UpstreamClosed("upstream closed the connection"))

    # -- one exchange --------------------------------------------------------------------

    def send(self, request: bytes, method: str) -> None:
        """Write a request (head and body in one buffer) and start reading its answer."""
        assert self.transport is not None and not self.busy
        self.busy = True
        self._method = method
        self._head_buf.clear()
        self._head = self._body = None
        self._pieces.clear()
        self._buffered = 0
        self._ended = self._extra = False
        self._error = None
        self.last_io = self.loop.time()
        self.transport.write(request)

    async def head(self) -> Head:
        """The response head (1xx answers skipped).

        Raises:
            UpstreamClosed, UpstreamTimedOut, ResponseError, OSError.
        """
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def piece(self) -> bytes | None:
        """The next piece of the body as it arrived, None at its end.

        Raises:
            UpstreamClosed, UpstreamTimedOut, ResponseError: cut short or malformed.
        """
        while True:
            pieces = self._pieces
            if pieces:
                piece = pieces.popleft()
                self._buffered -= len(piece)
                if self._paused and self._buffered < LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return piece
            if self._ended:
                self.busy = False
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    def deliver_to(self, consumer: BodyConsumer) -> None:
        """From now on, push the body to ``consumer`` from ``data_received`` (what was
        already read first, unless the connection is held): no task wakes per piece."""
        self._consumer = consumer
        if self._paused and self.transport is not None:
            self._paused = False
            if not self.held:
                self.transport.resume_reading()
        if not self.held:
            self._flush(consumer)

    def _flush(self, consumer: BodyConsumer) -> None:
        """Hand ``consumer`` what was read before it took the body, and the body's end."""
        pieces = list(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        for piece in pieces:
            consumer.body_piece(piece)
            if self._consumer is not consumer:
                return
        if self._ended:
            self.busy = False
            self._consumer = None
            consumer.body_end(None)
        elif self._error is not None:
            self._consumer = None
            consumer.body_end(self._error)

    def detach(self) -> None:
        """Push nothing more (the consumer is done with the body)."""
        self._consumer = None

    def hold(self) -> None:
        """Stop reading the socket: the upstream is throttled by TCP's flow control."""
        self.held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def unhold(self) -> None:
        if self.held:
            self.held = False
            self.last_io = self.loop.time()  # the idle timeout counts from now
            if self.transport is not None and not self._paused:
                self.transport.resume_reading()
            consumer = self._consumer
            if consumer is not None and (self._pieces or self._ended or self._error):
                self._flush(consumer)  # what was read before the consumer took the body

    @property
    def ended(self) -> bool:
        """The body has been read to its end."""
        return self._ended

    @property
    def reusable(self) -> bool:
        head = self._head
        return (
            not self.closed
            and self._ended
            and not self._pieces
            and not self._extra
            and head is not None
            and head.keep_alive
            and self._body is not None
            and not self._body.until_close
        )

    def time_out(self, what: str) -> None:
        """The watchdog's verdict: fail the exchange and close the socket."""
        self._fail(UpstreamTimedOut(what))
        self.abort()

    def abort(self) -> None:
        """Close the socket now (no FIN handshake wait): what cancelling a call does."""
        self.busy = False
        self._consumer = None
        transport = self.transport
        if transport is not None:
            transport.abort()

    # -- internals -------------------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._ended:
            self._error = exc
        self._wake()
        consumer, self._consumer = self._consumer, None
        if consumer is not None and not self._ended:
            consumer.body_end(exc)

    def _read_head(self, data: bytes) -> None:
        buf = self._head_buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise ResponseError("response head too large")
                return
            head = parse_head(bytes(buf[:end]))
            rest = bytes(buf[end + 4 :])
            del buf[:]
            if 100 <= head.status < 200 and head.status != 101:
                buf += rest  # an interim answer (100 Continue, 103 Early Hints): skip it
                continue
            self._head = head
            self._body = BodyReader(head, method=self._method)
            self._ended = self._body.done
            self._wake()
            if rest:
                self._read_body(rest)
            return

    def _read_body(self, data: bytes) -> None:
        body = self._body
        assert body is not None
        if self._ended:
            self._extra = True
            return
        pieces, extra = body.feed(data)
        consumer = self._consumer
        if consumer is not None:
            if body.done:
                self._ended = True
                self._extra = bool(extra)
                self.busy = False
            for piece in pieces:
                consumer.body_piece(piece)
                if self._consumer is not consumer:
                    return  # let go mid-read (cancelled, or done with the answer)
            if body.done:
                self._consumer = None
                consumer.body_end(None)
            return
        if pieces:
            self._pieces.extend(pieces)
            self._buffered += sum(map(len, pieces))
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        if body.done:
            self._ended = True
            self._extra = bool(extra)
        self._wake()


class TunnelHandshake(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT``; the TLS layer replaces it on success."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[Head] = loop.create_future()
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                self.answer.set_exception(ResponseError("proxy answer too large"))
            return
        try:
            head = parse_head(bytes(self._buf[:end]))
        except ResponseError as exc:
            self.answer.set_exception(exc)
            return
        if end + 4 < len(self._buf):
            self.answer.set_exception(ResponseError("proxy sent bytes past its answer"))
            return
        self.answer.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(UpstreamClosed("proxy closed the connection"))
