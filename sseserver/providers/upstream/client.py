"""The lean upstream client: HTTP/1.1 over asyncio ``Protocol``s, with what the SDKs give
their users — TLS verified (``tls.client_context``), a bounded keep-alive pool per
upstream, connect / first-byte / idle timeouts, CONNECT tunnels and forward proxies from
the environment (``origin.proxy_for``), and the SDKs' retries before the first byte.

Why not httpx (the SDKs' client): each chunk of a streamed answer climbs through httpx,
httpcore and anyio, several generator and task layers deep; here a network read lands in
``Connection.data_received`` and the provider's task is woken once with every piece it
brought.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from .connection import Connection, TunnelHandshake, UpstreamClosed, UpstreamTimedOut
from .origin import Origin, Proxy, proxy_for, split_url
from .parse import Head, ResponseError
from .tls import client_context

MAX_RETRIES = 2  # the SDKs' default
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx, as the SDKs retry
INITIAL_RETRY_DELAY_S = 0.5  # the openai SDK's backoff: 0.5 s doubling, capped at 8 s
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for (the SDK's rule)
MAX_IDLE_PER_ORIGIN = 100  # idle keep-alive connections kept per upstream
IDLE_EXPIRY_S = 5.0  # an idle connection older than this is closed, not reused (httpx's)
MAX_ERROR_BODY = 64 * 1024  # what ``read`` keeps of an error answer
DRAIN_S = 0.100  # the SDK's bound on reading what follows [DONE] before reuse

# What a failed call raises: the socket's errors (ssl.SSLError is an OSError), the
# upstream closing early or not answering in time, and answers that are not HTTP/1.1.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    UpstreamClosed,
    UpstreamTimedOut,
    ResponseError,
    TimeoutError,
)


class ProxyRefused(ConnectionError):
    """The proxy did not open the tunnel."""

    def __init__(self, status: int) -> None:
        super().__init__(f"proxy refused the tunnel: HTTP {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Route:
    """How to reach an origin: directly, through a CONNECT tunnel, or (plain http) by
    asking a forward proxy with the absolute URL."""

    origin: Origin
    proxy: Proxy | None = None

    @property
    def forward(self) -> bool:
        return self.proxy is not None and not self.origin.tls


@dataclass(slots=True)
class _Idle:
    conn: Connection
    since: float


PieceCallback = Callable[[bytes], None]
EndCallback = Callable[[BaseException | None], None]


def _ignore_piece(piece: bytes) -> None:
    pass


def _ignore_end(error: BaseException | None) -> None:
    pass


class Response:
    """An answer whose head has arrived; its body is read with ``async for`` (pieces as
    they arrived, decompressed if the upstream compressed them) or ``read()``, or pushed
    with ``pipe``. ``close`` hands a fully read keep-alive connection back to the pool and
    closes any other: a call cancelled mid-body never leaves its socket open."""

    __slots__ = (
        "_client",
        "_conn",
        "_decoder",
        "_drain_timer",
        "_on_end",
        "_on_piece",
        "_route",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, client: UpstreamClient, route: Route, conn: Connection, head: Head) -> None:
        self._client = client
        self._route = route
        self._conn: Connection | None = conn
        self.status = head.status
        self.reason = head.reason
        self.headers: Mapping[str, str] = head.headers
        coding = head.headers.get("content-encoding", "identity").strip().lower()
        self._decoder = (
            zlib.decompressobj(wbits=47 if coding in ("gzip", "x-gzip") else 15)
            if coding in ("gzip", "x-gzip", "deflate")
            else None
        )
        self._on_piece: PieceCallback = _ignore_piece
        self._on_end: EndCallback = _ignore_end
        self._drain_timer: asyncio.TimerHandle | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        decoder = self._decoder
        try:
            while (piece := await conn.piece()) is not None:
                if decoder is not None:
                    piece = decoder.decompress(piece)
                    if not piece:
                        continue
                yield piece
        except zlib.error as exc:
            raise ResponseError("upstream sent a body that does not decompress") from exc
        finally:
            self.close()

    async def read(self, limit: int = MAX_ERROR_BODY) -> bytes:
        """The body (its first ``limit`` bytes; the rest is read and dropped)."""
        parts: list[bytes] = []
        size = 0
        async for piece in self:
            if size < limit:
                parts.append(piece[: limit - size])
            size += len(piece)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the answer: its connection is pooled if the body was read to its
        end, else closed at once (a cancelled call leaves no socket open)."""
        conn, self._conn = self._conn, None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if conn is not None:
            conn.detach()
            self._client._release(self._route, conn)

    def abort(self) -> None:
        """Done with an answer its reader refused: its connection is closed, never
        pooled, however much of the body had arrived."""
        conn = self._conn
        if conn is not None:
            conn.abort()
        self.close()

    # -- pushed ----------------------------------------------------------------------------

    def pipe(self, on_piece: PieceCallback, on_end: EndCallback) -> None:
        """Push the body: ``on_piece`` from the socket's reads as pieces arrive
        (decompressed), then ``on_end(None)`` — the connection pooled first — or
        ``on_end(error)`` (one of TRANSPORT_ERRORS) with it closed. ``close`` stops both."""
        conn = self._conn
        if conn is None:
            on_end(UpstreamClosed("the answer was closed"))
            return
        self._on_piece, self._on_end = on_piece, on_end
        conn.deliver_to(self)

    def pause(self) -> None:
        """Stop reading while the consumer is behind (the upstream slows down)."""
        if self._conn is not None:
            self._conn.hold()

    def resume(self) -> None:
        if self._conn is not None:
            self._conn.unhold()

    def finish_soon(self) -> None:
        """The consumer has all it needs (``[DONE]``): push nothing more, and pool the
        connection once the rest of the body (the chunked terminator) is read — within
        DRAIN_S, as ``finish`` — or close it."""
        self._on_piece, self._on_end = _ignore_piece, _ignore_end
        conn = self._conn
        if conn is None or conn.ended:
            self.close()
            return
        conn.unhold()
        self._drain_timer = conn.loop.call_later(DRAIN_S, self.close)

    def body_piece(self, piece: bytes) -> None:
        decoder = self._decoder
        if decoder is not None:
            try:
                piece = decoder.decompress(piece)
            except zlib.error:
                self.close()
                self._on_end(ResponseError("upstream sent a body that does not decompress"))
                return
            if not piece:
                return
        self._on_piece(piece)

    def body_end(self, error: BaseException | None) -> None:
        on_end = self._on_end
        self._on_piece, self._on_end = _ignore_piece, _ignore_end
        self.close()
        on_end(error)

    async def finish(self) -> None:
        """Done with an answer the caller knows is complete (``[DONE]`` read): what is
        left of the body (the chunked terminator) is read for DRAIN_S at most, so that
        the connection can be pooled — as the SDK drains before reuse — then closed."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(TimeoutError, *TRANSPORT_ERRORS):
                async with asyncio.timeout(DRAIN_S):
                    while await conn.piece() is not None:
                        pass
        self.close()


@dataclass
class UpstreamClient:
    """One per provider, for the provider's life; ``aclose`` closes every connection."""

    timeout_s: float = 30.0
    max_retries: int = MAX_RETRIES
    max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN
    _idle: dict[Route, list[_Idle]] = field(default_factory=dict)
    _busy: set[Connection] = field(default_factory=set)
    _watchdog: asyncio.TimerHandle | None = None
    _closed: bool = False

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """Send a request and return its answer once the head has arrived — after up to
        ``max_retries`` retries for connection failures and the statuses the SDKs retry
        (408, 409, 429, 5xx; ``Retry-After`` honoured). The last answer is returned
        whatever its status; the caller reads and closes it.

        Raises:
            one of TRANSPORT_ERRORS, ProxyRefused, ValueError (a bad URL or proxy).
        """
        origin, target = split_url(url)
        route = Route(origin, proxy_for(origin))
        retries = 0
        while True:
            try:
                response = await self._exchange(route, method, target, headers, body)
            except TRANSPORT_ERRORS as exc:  # ProxyRefused is a ConnectionError, an OSError
                if retries >= self.max_retries or self._closed or not _retryable(exc):
                    raise
                delay = _backoff(retries)
            else:
                if retries >= self.max_retries or not _should_retry(response):
                    return response
                delay = _retry_delay(response.headers, retries)
                response.close()  # not read: its connection is closed, not reused
            retries += 1
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for idle in self._idle.values():
            for entry in idle:
                entry.conn.abort()
        self._idle.clear()
        for conn in list(self._busy):
            conn.abort()
        self._busy.clear()

    # -- one attempt -----------------------------------------------------------------------

    async def _exchange(
        self, route: Route, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        conn = self._pooled(route) or await self._connect(route)
        self._busy.add(conn)
        self._start_watchdog()
        try:
            conn.send(self._request_bytes(route, method, target, headers, body), method)
            head = await conn.head()
        except BaseException:
            self._busy.discard(conn)
            conn.abort()
            raise
        return Response(self, route, conn, head)

    def _request_bytes(
        self, route: Route, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> bytes:
        origin = route.origin
        if route.forward:  # a forward proxy is asked for the absolute URL
            target = f"{origin.scheme}://{origin.authority}{target}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if route.forward and route.proxy is not None and route.proxy.authorization:
            lines.append(f"Proxy-Authorization: {route.proxy.authorization}")
        lines.append("Accept-Encoding: gzip, deflate")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + body if body else head

    def _pooled(self, route: Route) -> Connection | None:
        idle = self._idle.get(route)
        now = time.monotonic()
        while idle:
            entry = idle.pop()
            if not entry.conn.closed and now - entry.since < IDLE_EXPIRY_S:
                return entry.conn
            entry.conn.abort()
        return None

    def _release(self, route: Route, conn: Connection) -> None:
        self._busy.discard(conn)
        if not conn.reusable or self._closed:
            conn.abort()
            return
        conn.busy = False
        idle = self._idle.setdefault(route, [])
        now = time.monotonic()
        idle[:] = [e for e in idle if now - e.since < IDLE_EXPIRY_S and not e.conn.closed]
        if len(idle) >= self.max_idle_per_origin:
            conn.abort()
            return
        idle.append(_Idle(conn, now))

    async def _connect(self, route: Route) -> Connection:
        """A new connection (TLS, through a tunnel if the route has one), within the
        timeout."""
        loop = asyncio.get_running_loop()
        origin, proxy = route.origin, route.proxy
        conn = Connection(loop)
        async with asyncio.timeout(self.timeout_s):
            if proxy is None or route.forward:
                hop = proxy.origin if proxy is not None else origin
                tls = origin.tls and proxy is None
                await loop.create_connection(
                    lambda: conn,
                    hop.host,
                    hop.port,
                    ssl=client_context() if tls else None,
                    server_hostname=origin.host if tls else None,
                )
                return conn
            transport, handshake = await loop.create_connection(
                lambda: TunnelHandshake(loop), proxy.origin.host, proxy.origin.port
            )
            try:
                lines = [
                    f"CONNECT {origin.host}:{origin.port} HTTP/1.1",
                    f"Host: {origin.host}:{origin.port}",
                ]
                if proxy.authorization:
                    lines.append(f"Proxy-Authorization: {proxy.authorization}")
                transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                answer = await handshake.answer
                if answer.status != 200:
                    raise ProxyRefused(answer.status)
                tls_transport = await loop.start_tls(
                    transport, conn, client_context(), server_hostname=origin.host
                )
            except BaseException:
                transport.abort()
                raise
            assert tls_transport is not None
            conn.connection_made(tls_transport)
            return conn

    # -- the one timer -------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self._watchdog is None and not self._closed:
            interval = min(1.0, max(0.05, self.timeout_s / 4))
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(interval, self._watch, interval)

    def _watch(self, interval: float) -> None:
        """Every busy connection silent for ``timeout_s`` fails and closes."""
        self._watchdog = None
        if not self._busy:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        horizon = now - self.timeout_s
        for conn in [c for c in self._busy if c.last_io < horizon and not c.held]:
            self._busy.discard(conn)
            conn.time_out(f"no data from upstream for {self.timeout_s:g} s")
        self._watchdog = loop.call_later(interval, self._watch, interval)


def _retryable(exc: BaseException) -> bool:
    """A failure that trying again could cure: a refused or dropped connection. Not a
    timeout (a hung upstream would triple the wait), not a certificate the trust store
    refuses, nor a proxy that refused our credentials."""
    if isinstance(exc, ssl.SSLCertVerificationError | UpstreamTimedOut | TimeoutError):
        return False
    return not (isinstance(exc, ProxyRefused) and exc.status == 407)


def _should_retry(response: Response) -> bool:
    should = response.headers.get("x-should-retry")
    if should == "true":
        return True
    if should == "false":
        return False
    return response.status in RETRY_STATUSES or response.status >= 500


def _backoff(retries: int) -> float:
    delay = min(INITIAL_RETRY_DELAY_S * 2.0**retries, MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())


def _retry_delay(headers: Mapping[str, str], retries: int) -> float:
    """``retry-after-ms`` / ``Retry-After`` (seconds or a date) when it is in (0, 60] s,
    else the backoff."""
    seconds: float | None = None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            seconds = float(ms) / 1000
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
    if seconds is not None and 0 < seconds <= MAX_RETRY_AFTER_S:
        return seconds
    return _backoff(retries)
