"""fanout: one topic, many subscribers, publishers as fast as the server accepts —
deliveries per second and the latency from publish to delivery."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

from bench.load.addressing import get_request, publish_builder, sub_target
from bench.load.meters import Meter, now, percentiles
from bench.load.streams import Dialer, HTTPStream, Progress, open_many
from tests.support.procs import raise_nofile


class Subscriber(HTTPStream):
    """Counts ``@`` bytes (one per event) and nothing else, so that many cost little."""

    def __init__(self, request: bytes, fan: FanRun) -> None:
        super().__init__(request)
        self.fan = fan
        self.n = 0

    def data_received(self, data: bytes) -> None:
        # The hot path: one C-level count per read (no '@' can be in a response head).
        if self.head_buf is None:
            self.n += data.count(b"@")
        else:
            HTTPStream.data_received(self, data)

    def on_head(self, head: bytes) -> None:
        if self.fan.rcvlowat > 1:
            set_rcvlowat(self.transport, self.fan.rcvlowat)

    def on_body(self, data: bytes) -> None:
        self.n += data.count(b"@")

    def on_lost(self) -> None:
        if self.status == 200 and not self.fan.closing:
            self.fan.dropped += 1


class Probe(Subscriber):
    """A subscriber that also reads each payload's publish time."""

    data_received = HTTPStream.data_received

    def on_head(self, head: bytes) -> None:
        pass  # a probe reads every event as soon as it arrives

    def __init__(self, request: bytes, fan: FanRun) -> None:
        super().__init__(request, fan)
        self.carry = b""

    def on_body(self, data: bytes) -> None:
        t = now()
        if self.carry:
            data = self.carry + data
            self.carry = b""
        fan = self.fan
        measuring = fan.measuring
        lat = fan.latency
        n = 0
        i = data.find(b"@")
        while i >= 0:
            j = data.find(b"#", i)
            if j < 0:
                self.carry = data[i:]
                break
            n += 1
            if measuring:
                lat.append(t - float(data[i + 1 : j]))
            i = data.find(b"@", j)
        self.n += n


def set_rcvlowat(transport: asyncio.BaseTransport | None, nbytes: int) -> None:
    """Readable only once ``nbytes`` are queued (or at once again with 1)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)


class FanRun:
    """The counters and switches every subscriber and publisher of one run shares."""

    def __init__(self, rcvlowat: int = 1) -> None:
        self.rcvlowat = rcvlowat
        self.measuring = False
        self.closing = False
        self.dropped = 0
        self.latency: list[float] = []
        self.published = 0
        self.pub_errors = 0
        self.unanswered = 0
        self.reconnects = 0
        self.connect_errors = 0
        self.publishing = True


class Publisher(asyncio.Protocol):
    """One keep-alive connection with one POST in flight: the next goes out as soon as the
    answer is in. A connection the server closes is replaced by the pool."""

    HEAD, BODY, CSIZE, CDATA, TRAILER = range(5)

    def __init__(
        self, build: Callable[[bytes], bytes], fan: FanRun, on_closed: Callable[[], None]
    ) -> None:
        self.build = build
        self.fan = fan
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = self.HEAD
        self.left = 0
        self.status = 0
        self.inflight = False
        self.answers = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.fan.publishing:
            self.send()

    def send(self) -> None:
        if self.transport is None:
            return
        self.inflight = True
        self.transport.write(self.build(b"@%.6f#" % now()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.inflight:
            self.fan.unanswered += 1
        self.on_closed()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while True:
            state = self.state
            if state == self.HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                head = bytes(buf[pos:i]).lower()
                pos = i + 4
                self.status = int(head[9:12])
                if b"transfer-encoding: chunked" in head:
                    self.state = self.CSIZE
                else:
                    j = head.find(b"content-length:")
                    if j >= 0:
                        k = head.find(b"\r\n", j)
                        self.left = int(head[j + 15 : k if k >= 0 else len(head)])
                    else:
                        self.left = 0
                    self.state = self.BODY
            elif state == self.BODY or state == self.CDATA:
                take = min(self.left, len(buf) - pos)
                pos += take
                self.left -= take
                if self.left:
                    break
                if state == self.BODY:
                    self.answered()
                else:
                    self.state = self.CSIZE
            elif state == self.CSIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(bytes(buf[pos:i]).split(b";")[0], 16)
                pos = i + 2
                if size:
                    self.left = size + 2
                    self.state = self.CDATA
                else:
                    self.state = self.TRAILER
            else:  # TRAILER
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                empty = i == pos
                pos = i + 2
                if empty:
                    self.answered()
        del buf[:pos]

    def answered(self) -> None:
        self.state = self.HEAD
        self.inflight = False
        self.answers += 1
        fan = self.fan
        if 200 <= self.status < 300:
            fan.published += 1
        else:
            fan.pub_errors += 1
        if fan.publishing:
            self.send()


class PublisherPool:
    """One publisher: ``connections`` keep-alive connections, one POST in flight on each."""

    def __init__(
        self, dialer: Dialer, build: Callable[[bytes], bytes], fan: FanRun, connections: int
    ) -> None:
        self.dialer = dialer
        self.build = build
        self.fan = fan
        self.connections = connections
        self.live: list[Publisher] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for _ in range(self.connections):
            await self._open()

    async def _open(self) -> None:
        fan = self.fan
        holder: list[Publisher] = []

        def closed() -> None:
            if holder and holder[0] in self.live:
                self.live.remove(holder[0])
            if fan.publishing:
                fan.reconnects += 1
                task = asyncio.get_running_loop().create_task(self._open())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

        def make() -> Publisher:
            p = Publisher(self.build, fan, closed)
            holder.append(p)
            self.live.append(p)
            return p

        while fan.publishing:
            try:
                await self.dialer.connect(make)
                return
            except OSError:
                fan.connect_errors += 1
                await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop sending; wait for the answers in flight."""
        deadline = now() + timeout_s
        while any(p.inflight and p.transport is not None for p in self.live):
            if now() > deadline:
                break
            await asyncio.sleep(0.01)
        for p in list(self.live):
            if p.transport is not None:
                p.transport.abort()


