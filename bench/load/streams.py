"""The connection machinery every scenario shares: a Dialer that spreads connections over
loopback source addresses, the HTTPStream base protocol (request on connect, response head
parsed, body handed on), TTFTStream (the first text event of one request at a time), the
progress line on stderr, and open_many to open N streams with bounded concurrency."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable, Iterator

from bench.load.meters import now

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Connections per client address before another loopback source address is used
# (the ephemeral port range is ~28k ports per source/destination pair).
PORTS_PER_SOURCE = 25_000
TEXT = b'{"text"'  # the start of a text event's data: one per token
END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked response


class Dialer:
    """Opens client connections, spreading them over several loopback source addresses
    (127.0.0.2, .3, ...) once one address would run out of ephemeral ports."""

    def __init__(self, host: str, port: int, expected: int, sources: int = 0) -> None:
        self.host = host
        self.port = port
        if sources <= 0:
            sources = 0 if expected <= PORTS_PER_SOURCE else -(-expected // PORTS_PER_SOURCE)
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)]
        self._next = 0

    async def connect(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        if not self.sources:
            _, proto = await loop.create_connection(factory, self.host, self.port)
            return proto
        src = self.sources[self._next % len(self.sources)]
        self._next += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        _, proto = await loop.create_connection(factory, sock=sock)
        return proto


class HTTPStream(asyncio.Protocol):
    """Sends one request on connect; parses the response head, hands body bytes on."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head_buf: bytearray | None = bytearray()
        self.status = 0
        self.t_sent = 0.0
        self.closed = False
        self.headed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.t_sent = now()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        hb = self.head_buf
        if hb is None:
            self.on_body(data)
            return
        hb += data
        i = hb.find(b"\r\n\r\n")
        if i < 0:
            if len(hb) > 65536:
                self.fail()
            return
        head = bytes(hb[:i])
        rest = bytes(hb[i + 4 :])
        self.head_buf = None
        try:
            self.status = int(head[9:12])
        except ValueError:
            self.status = 0
        if self.status != 200:
            self.fail()
            return
        if not self.headed.done():
            self.headed.set_result(True)
        self.on_head(head)
        if rest and not self.closed:
            self.on_body(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if not self.headed.done():
            self.headed.set_result(False)
        self.on_lost()

    def fail(self) -> None:
        if not self.headed.done():
            self.headed.set_result(False)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # hooks
    def on_head(self, head: bytes) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        pass

    def on_lost(self) -> None:
        pass


class Progress:
    """One progress line on stderr every ``every_s`` while a phase runs."""

    def __init__(self, label: str, every_s: float = 1.0) -> None:
        self.label = label
        self.every_s = every_s
        self._handle: asyncio.TimerHandle | None = None
        self._what: Callable[[], str] | None = None
        self.hooks: list[Callable[[], None]] = []

    def start(self, what: Callable[[], str]) -> None:
        self.stop()
        self._what = what
        self._handle = asyncio.get_running_loop().call_later(self.every_s, self._tick)

    def _tick(self) -> None:
        for hook in self.hooks:
            hook()
        if self._what is not None:
            self.say(self._what())
        self._handle = asyncio.get_running_loop().call_later(self.every_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def say(self, msg: str) -> None:
        print(f"  [{self.label}] {msg}", file=sys.stderr, flush=True)


async def open_many(
    dialer: Dialer,
    factories: Iterator[Callable[[], HTTPStream]],
    count: int,
    concurrency: int,
    timeout_s: float,
    deadline: float,
) -> tuple[list[HTTPStream], int]:
    """Open ``count`` streams, at most ``concurrency`` not yet answered at a time; wait
    for each head. Returns (streams answered with 200, failures)."""
    sem = asyncio.Semaphore(concurrency)
    opened: list[HTTPStream] = []
    failed = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(factory: Callable[[], HTTPStream]) -> None:
        nonlocal failed
        try:
            proto = await dialer.connect(factory)
            assert isinstance(proto, HTTPStream)
            ok = await asyncio.wait_for(proto.headed, timeout_s)
            if ok:
                opened.append(proto)
            else:
                failed += 1
                proto.abort()
        except (OSError, TimeoutError):
            failed += 1
        finally:
            sem.release()

    for _ in range(count):
        if now() > deadline:
            break
        await sem.acquire()
        task = asyncio.get_running_loop().create_task(one(next(factories)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    return opened, failed


def forever(factory: Callable[[], HTTPStream]) -> Iterator[Callable[[], HTTPStream]]:
    """``open_many``'s factories when every stream is alike."""
    while True:
        yield factory


class TTFTStream(HTTPStream):
    """One request at a time; ``ask()`` sends the next one on the same connection.
    Shared by ttft (times the first text event) and cancel (waits for it, then
    disconnects)."""

    def __init__(self, request: bytes, marker: bytes = TEXT) -> None:
        super().__init__(request)
        self.marker = marker
        self.first_seen: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.body = bytearray()
        self.first = 0.0
        self.result: asyncio.Future[tuple[float, float]] | None = None
        self.t_connect = now()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.t_sent = now()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def ask(self) -> asyncio.Future[tuple[float, float]]:
        self.result = asyncio.get_running_loop().create_future()
        self.head_buf = bytearray()
        self.body = bytearray()
        self.first = 0.0
        if self.transport is None:
            self.result.set_exception(ConnectionError("closed"))
            return self.result
        self.t_sent = now()
        self.transport.write(self.request)
        return self.result

    def expect(self) -> asyncio.Future[tuple[float, float]]:
        self.result = asyncio.get_running_loop().create_future()
        return self.result

    def on_body(self, data: bytes) -> None:
        body = self.body
        body += data
        if not self.first and self.marker in body:
            self.first = now()
            if not self.first_seen.done():
                self.first_seen.set_result(True)
        if END in body:
            if self.result is not None and not self.result.done():
                if self.first:
                    self.result.set_result((self.first - self.t_sent, self.first - self.t_connect))
                else:
                    self.result.set_exception(ValueError("response ended without a text event"))

    def fail(self) -> None:
        if self.result is not None and not self.result.done():
            self.result.set_exception(ValueError(f"status {self.status}"))
        super().fail()

    def on_lost(self) -> None:
        if not self.first_seen.done():
            self.first_seen.set_result(False)
        if self.result is not None and not self.result.done():
            self.result.set_exception(ConnectionError("closed before the end"))
