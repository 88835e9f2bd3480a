"""Local stand-ins for upstream LLM APIs that speak their real streaming wire formats.

The real SDKs (``openai``, ``google-genai``) are pointed at these servers, so tests exercise
the SDKs' own HTTP, SSE parsing and error handling, not mocks of them. Each server records
every accepted connection: when it was opened and closed (and by whom) and how many body
chunks were written on it. That is what lets tests measure, at the upstream's socket, how
long "client cancelled" takes to become "upstream connection closed" (SPEC §7: 100 ms).

Usage in-process (shares the test's event loop)::

    async with OpenAIWire() as up:                      # binds 127.0.0.1:0
        provider = OpenAIProvider(base_url=up.base_url)
        ...
        up.open_connections()                           # connections not yet closed
        rec = up.connections[-1]                        # ConnectionRecord
        await up.wait_closed(rec, within=1.0)           # True once the peer closed it
        rec.closed_at - t_cancel                        # seconds, time.monotonic() clock

As a subprocess: ``python -m tests.upstreams.openai_wire --port 0`` prints one line
``LISTENING http://127.0.0.1:PORT`` and serves until SIGTERM/SIGINT; with ``--tls-cert
server.pem --tls-key server.key`` it serves HTTPS instead (and prints ``https://``), as
``FakeUpstream(tls=context)`` does in-process (certificates: ``tests.support.tls``). Its
records are read with ``GET /_fake/stats`` (JSON), cleared with ``POST /_fake/reset``, and
the default behaviour is replaced with ``POST /_fake/default`` (body ``tokens=20 ...``).
Timestamps use ``time.monotonic()``, which is what asyncio's ``loop.time()`` returns and is
shared by all processes of one machine, so a test process can compare them with its own
clock.

Behaviour per request, from ``[fake key=value ...]`` anywhere in the prompt text (the one
channel a provider passes through untouched) or from an ``X-Fake-Control: key=value ...``
header, over the server's ``default`` (constructor or ``--default``):

=============  ==========================================================================
``tokens``     content deltas to stream (default 5); token i is ``token_text(i)``
``interval_ms``  delay between deltas (absolute deadlines, no drift)
``ttft_ms``    delay before the first delta (after the response head)
``fail``       ``401`` ``429`` ``500`` ``503`` or any status: answer that error instead;
               ``hang``: accept the request and never answer (no head, no byte);
               ``stall``: stream ``after`` deltas, then stop writing but keep the socket;
               ``drop``: stream ``after`` deltas, then close the socket without the
               chunked terminator; ``malformed``: after ``after`` deltas, one event whose
               data is not JSON; ``shape``: one event that is JSON of the wrong shape;
               ``error_event``: one in-stream ``{"error": ...}`` event
``after``      deltas written before ``stall``/``drop``/``malformed``/``shape``/``error_event``
``retry_after``  ``Retry-After`` header value on an error status (OpenAI: ``1`` on 429
               when not given; Gemini says it in a ``RetryInfo`` detail, ``1s`` by default)
=============  ==========================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import re
import signal
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

import h11

CONTROL_HEADER = "x-fake-control"
CONTROL_PREFIX = "/_fake/"

_DIRECTIVE_BLOCK = re.compile(r"\[fake((?:\s+[A-Za-z_]+=[^\s\]]+)*)\s*\]")
_PAIR = re.compile(r"([A-Za-z_]+)=([^\s\]]+)")
_STREAM_FAILURES = frozenset({"stall", "drop", "malformed", "shape", "error_event"})

# Why each failure exists: every one is a way a real upstream has been seen to fail
# (auth, quota, overload, a proxy that hangs, a connection reset mid-answer, a truncated
# event from a buggy OpenAI-compatible server).
FAILURES = frozenset({"hang", *_STREAM_FAILURES})


def token_text(i: int) -> str:
    """The deterministic text of delta ``i``, so tests can check order and completeness."""
    return f"tok{i} "


def expected_text(tokens: int) -> str:
    return "".join(token_text(i) for i in range(tokens))


@dataclass(frozen=True, slots=True)
class Behaviour:
    tokens: int = 5
    interval_ms: float = 0.0
    ttft_ms: float = 0.0
    fail: str | None = None
    after: int = 0
    retry_after: str | None = None

    @property
    def status(self) -> int | None:
        """The HTTP status to fail with, if ``fail`` is one."""
        if self.fail is not None and self.fail.isdigit():
            return int(self.fail)
        return None

    def updated(self, pairs: Iterable[tuple[str, str]]) -> Behaviour:
        """A copy with ``key=value`` directives applied.

        Raises:
            ValueError: an unknown key or a bad value.
        """
        changes: dict[str, Any] = {}
        for key, value in pairs:
            if key in ("tokens", "after"):
                changes[key] = int(value)
            elif key in ("interval_ms", "ttft_ms"):
                changes[key] = float(value)
            elif key == "fail":
                if not (value.isdigit() and len(value) == 3) and value not in FAILURES:
                    raise ValueError(f"unknown failure {value!r}")
                changes[key] = value
            elif key == "retry_after":
                changes[key] = value
            else:
                raise ValueError(f"unknown fake directive {key!r}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse(cls, text: str, base: Behaviour | None = None) -> Behaviour:
        """``base`` updated by ``key=value`` pairs in ``text`` (a header value)."""
        return (base or cls()).updated(_PAIR.findall(text))


def directives_in(text: str) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of every ``[fake ...]`` block in a prompt."""
    pairs: list[tuple[str, str]] = []
    for block in _DIRECTIVE_BLOCK.findall(text):
        pairs.extend(_PAIR.findall(block))
    return pairs