async def run_fanout(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    raise_nofile()
    pid = args.server_pid
    host, port = args.host, args.port
    n = args.subscribers
    fan = FanRun(args.rcvlowat)
    request = get_request(host, port, sub_target(args.flavor, "bench"))
    probe_every = max(1, n // args.probes) if args.probes > 0 else 0
    dialer = Dialer(host, port, n + args.publishers, args.sources)
    count = 0

    def factories() -> Iterator[Callable[[], HTTPStream]]:
        nonlocal count
        while True:
            count += 1
            if probe_every and count % probe_every == 0:
                yield lambda: Probe(request, fan)
            else:
                yield lambda: Subscriber(request, fan)

    progress.start(lambda: f"fanout: subscribing {n}")
    t0 = now()
    subs, failed = await open_many(
        dialer, factories(), n, args.concurrency, timeout_s=30, deadline=t0 + args.max_s
    )
    subscribe_s = now() - t0
    subscribers = [s for s in subs if isinstance(s, Subscriber)]
    probes = sum(1 for s in subscribers if isinstance(s, Probe))
    await asyncio.sleep(0.5)  # let every subscription register

    def delivered() -> int:
        return sum(s.n for s in subscribers)

    build = publish_builder(args.flavor, host, port, "bench")
    pools = [PublisherPool(dialer, build, fan, args.depth) for _ in range(args.publishers)]
    for pool in pools:
        await pool.start()
    progress.start(
        lambda: (
            f"fanout x{len(subscribers)} subs, {args.publishers} pub: "
            f"{fan.published} published, {fan.dropped} dropped"
        )
    )
    probe_subs = [s for s in subscribers if isinstance(s, Probe)]

    def probed() -> int:
        return sum(s.n for s in probe_subs)

    await asyncio.sleep(args.warmup_s)
    d0, p0, q0 = delivered(), fan.published, probed()
    meter = Meter(pid)
    fan.measuring = True
    await asyncio.sleep(args.duration_s)
    fan.measuring = False
    d1, p1, q1 = delivered(), fan.published, probed()
    cpu = meter.read()
    fan.publishing = False
    for pool in pools:
        await pool.stop()
    for s in subscribers:
        set_rcvlowat(s.transport, 1)  # hand over what is queued below the low-water mark
    # Drain: wait until every subscriber still connected has what was published.
    expected_each = fan.published
    t_drain = now()
    last, last_change = -1, now()
    while now() - t_drain < args.drain_s:
        alive = [s for s in subscribers if not s.closed]
        got = sum(s.n for s in alive)
        if got >= expected_each * len(alive):
            break
        if got != last:
            last, last_change = got, now()
        elif now() - last_change > 2.0:
            break
        await asyncio.sleep(0.05)
    drain_s = now() - t_drain
    alive = [s for s in subscribers if not s.closed]
    lost = sum(max(0, expected_each - s.n) for s in alive)
    progress.stop()
    fan.closing = True
    for s in subscribers:
        s.abort()
    await asyncio.sleep(0.2)
    # Deliveries in the window. Probes read every event as it arrives and sit evenly along
    # the subscription order, so they scale up to all subscribers; the other subscribers
    # read 4 KB at a time (SO_RCVLOWAT), so their counts lag and only check the totals.
    counted = d1 - d0
    if probe_subs and args.rcvlowat > 1:
        deliveries = round((q1 - q0) * len(subscribers) / len(probe_subs))
    else:
        deliveries = counted
    wall = cpu["wall_s"]
    srv_cpu = cpu.get("server_cpu_s", 0.0)
    return {
        "subscribers": n,
        "subscribed": len(subscribers),
        "subscribe_failures": failed,
        "subscribe_s": round(subscribe_s, 3),
        "publishers": args.publishers,
        "depth": args.depth,
        "probes": probes,
        "rcvlowat": args.rcvlowat,
        "published": p1 - p0,
        "published_total": fan.published,
        "publish_errors": fan.pub_errors,
        "publish_unanswered": fan.unanswered,
        "publish_reconnects": fan.reconnects,
        "publish_connect_errors": fan.connect_errors,
        "publishes_per_s": round((p1 - p0) / wall, 1) if wall else 0,
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / wall, 1) if wall else 0,
        "deliveries_counted_per_s": round(counted / wall, 1) if wall else 0,
        "deliveries_acked_per_s": round((p1 - p0) * len(subscribers) / wall, 1) if wall else 0,
        "latency_ms": percentiles(fan.latency),
        "server_cpu_us_per_delivery": round(srv_cpu / deliveries * 1e6, 3) if deliveries else None,
        "gen_cpu_us_per_delivery": round(cpu["gen_cpu_s"] / deliveries * 1e6, 3)
        if deliveries
        else None,
        "dropped_subscribers": fan.dropped,
        "lost": lost,
        "drain_s": round(drain_s, 3),
        "cpu": cpu,
    }
