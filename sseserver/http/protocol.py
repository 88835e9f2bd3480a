"""The connection layer: one ``asyncio.Protocol`` per TCP connection, driving h11.

h11 parses every request and tracks keep-alive; it writes response heads and the chunked
terminator, while stream bodies are framed by ``chunked.frame`` (see STYLE's note).
Requests on one connection are answered strictly in order: h11 pauses after each request
until our response is complete, so pipelined requests simply wait in its buffer.

Divergences, on purpose:
- A client's half-close (EOF) ends the connection, and with it any running stream: an SSE
  reader that stops sending has gone (browsers never half-close).
- A refused connection (over ``max_connections`` or shutting down) gets a canned 503
  before its request is read, then close.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import cast
from urllib.parse import unquote, urlsplit

import h11

from ..config import Config
from ..wire import ids
from ..wire.chunked import frame
from ..wire.errors import ClientGone, HTTPError, error_body, error_event_data
from ..wire.sse import encode_event
from .flow import FlowControl
from .heartbeat import StreamRegistry
from .request import HeaderList, Request
from .stream import EventStream

App = Callable[[Request, EventStream], Awaitable[None]]

log = logging.getLogger("sseserver")
access_log = logging.getLogger("sseserver.access")

# Errors a write or close may raise once the peer has gone; they mean "connection lost",
# and connection_lost() will follow, so they are not worth a traceback.
CONNECTION_ERRORS = (ConnectionError, OSError, RuntimeError)

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


def _canned(status: int, code: str, message: str, extra: bytes = b"") -> bytes:
    body = error_body(code, message)
    return (
        b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"%bconnection: close\r\n\r\n%b" % (status, _REASONS[status], len(body), extra, body)
    )


# The headers h11 must see to frame the body and decide keep-alive; it gets only these.
FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_UNSAFE_HEADER = re.compile(rb"[\r\n\x00]")
_H11_DETAIL = re.compile(r":?\s*(?:bytearray|b)\(?b?['\"].*$", re.S)

INTERNAL_ERROR_EVENT = encode_event(
    error_event_data("internal_error", "internal server error", retryable=True), event="error"
)
OVERLOADED = _canned(503, "overloaded", "too many open connections", b"retry-after: 1\r\n")
SHUTTING_DOWN = _canned(503, "shutting_down", "server is shutting down", b"retry-after: 1\r\n")


class _DateHeader:
    """The ``Date`` header value, formatted at most once per second."""

    second = 0
    value = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = formatdate(now, usegmt=True).encode()
        return cls.value


class ServerState:
    """What all connections of one server share."""

    def __init__(self, config: Config, app: App) -> None:
        self.config = config
        self.app = app
        self.connections: set[HTTPProtocol] = set()
        self.streams = StreamRegistry(
            config.heartbeat_s, max_stream_s=config.max_stream_s, retry_ms=config.retry_ms
        )
        self.handlers: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        self.total_connections = 0
        # Observers for metrics, called once per response (never per event), and with
        # +1 / -1 as connections open and close (so a gauge is true at any moment).
        self.on_response_done: Callable[[EventStream], None] | None = None
        self.on_connections: Callable[[int], None] | None = None


class HTTPProtocol(asyncio.Protocol):
    __slots__ = (
        "_awaiting_next",
        "_body",
        "_conn",
        "_first_word",
        "_got_bytes",
        "_loop",
        "_method",
        "_request",
        "_stream",
        "_task",
        "_timer",
        "client",
        "flow",
        "state",
        "transport",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._loop = asyncio.get_running_loop()
        # WriteTransport, as stream.Channel declares it; reading is paused via a cast.
        self.transport: asyncio.WriteTransport | None = None
        self.flow = FlowControl(self._loop)
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=state.config.max_head_bytes
        )
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._stream: EventStream | None = None
        self._request: Request | None = None
        # The method of the request being answered, as soon as h11 has parsed its head
        # (before our own checks, which may refuse it): it decides whether a body follows.
        self._method: bytes | None = None
        self._first_word = b""  # the request's first bytes, for heads h11 cannot parse
        self._body: bytearray | None = None
        self._got_bytes = False  # any byte of the current request seen
        self._awaiting_next = False  # idle between keep-alive requests
        self.client: tuple[str, int] | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: a cast, not isinstance, as uvloop's subclasses none of
        # asyncio's transport classes.
        tcp = cast(asyncio.Transport, transport)
        self.transport = tcp
        state = self.state
        state.total_connections += 1
        peer = tcp.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (str(peer[0]), int(peer[1]))
        if state.shutting_down or len(state.connections) >= state.config.max_connections:
            tcp.write(SHUTTING_DOWN if state.shutting_down else OVERLOADED)
            tcp.close()
            self.transport = None
            return
        state.connections.add(self)
        if state.on_connections is not None:
            state.on_connections(1)
        limit = state.config.write_buffer_bytes
        tcp.set_write_buffer_limits(high=limit, low=limit // 4)
        self._start_timer(state.config.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if self in state.connections:
            state.connections.remove(self)
            if state.on_connections is not None:
                state.on_connections(-1)
        self.transport = None
        self._cancel_timer()
        self.flow.release(ClientGone("client disconnected"))
        if self._stream is not None:
            self._stream.connection_lost()
        if self._task is not None and not self._task.done():
            self._task.cancel(msg="client disconnected")

    def eof_received(self) -> bool:
        return False  # see the module docstring: EOF ends the connection

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if not self._got_bytes:
            self._first_word = data[:5]
        try:
            self._conn.receive_data(data)
        except RuntimeError:
            # h11 refuses data once it has decided the connection must close.
            return
        if not self._got_bytes:
            self._got_bytes = True
            if self._awaiting_next:
                # The keep-alive wait is over: the new request gets the head deadline.
                self._awaiting_next = False
                self._start_timer(self.state.config.header_timeout_s)
        if self._task is None:
            self._handle_events()
        transport = self.transport
        if transport is not None and (
            len(self._conn.trailing_data[0]) > self.state.config.max_head_bytes
        ):
            # The client keeps sending while a response runs: stop reading until it ends.
            cast(asyncio.Transport, transport).pause_reading()  # see connection_made

    # -- request parsing ---------------------------------------------------------------

    def _handle_events(self) -> None:
        conn = self._conn
        config = self.state.config
        while self.transport is not None and self._task is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = {431: "head_too_large", 501: "not_implemented"}.get(status, "bad_request")
                # h11 quotes the offending bytes as a Python repr: keep only its words.
                message = _H11_DETAIL.sub("", str(exc)) or "malformed request"
                self._refuse(status, code, message)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._method = event.method
                if not self._begin_request(event):
                    return
            elif isinstance(event, h11.Data):
                assert self._body is not None
                self._body += event.data
                if len(self._body) > config.max_body_bytes:
                    self._refuse(413, "body_too_large", "request body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.close_connection()
                return

    def _begin_request(self, event: h11.Request) -> bool:
        config = self.state.config
        target = event.target.decode("latin-1")
        if target.startswith(("http://", "https://")):
            # absolute-form, which servers must accept (RFC 9112 §3.2.2): route its path.
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        raw_path, _, query = target.partition("?")
        path = unquote(raw_path)
        head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_bytes > config.max_head_bytes:
            # h11 only bounds a head that arrives in pieces; one that fits a read is ours.
            self._refuse(431, "head_too_large", "request head too large")
            return False
        if event.http_version not in (b"1.0", b"1.1"):
            self._refuse(505, "http_version_not_supported", "only HTTP/1.0 and 1.1 are served")
            return False
        if not path.startswith("/") or "\x00" in path:
            self._refuse(400, "bad_request", "request target must be an absolute path")
            return False
        self._request = Request(
            method=event.method.decode("ascii"),
            target=target,
            path=path,
            query_string=query,
            headers=list(event.headers),
            http_version=event.http_version.decode("ascii"),
            client=self.client,
            received_at=time.monotonic(),
        )
        length = self._request.header("content-length")
        if length is not None and self._request.header("transfer-encoding") is not None:
            # Both framings at once is the shape of request smuggling (RFC 9112 §6.1).
            self._refuse(400, "bad_request", "Content-Length and Transfer-Encoding together")
            return False
        if length is not None and int(length) > config.max_body_bytes:
            self._refuse(413, "body_too_large", "request body too large")
            return False
        self._body = bytearray()
        transport = self.transport
        if self._conn.client_is_waiting_for_100_continue and transport is not None:
            # curl and others hold a body back until this arrives (or a second passes):
            # the request is acceptable so far, so ask for it now.
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            transport.write(self._conn.send(go_on) or b"")
        return True

    def _dispatch(self) -> None:
        self._cancel_timer()
        request = self._request
        assert request is not None and self._body is not None
        request.body = bytes(self._body)
        self._body = None
        stream = EventStream(request, self, self.state.streams)
        self._stream = stream
        task = self._loop.create_task(self._run_handler(stream))
        self._task = task
        self.state.handlers.add(task)
        task.add_done_callback(self.state.handlers.discard)

    async def _run_handler(self, stream: EventStream) -> None:
        try:
            await self.state.app(stream.request, stream)
        except HTTPError as exc:
            if not stream.started:
                stream.respond_error(exc.status, exc.code, exc.message, exc.headers)
            else:
                stream.finish(exc.code)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            # Client gone (nothing to write) or server shutting down (end the body).
            stream.finish("shutdown" if self.state.shutting_down else "cancelled")
            raise
        except Exception as exc:
            log.error(
                "handler failed: %s %s", stream.request.method, stream.request.path, exc_info=exc
            )
            if not stream.started:
                stream.respond_error(500, "internal_error", "internal server error")
            elif stream.open:
                stream.write(INTERNAL_ERROR_EVENT)
                stream.finish("error")
        else:
            if not stream.started:
                stream.respond_error(500, "internal_error", "handler sent no response")
            elif stream.open and not stream.detached:
                stream.finish()
        finally:
            self._task = None
            if stream.state == "hijacked":
                self.close_connection()  # h11 never saw this response end: no reuse
            self._loop.call_soon(self._continue)
            if not stream.detached or not stream.open:
                self._log_access(stream)
            if stream.detached and stream.open:
                stream.request.release()
                stream.on_close(self._log_access)

    def _log_access(self, stream: EventStream) -> None:
        observer = self.state.on_response_done
        if observer is not None:
            observer(stream)
        if not access_log.isEnabledFor(logging.INFO):
            return
        request = stream.request
        fields = {
            "request_id": request.id or None,
            "method": request.method,
            "path": request.path,
            "status": stream.status,
            "bytes": stream.bytes_sent,
            "duration_ms": round((time.monotonic() - request.received_at) * 1000, 2),
            "client": request.client[0] if request.client else None,
            "reason": stream.close_reason or None,
            **stream.log,
        }
        access_log.info(
            "%s %s %s", request.method, request.target, stream.status, extra={"fields": fields}
        )

    # -- Channel (used by EventStream) --------------------------------------------------

    def send_head(
        self, status: int, headers: HeaderList, body: bytes = b"", preamble: bytes = b""
    ) -> bool:
        """Write the response head, and with it in the same write a Content-Length
        ``body`` or a stream's first bytes (``preamble``, framed here). Returns True when
        the body is chunked.

        h11 sees only the headers that decide framing and keep-alive (it validates every
        header it is given, twice, which costs more than the rest of a request); it
        writes the status line and those, and the other headers, checked here against
        line breaks and NUL, go in before the blank line.
        """
        framing: HeaderList = []
        rest = [b""]
        for name, value in headers:
            if name in FRAMING_HEADERS:
                framing.append((name, value))
            elif _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value):
                log.error("refusing a response header with a line break: %r", name)
                self.close_connection(abort=True)
                return False
            else:
                rest.append(b"%s: %s\r\n" % (name, value))
        rest.append(b"date: %s\r\nserver: sseserver\r\n\r\n" % _DateHeader.get())
        response = h11.Response(
            status_code=status, headers=framing, reason=_REASONS.get(status, b"")
        )
        conn = self._conn
        head_only = self._answers_head()
        try:
            head = conn.send(response)
            if head_only:
                body = b""  # RFC 9110 §9.3.2: the head of what GET would get, no body
            elif body:
                body = conn.send(h11.Data(data=body)) or b""
        except h11.LocalProtocolError:
            log.exception("cannot send response head")
            self.close_connection(abort=True)
            return False
        request = self._request
        chunked = (
            request is not None
            and request.http_version == "1.1"
            and not head_only
            and 200 <= status
            and status not in (204, 304)
        )
        transport = self.transport
        if transport is not None and head:
            rest[0] = head[:-2]  # h11's head without its blank line
            if preamble and not head_only:
                body = frame(preamble) if chunked else preamble
            transport.write(b"".join(rest) + body)
        return chunked

    def _answers_head(self) -> bool:
        """Whether the response being sent answers a HEAD request. For a head too large
        or too malformed for h11 to parse, its first word says what the client expects."""
        if self._method is not None:
            return self._method == b"HEAD"
        return self._first_word == b"HEAD "

    def end_response(self) -> None:
        """Finish the current response; keep the connection for the next request or
        close it, as h11 decides."""
        conn = self._conn
        try:
            data = conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.close_connection()
            return
        transport = self.transport
        if transport is None:
            return
        if data:
            transport.write(data)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            self.close_connection()
            return
        self._stream = None
        conn.start_next_cycle()
        self._method = None
        self._first_word = b""
        self._got_bytes = False
        self._awaiting_next = True
        if self.state.shutting_down:
            self.close_connection()
            return
        self._start_timer(self.state.config.keepalive_timeout_s)
        cast(asyncio.Transport, transport).resume_reading()  # see connection_made
        # Pipelined requests may already wait in h11's buffer.
        self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        if self._task is None and self.transport is not None:
            pipelined = self._conn.trailing_data[0]
            if pipelined and self._awaiting_next:
                self._first_word = pipelined[:5]
                self._awaiting_next = False
                self._got_bytes = True
                self._start_timer(self.state.config.header_timeout_s)
            self._handle_events()

    def close_connection(self, abort: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        self._cancel_timer()
        try:
            if abort:
                transport.abort()
            else:
                transport.close()
        except CONNECTION_ERRORS:
            pass

    # -- refusals and timers -----------------------------------------------------------

    def _refuse(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Answer a request we will not serve, then close (its body is left unread)."""
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        if self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = error_body(code, message)
            head: HeaderList = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            head.extend((k.encode(), v.encode()) for k, v in headers)
            given = self._request.header("x-request-id") if self._request else None
            head.append((b"x-request-id", ids.request_id(given).encode()))
            self.send_head(status, head, body)
        self._log_refusal(status, code)
        self.close_connection()

    def _log_refusal(self, status: int, code: str) -> None:
        if access_log.isEnabledFor(logging.INFO):
            request = self._request
            fields = {
                "status": status,
                "reason": code,
                "client": self.client[0] if self.client else None,
                "path": request.path if request else None,
            }
            access_log.info("refused %s %s", status, code, extra={"fields": fields})

    def _start_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._task is not None or self.transport is None:
            return
        if self._got_bytes or self._conn.their_state is not h11.IDLE:
            # Slowloris: a head (or body) that never finishes.
            self._refuse(408, "request_timeout", "request not received in time")
        else:
            self.close_connection()  # idle keep-alive (or a connection that never spoke)

    # -- shutdown ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close an idle connection now; a busy one closes after its response."""
        busy = self._task is not None or (self._stream is not None and self._stream.open)
        if not busy:
            self.close_connection()