@dataclass(slots=True)
class ConnectionRecord:
    """One accepted TCP connection, as the upstream saw it."""

    id: int
    opened_at: float
    closed_at: float | None = None  # time.monotonic() of EOF or connection_lost
    closed_by: str | None = None  # "peer" (the client closed) or "server"
    chunks_written: int = 0  # body chunks (one SSE event each) written on it
    requests: int = 0
    control: bool = False  # only served /_fake/ requests; left out of the counts

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class RequestRecord:
    """One request, as received: lets tests check what the SDK actually sent."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: ConnectionRecord
    received_at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def json(self) -> Any:
        return json.loads(self.body)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "connection": self.connection.id,
            "received_at": self.received_at,
        }


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class PeerGone(Exception):
    """The client closed the connection while a response was being written."""


class Responder:
    """What a handler uses to answer one request on one connection."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    @property
    def record(self) -> ConnectionRecord:
        return self._conn.record

    async def send_json(
        self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """A complete response with a Content-Length, as non-streaming APIs answer."""
        body = json.dumps(obj).encode()
        head = [("content-type", "application/json"), ("content-length", str(len(body)))]
        self._conn.send(
            h11.Response(status_code=status, headers=[*head, *headers], reason=_reason(status))
        )
        self._conn.send(h11.Data(data=body))
        self._conn.send(h11.EndOfMessage())

    def start_stream(self, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A 200 head without Content-Length: h11 frames the body chunked, as the APIs do."""
        head = [("content-type", "text/event-stream; charset=utf-8")]
        self._conn.send(h11.Response(status_code=200, headers=[*head, *headers], reason=b"OK"))

    async def send_chunk(self, data: bytes) -> None:
        """One body chunk (one SSE event); waits while the client reads too slowly."""
        await self._conn.writable()
        self._conn.send(h11.Data(data=data))
        self._conn.record.chunks_written += 1

    def end_stream(self) -> None:
        self._conn.send(h11.EndOfMessage())

    def drop(self) -> None:
        """Close the socket mid-body: no chunked terminator, as a crashed upstream does."""
        self._conn.close_by_server()

    async def hang(self) -> None:
        """Say nothing more; return when the client gives up and closes."""
        await self._conn.closed()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class _Connection(asyncio.Protocol):
    """One accepted connection: h11 parses requests, one handler task answers each."""

    def __init__(self, server: FakeUpstream) -> None:
        self._server = server
        self._h11 = h11.Connection(h11.SERVER)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = asyncio.get_running_loop().create_future()
        self.record = ConnectionRecord(id=next(server._ids), opened_at=time.monotonic())

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connection_made(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._h11.receive_data(data)
        except RuntimeError:
            return  # data after we decided to close; ignore it
        self._next_request()

    def eof_received(self) -> bool:
        # The client's FIN: this is the moment "the upstream socket closed" for a client
        # that shuts its socket down or closes it.
        self._mark_closed("peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed("peer")
        self._can_write.set()
        self._server._connection_lost(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- for Responder ----------------------------------------------------------------

    def send(self, event: h11.Event) -> None:
        if self._transport is None or self._transport.is_closing():
            raise PeerGone
        data = self._h11.send(event)
        if data:
            self._transport.write(data)

    async def writable(self) -> None:
        await self._can_write.wait()
        if self.record.closed_at is not None:
            raise PeerGone

    async def closed(self) -> None:
        await asyncio.shield(self._closed)

    def close_by_server(self) -> None:
        if self.record.closed_by is None:
            self.record.closed_by = "server"
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self.record.closed_by is None:
            self.record.closed_by = "server"
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    # -- internals --------------------------------------------------------------------

    def _mark_closed(self, by: str) -> None:
        if self.record.closed_at is None:
            self.record.closed_at = time.monotonic()
            if self.record.closed_by is None:
                self.record.closed_by = by
        if not self._closed.done():
            self._closed.set_result(None)
        # Stop a response nobody reads, as a real upstream notices on its next write.
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _next_request(self) -> None:
        if self._task is not None:
            return  # one request at a time; h11 buffers the next one
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:
                self.close_by_server()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
                self._body.clear()
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                self._start_handler(self._request, bytes(self._body))
                return
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _start_handler(self, request: h11.Request, body: bytes) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        target = request.target.decode()
        rec = RequestRecord(
            method=request.method.decode(),
            target=target,
            headers=headers,
            body=body,
            connection=self.record,
        )
        if self.record.requests == 0 and target.startswith(CONTROL_PREFIX):
            self.record.control = True
        self.record.requests += 1
        if not self.record.control:
            self._server.requests.append(rec)
        self._task = asyncio.get_running_loop().create_task(self._serve(rec))

    async def _serve(self, rec: RequestRecord) -> None:
        try:
            await self._server._dispatch(rec, Responder(self))
        except (PeerGone, asyncio.CancelledError):
            return  # the client went away; nothing left to answer
        except Exception as exc:  # a bug in a fake must show (server.errors), not hang
            self._server.errors.append(exc)
            if self._h11.our_state is h11.SEND_RESPONSE:
                await Responder(self).send_json(500, {"error": {"message": repr(exc)}})
            else:
                self.close_by_server()
            return
        finally:
            self._task = None
        self._after_response()

    def _after_response(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._next_request()
        elif self._h11.our_state in (h11.MUST_CLOSE, h11.DONE):
            self.close_by_server()


class FakeUpstream:
    """A loopback HTTP/1.1 server; subclasses answer one API (``handle``)."""

    #: what ``python -m`` prints and the client SDK's base URL is built from
    api_name: ClassVar[str] = "fake"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Behaviour | None = None,
        api_key: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.tls = tls  # a server context: HTTPS instead of plain HTTP
        self.port = port
        self.default = default or Behaviour()
        self.api_key = api_key  # when set, requests with another key are refused
        self.connections: list[ConnectionRecord] = []
        self.requests: list[RequestRecord] = []
        self.errors: list[Exception] = []  # exceptions raised by handlers (fake bugs)
        self._ids = itertools.count(1)
        self._live: dict[int, _Connection] = {}
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening, abort every connection and wait for their handlers."""
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self._live.values() if c.task is not None]
        for conn in list(self._live.values()):
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # abort() reports connection_lost on a later loop iteration; wait for it (bounded)
        # so the records say closed once this returns.
        await self.wait_until(lambda: not self._live, within=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to give the SDK as its base URL."""
        return self.url

    # -- records ----------------------------------------------------------------------

    def api_connections(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if not c.control]

    def open_connections(self) -> int:
        """Connections not yet closed (by either side), control connections left out."""
        return sum(1 for c in self.api_connections() if c.is_open)

    def reset(self) -> None:
        """Forget closed connections and all requests (open ones stay tracked)."""
        self.connections = [c for c in self.connections if c.is_open]
        self.requests.clear()

    async def wait_closed(self, record: ConnectionRecord, within: float) -> bool:
        """Wait until ``record`` is closed; False if still open after ``within`` seconds."""
        return await self.wait_until(lambda: not record.is_open, within)

    async def wait_until(self, predicate: Callable[[], bool], within: float) -> bool:
        """Wait at most ``within`` seconds until ``predicate()`` holds, re-checking on
        every connection or request event (and every 50 ms)."""
        deadline = time.monotonic() + within
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
            except TimeoutError:
                pass
        return True

    async def wait_for_requests(self, n: int, within: float) -> bool:
        return await self.wait_until(lambda: len(self.requests) >= n, within)

    def stats(self) -> dict[str, Any]:
        return {
            "now": time.monotonic(),
            "open": self.open_connections(),
            "connections": [c.as_dict() for c in self.api_connections()],
            "requests": [r.as_dict() for r in self.requests],
        }

    def _connection_made(self, conn: _Connection) -> None:
        self.connections.append(conn.record)
        self._live[conn.record.id] = conn
        self._changed.set()

    def _connection_lost(self, conn: _Connection) -> None:
        self._live.pop(conn.record.id, None)
        self._changed.set()

    # -- requests ---------------------------------------------------------------------

    def behaviour(self, req: RequestRecord, prompt: str) -> Behaviour:
        """The server default, then prompt directives, then the control header."""
        b = self.default.updated(directives_in(prompt))
        header = req.headers.get(CONTROL_HEADER)
        return b.updated(_PAIR.findall(header)) if header else b

    async def _dispatch(self, req: RequestRecord, resp: Responder) -> None:
        self._changed.set()
        if req.target.startswith(CONTROL_PREFIX):
            await self._control(req, resp)
        else:
            await self.handle(req, resp)
        self._changed.set()

    async def _control(self, req: RequestRecord, resp: Responder) -> None:
        name = req.path[len(CONTROL_PREFIX) :]
        if req.method == "GET" and name == "stats":
            await resp.send_json(200, self.stats())
        elif req.method == "POST" and name == "reset":
            self.reset()
            await resp.send_json(200, {"ok": True})
        elif req.method == "POST" and name == "default":
            self.default = Behaviour.parse(req.body.decode())
            await resp.send_json(200, dataclasses.asdict(self.default))
        else:
            await resp.send_json(404, {"error": {"message": "unknown control"}})

    async def handle(self, req: RequestRecord, resp: Responder) -> None:
        raise NotImplementedError

    async def stream_events(
        self, resp: Responder, b: Behaviour, events: Callable[[int], bytes], extra: bytes
    ) -> bool:
        """Write ``b.tokens`` events on absolute deadlines, applying stream failures.

        Returns False when a failure ended the stream (the caller writes no more).
        """
        start = time.monotonic() + b.ttft_ms / 1000
        for i in range(b.tokens):
            if b.fail in _STREAM_FAILURES and i == b.after:
                return await self._stream_failure(resp, b, extra)
            await resp.sleep_until(start + i * b.interval_ms / 1000)
            await resp.send_chunk(events(i))
        if b.fail in _STREAM_FAILURES:
            return await self._stream_failure(resp, b, extra)
        return True

    async def _stream_failure(self, resp: Responder, b: Behaviour, extra: bytes) -> bool:
        if b.fail == "stall":
            await resp.hang()
        elif b.fail == "drop":
            resp.drop()
        elif b.fail == "malformed":
            await resp.send_chunk(b'data: {"id": "x", "choices": [{"delta": {"content": "tr\n\n')
            return True
        elif b.fail in ("shape", "error_event"):
            await resp.send_chunk(extra)
            return True
        return False


def sse(obj: Any, sep: bytes = b"\n\n") -> bytes:
    """One SSE event whose data is ``obj`` as compact JSON (what the APIs send)."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + sep


def prompt_words(texts: Iterable[str]) -> int:
    """A stand-in prompt token count: whitespace-separated words."""
    return sum(len(t.split()) for t in texts)


def main(cls: type[FakeUpstream], argv: list[str] | None = None) -> int:
    """``python -m tests.upstreams.<api>_wire``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog=f"tests.upstreams.{cls.api_name}_wire")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="refuse requests with another key")
    parser.add_argument("--default", default="", help='behaviour, e.g. "tokens=20 interval_ms=5"')
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this chain (PEM)")
    parser.add_argument("--tls-key", default=None, help="the private key of --tls-cert (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    context: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)

    async def serve() -> None:
        server = cls(
            host=args.host,
            port=args.port,
            default=Behaviour.parse(args.default),
            api_key=args.api_key,
            tls=context,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            print(f"LISTENING {server.url}", flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0


__all__ = [
    "CONTROL_HEADER",
    "Behaviour",
    "ConnectionRecord",
    "FakeUpstream",
    "RequestRecord",
    "Responder",
    "directives_in",
    "expected_text",
    "main",
    "prompt_words",
    "sse",
    "token_text",
]
