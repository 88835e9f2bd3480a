"""The load generator: raw asyncio Protocols on uvloop, minimal incremental SSE parsing.

One process runs one scenario against one server and prints ONE JSON object on stdout
(progress lines go to stderr). ``bench/run.py`` pins it to core 1 and the server to core 0.

The hot paths do as little as the measurement needs:
- an open stream counts once its response head arrives (idle);
- a token stream counts ``{"text"`` markers per read (``bytes.count``, in C) and timestamps
  each with the read's clock (tokens, ttft);
- a fan-out subscriber counts ``@`` bytes per read (the publisher's payload is
  ``@<monotonic time>#``); only every k-th subscriber (a "probe") parses the timestamps.

Every result carries the generator's own CPU time (getrusage) next to the server's
(/proc/PID/stat) over the same window, so a reader can tell which side was saturated.

    python -m bench.loadgen idle   --port 8000 --server-pid PID --streams 10000
    python -m bench.loadgen idle   ... --idle-kind subscriptions   # subscriptions to one topic
    python -m bench.loadgen tokens --port 8000 --server-pid PID --streams 1000 --tokens 150
    python -m bench.loadgen tokens ... --target "/v1/stream?provider=openai&q=..." --upstream-pid UP
    python -m bench.loadgen fanout --port 8000 --server-pid PID --subscribers 1000
    python -m bench.loadgen ttft   --port 8000 --server-pid PID --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tests.support.procs import raise_nofile

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Connections per client address before another loopback source address is used
# (the ephemeral port range is ~28k ports per source/destination pair).
PORTS_PER_SOURCE = 25_000


# -- process measurements ----------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cores_busy_s() -> dict[str, float]:
    """Busy seconds of each CPU since boot (/proc/stat: all but idle and iowait)."""
    out = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                continue
            name, *ticks = line.split()
            t = [int(x) for x in ticks[:8]]
            out[name.decode()] = (sum(t) - t[3] - t[4]) / CLK_TCK
    return out


class Meter:
    """CPU of the server and of this generator over one window, and how busy each core
    was: the server is pinned to core 0 and the generator to core 1, so a core's busy
    share beyond its own process (plus the kernel's loopback work) is noise from other
    programs on a shared machine.

    A process sharing the generator's core (``--upstream-pid``: the fake upstream of the
    proxy scenario, the redis-server of sseserver-redis) is measured too
    (``upstream_cpu_s``, ``upstream_util``; ``--upstream-name redis``: ``redis_cpu_s``,
    ``redis_util``) and is not counted as noise."""

    upstream_pid = 0  # set from --upstream-pid
    upstream_name = "upstream"  # set from --upstream-name: the prefix of its keys

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.t = now()
        self.gen = own_cpu_s()
        self.srv = proc_cpu_s(server_pid) if server_pid else 0.0
        self.up = proc_cpu_s(self.upstream_pid) if self.upstream_pid else 0.0
        self.cores = cores_busy_s()

    def read(self) -> dict[str, float]:
        wall = now() - self.t
        gen = own_cpu_s() - self.gen
        out = {
            "wall_s": round(wall, 3),
            "gen_cpu_s": round(gen, 3),
            "gen_util": round(gen / wall, 3) if wall > 0 else 0.0,
        }
        if self.pid:
            srv = proc_cpu_s(self.pid) - self.srv
            out["server_cpu_s"] = round(srv, 3)
            out["server_util"] = round(srv / wall, 3) if wall > 0 else 0.0
        name = self.upstream_name
        if self.upstream_pid:
            with contextlib.suppress(OSError):
                up = proc_cpu_s(self.upstream_pid) - self.up
                out[f"{name}_cpu_s"] = round(up, 3)
                out[f"{name}_util"] = round(up / wall, 3) if wall > 0 else 0.0
        if wall > 0:
            cores = cores_busy_s()
            for name in ("cpu0", "cpu1"):
                if name in cores and name in self.cores:
                    out[f"{name}_busy"] = round((cores[name] - self.cores[name]) / wall, 3)
            # Busy time of each core beyond our own process on it. On core 1 that is other
            # programs (noise); on core 0 it also holds the kernel's softirq work for the
            # server's loopback traffic, which is not charged to the server process.
            if "cpu0_busy" in out and "server_util" in out:
                out["core0_other"] = round(max(0.0, out["cpu0_busy"] - out["server_util"]), 3)
            if "cpu1_busy" in out:
                ours = out["gen_util"] + out.get(f"{name}_util", 0.0)
                out["core1_other"] = round(max(0.0, out["cpu1_busy"] - ours), 3)
        return out


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | int]:
    """p50/p90/p99/p99.9/max (nearest rank), in ms by default."""
    if not values:
        return {"n": 0}
    values.sort()
    n = len(values)

    def at(p: float) -> float:
        return round(values[min(n - 1, max(0, int(p / 100 * n + 0.5) - 1))] * scale, 3)

    return {
        "n": n,
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "p999": at(99.9),
        "max": round(values[-1] * scale, 3),
        "mean": round(sum(values) / n * scale, 3),
    }


# -- how each kind of server is addressed -------------------------------------------------

# sseserver: Mercure on /.well-known/mercure; peers: /sub?topic + POST /pub (same form);
# nchan: /sub/<topic> + POST /pub/<topic> with the raw data as body.
FLAVORS = ("sseserver", "peer", "nchan")


def stream_target(tokens: int, interval_ms: float, ttft_ms: float, size: int = 0) -> str:
    return f"/v1/stream?tokens={tokens}&interval_ms={interval_ms:g}&ttft_ms={ttft_ms:g}&size={size}"


def sub_target(flavor: str, topic: str) -> str:
    if flavor == "sseserver":
        return f"/.well-known/mercure?topic={topic}"
    if flavor == "nchan":
        return f"/sub/{topic}"
    return f"/sub?topic={topic}"


def get_request(host: str, port: int, target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


def post_json_request(host: str, port: int, target: str, body: bytes) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-fake\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def publish_builder(flavor: str, host: str, port: int, topic: str) -> Callable[[bytes], bytes]:
    """A function from the payload (``@<time>#``) to a complete POST request."""
    if flavor == "nchan":
        head = (
            f"POST /pub/{topic} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: text/plain\r\nContent-Length: "
        ).encode()

        def build_nchan(payload: bytes) -> bytes:
            return b"%b%d\r\n\r\n%b" % (head, len(payload), payload)

        return build_nchan
    path = "/.well-known/mercure" if flavor == "sseserver" else "/pub"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
    ).encode()
    prefix = f"topic={topic}&data=".encode()

    def build_form(payload: bytes) -> bytes:
        body = prefix + payload.replace(b"@", b"%40").replace(b"#", b"%23")
        return b"%b%d\r\n\r\n%b" % (head, len(body), body)

    return build_form


# -- connections ---------------------------------------------------------------------------


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


def _forever(factory: Callable[[], HTTPStream]) -> Iterator[Callable[[], HTTPStream]]:
    while True:
        yield factory


# -- idle: open streams held ---------------------------------------------------------------


class IdleStream(HTTPStream):
    lost_after_open = 0  # class-wide: streams the server closed while we held them
    closing = False

    def on_lost(self) -> None:
        if self.status == 200 and not IdleStream.closing:
            IdleStream.lost_after_open += 1


IDLE_KINDS = ("generations", "subscriptions")
IDLE_TOPIC = "idle"  # nobody publishes to it


async def run_idle(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Hold N open streams with nothing to send: ``generations`` (``/v1/stream`` with the
    first token 10 minutes away: each one a running generation) or ``subscriptions`` (to
    one topic nobody publishes to). nchan has no generations: it always subscribes."""
    pid = args.server_pid
    host, port = args.host, args.port
    kind = "subscriptions" if args.flavor == "nchan" else args.idle_kind
    target = (
        sub_target(args.flavor, IDLE_TOPIC)
        if kind == "subscriptions"
        else stream_target(1, 0, 600_000)  # the first token is due in 10 minutes
    )
    request = get_request(host, port, target)
    limit = raise_nofile()
    want = args.streams
    cap = limit - 64
    capped_by = None
    if want > cap:
        capped_by = f"RLIMIT_NOFILE hard limit {limit} (one fd per stream in each process)"
        want = cap
    dialer = Dialer(host, port, want, args.sources)
    rss0 = proc_rss_kb(pid)
    curve: list[tuple[int, int]] = [(0, rss0)]
    opened_now: list[HTTPStream] = []

    def factory() -> HTTPStream:
        s = IdleStream(request)
        opened_now.append(s)
        return s

    def sample() -> None:
        n = sum(1 for s in opened_now if s.status == 200 and not s.closed)
        curve.append((n, proc_rss_kb(pid)))

    progress.hooks.append(sample)
    progress.start(
        lambda: f"idle {kind}: {curve[-1][0]}/{want} open, rss {curve[-1][1] / 1024:.0f} MB"
    )
    meter = Meter(pid)
    t0 = now()
    opened, failed = await open_many(
        dialer,
        _forever(factory),
        want,
        args.concurrency,
        timeout_s=30,
        deadline=t0 + args.max_s,
    )
    open_s = now() - t0
    open_cpu = meter.read()
    progress.hooks.clear()
    progress.start(lambda: f"idle {kind}: holding {len(opened)} streams")
    await asyncio.sleep(args.settle_s)
    rss = proc_rss_kb(pid)
    still_open = sum(1 for s in opened if not s.closed)
    curve.append((still_open, rss))
    progress.stop()
    IdleStream.closing = True
    for s in opened_now:
        s.abort()
    await asyncio.sleep(0.2)
    n = max(1, still_open)
    per_stream_kb = (rss - rss0) / n
    return {
        "kind": kind,
        "target": target,
        "requested": args.streams,
        "attempted": want,
        "capped_by": capped_by,
        "opened": len(opened),
        "held": still_open,
        "failures": failed + (len(opened) - still_open),
        "lost_after_open": IdleStream.lost_after_open,
        "open_s": round(open_s, 3),
        "opened_per_s": round(len(opened) / open_s, 1) if open_s > 0 else 0.0,
        "rss_rest_kb": rss0,
        "rss_open_kb": rss,
        "rss_per_stream_kb": round(per_stream_kb, 3),
        "streams_per_gib": int((1 << 20) / per_stream_kb) if per_stream_kb > 0 else None,
        "curve": curve,
        "sources": len(dialer.sources),
        "gen_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "cpu_open": open_cpu,
    }


# -- tokens: concurrent 50 token/s streams, lateness of each token -------------------------

TEXT = b'{"text"'
STEADY_MARGIN_S = 0.25  # after the last request of a step is sent
START = b"event: start"
FIRST_EVENT_BOUND_MS = 100.0  # a stream's first event, from its request (what a user waits)
DELIVERED_SHARE = 0.95  # of the events offered in the steady window, delivered in it
END_GRACE_S = 0.5  # after the last token is due: a token later than that is lost


class TokenStream(HTTPStream):
    """Counts text events against the schedule its request set: token i is due at
    request + ttft + i * interval, whatever the server did before answering. A server that
    holds a stream back makes every one of its tokens late, and its first event too."""

    def __init__(self, request: bytes, run: TokenRun) -> None:
        super().__init__(request)
        self.run = run
        self.t_first = -1.0  # arrival of the first event (``event: start``)
        self.pre = b""
        self.tail = b""
        self.ntext = 0
        self.done = False

    def on_body(self, data: bytes) -> None:
        t = now()
        run = self.run
        if self.t_first < 0:
            pre = self.pre + data
            i = pre.find(START)
            if i < 0:
                self.pre = pre[-len(START) :]
                return
            self.t_first = t
            run.first_event.append(t - self.t_sent)
            self.pre = b""
            data = pre[i:]
        scan = self.tail + data
        n = scan.count(TEXT)
        if n:
            if run.window_start <= t <= run.window_end:
                run.window_received += n
            i = self.ntext
            self.ntext = i + n
            base = t - self.t_sent - run.ttft
            iv = run.interval
            append = run.lateness.append
            # Tokens due once every request of the step is sent also go to the steady list.
            sf = run.window_start
            if sf == math.inf:
                first_steady = i + n
            elif iv > 0:
                first_steady = max(i, math.ceil((sf - self.t_sent - run.ttft) / iv))
            else:
                first_steady = i if t >= sf else i + n
            steady = run.steady.append
            for k in range(i, i + n):
                late = base - k * iv
                append(late)
                if k >= first_steady:
                    steady(late)
        self.tail = scan[-6:]
        if b"[DONE]" in scan and not self.done:
            self.done = True
            self.abort()  # keep-alive would be allowed; the step is over for this stream
            run.finished_one()

    def on_lost(self) -> None:
        if not self.done:
            self.done = True
            self.run.finished_one()


class TokenRun:
    def __init__(self, streams: int, tokens: int, interval: float, ttft: float) -> None:
        self.tokens = tokens
        self.interval = interval
        self.ttft = ttft
        self.lateness: list[float] = []
        self.steady: list[float] = []
        self.first_event: list[float] = []
        # The steady window: from just after the last request of the step is sent to when
        # the first stream's last token is due (every stream live, none ending).
        self.window_start = math.inf
        self.window_end = -math.inf
        self.window_received = 0  # text events that arrived inside the window
        self.pending = streams
        self.all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finished_one(self) -> None:
        self.pending -= 1
        if self.pending <= 0 and not self.all_done.done():
            self.all_done.set_result(None)

    def offered_in_window(self, sent: list[float]) -> int:
        """Text events due inside the steady window by the streams' schedules."""
        start, end, iv = self.window_start, self.window_end, self.interval
        if end <= start:
            return 0
        total = 0
        for t_sent in sent:
            first = t_sent + self.ttft
            if iv <= 0:
                total += self.tokens if start <= first <= end else 0
                continue
            lo = max(0, math.ceil((start - first) / iv))
            hi = min(self.tokens - 1, math.floor((end - first) / iv))
            total += max(0, hi - lo + 1)
        return total


async def run_tokens(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """N streams of ``--tokens`` tokens at ``--interval-ms``, their requests spread over
    ``--ramp-s``. Held (decided by bench.run) only as a user sees it: every stream answered,
    its first event within FIRST_EVENT_BOUND_MS of its request, every token delivered by
    END_GRACE_S after the schedule's end, DELIVERED_SHARE of the events offered in the
    steady window delivered inside it, and the steady p99 lateness (from the request's
    schedule, not from the stream's own start) within the bound."""
    raise_nofile()
    pid = args.server_pid
    n = args.streams
    tokens = args.tokens
    interval = args.interval_ms / 1000
    ttft = args.ttft_ms / 1000
    # --target: another stream whose text events come on the same schedule, e.g. the OpenAI
    # provider against a fake upstream told `[fake tokens=... interval_ms=...]` (proxy).
    target = args.target or stream_target(tokens, args.interval_ms, args.ttft_ms)
    request = get_request(args.host, args.port, target)
    dialer = Dialer(args.host, args.port, n, args.sources)
    run = TokenRun(n, tokens, interval, ttft)
    streams: list[TokenStream] = []
    failed = 0
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        nonlocal failed
        try:
            proto = await dialer.connect(lambda: TokenStream(request, run))
        except OSError:
            failed += 1
            run.finished_one()
            return
        assert isinstance(proto, TokenStream)
        streams.append(proto)

    progress.start(
        lambda: (
            f"tokens x{n}: {len(streams)} open, {n - run.pending} done, {len(run.lateness)} tokens"
        )
    )
    meter = Meter(pid)
    t_start = now()
    spacing = args.ramp_s / n
    for i in range(n):
        delay = t_start + i * spacing - now()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(set(pending))
    sent = [s.t_sent for s in streams]
    run.window_start = now() + STEADY_MARGIN_S
    run.window_end = (min(sent) if sent else t_start) + ttft + (tokens - 1) * interval
    steady_cpu: dict[str, float] | None = None
    steady_meter: Meter | None = None

    def window_opens() -> None:
        nonlocal steady_meter
        steady_meter = Meter(pid)

    def window_closes() -> None:
        nonlocal steady_cpu
        if steady_meter is not None:
            steady_cpu = steady_meter.read()

    if run.window_end > run.window_start:
        loop.call_at(loop.time() + max(0.0, run.window_start - now()), window_opens)
        loop.call_at(loop.time() + max(0.0, run.window_end - now()), window_closes)
    # No slack: the run ends END_GRACE_S after the last stream's last token is due.
    last_sent = max(sent) if sent else t_start
    deadline = last_sent + ttft + (tokens - 1) * interval + END_GRACE_S
    try:
        await asyncio.wait_for(asyncio.shield(run.all_done), max(0.1, deadline - now()))
        timed_out = False
    except TimeoutError:
        timed_out = True
    cpu = meter.read()
    progress.stop()
    for s in streams:
        s.abort()
    await asyncio.sleep(0.1)
    received = sum(s.ntext for s in streams)
    bad_status = sum(1 for s in streams if s.status not in (0, 200))
    no_first_event = sum(1 for s in streams if s.t_first < 0)
    expected = n * tokens
    offered = run.offered_in_window(sent)
    window_s = run.window_end - run.window_start
    # A stream that never answered its first event is as late as it gets.
    first = run.first_event + [math.inf] * (no_first_event + failed)
    return {
        "streams": n,
        "tokens": tokens,
        "interval_ms": args.interval_ms,
        "opened": sum(1 for s in streams if s.status == 200),
        "failures": failed + bad_status,
        "received": received,
        "lost": expected - received,
        "timed_out": timed_out,
        "lateness_ms": percentiles(run.lateness),
        "steady_lateness_ms": percentiles(run.steady),
        "first_event_ms": percentiles(first),
        "no_first_event": no_first_event + failed,
        "window_s": round(window_s, 3),
        "window_offered": offered,
        "window_delivered": run.window_received,
        "delivered_share": round(run.window_received / offered, 4) if offered else 0.0,
        "events_per_s": round(received / cpu["wall_s"], 1) if cpu["wall_s"] else 0,
        "offered_events_per_s": round(n / interval, 1) if interval else None,
        "delivered_events_per_s": round(run.window_received / window_s, 1) if window_s > 0 else 0,
        "cpu": cpu,
        "cpu_steady": steady_cpu,
        "steady_received": run.window_received,
    }


# -- fan-out: one topic, many subscribers, publishers as fast as the server accepts --------


class Subscriber(HTTPStream):
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


# -- ttft: time from request sent to the first text event ----------------------------------

END = b"\r\n0\r\n\r\n"


class TTFTStream(HTTPStream):
    """One request at a time; ``ask()`` sends the next one on the same connection."""

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


async def run_ttft(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    host, port = args.host, args.port
    target = args.target or stream_target(1, 0, 0)
    if args.body:
        request = post_json_request(host, port, target, args.body.encode())
    else:
        request = get_request(host, port, target)
    marker = args.marker.encode()
    loop = asyncio.get_running_loop()
    fresh_sent: list[float] = []
    fresh_connect: list[float] = []
    kept: list[float] = []
    errors = 0
    done = 0
    progress.start(lambda: f"ttft: {done}/{2 * args.requests} requests")
    meter = Meter(args.server_pid)
    for _ in range(args.requests):
        t_connect = now()
        holder: list[TTFTStream] = []

        def make(holder: list[TTFTStream] = holder, t_connect: float = t_connect) -> TTFTStream:
            s = TTFTStream(request, marker)
            s.t_connect = t_connect
            s.expect()
            holder.append(s)
            return s

        try:
            await loop.create_connection(make, host, port)
            assert holder[0].result is not None
            sent, connect = await asyncio.wait_for(holder[0].result, 10)
            fresh_sent.append(sent)
            fresh_connect.append(connect)
        except (OSError, ValueError, TimeoutError):
            errors += 1
        if holder:
            holder[0].abort()
        done += 1
    cpu_fresh = meter.read()
    holder2: list[TTFTStream] = []

    def make_kept() -> TTFTStream:
        s = TTFTStream(request, marker)
        s.expect()
        holder2.append(s)
        return s

    meter = Meter(args.server_pid)
    await loop.create_connection(make_kept, host, port)
    conn = holder2[0]
    assert conn.result is not None
    fut = conn.result
    reconnects = 0
    for i in range(args.requests):
        try:
            sent, _connect = await asyncio.wait_for(fut, 10)
            kept.append(sent)
        except (OSError, ValueError, TimeoutError):
            errors += 1
        done += 1
        if i == args.requests - 1:
            break
        if conn.closed:
            reconnects += 1
            holder2.clear()
            await loop.create_connection(make_kept, host, port)
            conn = holder2[0]
            assert conn.result is not None
            fut = conn.result
        else:
            fut = conn.ask()
    cpu_kept = meter.read()
    conn.abort()
    progress.stop()
    return {
        "requests": args.requests,
        "errors": errors,
        "fresh_ms": percentiles(fresh_sent),
        "fresh_with_connect_ms": percentiles(fresh_connect),
        "keepalive_ms": percentiles(kept),
        "keepalive_reconnects": reconnects,
        "cpu_fresh": cpu_fresh,
        "cpu_keepalive": cpu_kept,
    }


# -- cancel: client disconnect -> upstream connection closed (SPEC §7) ----------------------


async def http_json(host: str, port: int, method: str, target: str) -> Any:
    """A small HTTP/1.1 request with Connection: close; the JSON body of the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return json.loads(body) if body.strip() else None


async def run_cancel(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Start a long stream through the OpenAI provider, disconnect after its first token,
    and time until the fake upstream sees its connection closed (its own records)."""
    host, port, up = args.host, args.port, args.upstream_port
    request = get_request(host, port, args.target)
    latencies: list[float] = []
    not_closed = 0
    errors = 0
    done = 0
    progress.start(lambda: f"cancel: {done}/{args.requests}")
    for _ in range(args.requests):
        holder: list[TTFTStream] = []

        def make(holder: list[TTFTStream] = holder) -> TTFTStream:
            s = TTFTStream(request)
            holder.append(s)
            return s

        try:
            await asyncio.get_running_loop().create_connection(make, host, port)
            stream = holder[0]
            if not await asyncio.wait_for(stream.first_seen, 10):
                raise ValueError("closed before the first token")
            stats = await http_json(host, up, "GET", "/_fake/stats")
            conn_id = stats["requests"][-1]["connection"]
            t_abort = now()
            stream.abort()
        except (OSError, ValueError, KeyError, IndexError, TimeoutError):
            errors += 1
            done += 1
            continue
        closed_at = None
        while now() - t_abort < args.cancel_wait_s:
            stats = await http_json(host, up, "GET", "/_fake/stats")
            rec = next((c for c in stats["connections"] if c["id"] == conn_id), None)
            if rec is not None and rec.get("closed_at") is not None:
                closed_at = rec["closed_at"]
                break
            await asyncio.sleep(0.005)
        if closed_at is None:
            not_closed += 1
        else:
            latencies.append(closed_at - t_abort)
        done += 1
        await asyncio.sleep(0.02)
    progress.stop()
    lat = percentiles(latencies)
    return {
        "requests": args.requests,
        "errors": errors,
        "not_closed_within_s": {"count": not_closed, "wait_s": args.cancel_wait_s},
        "over_100ms": sum(1 for x in latencies if x > 0.1),
        "cancel_ms": lat,
    }


# -- command line --------------------------------------------------------------------------

SCENARIOS = {
    "idle": run_idle,
    "tokens": run_tokens,
    "fanout": run_fanout,
    "ttft": run_ttft,
    "cancel": run_cancel,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--flavor", choices=FLAVORS, default="sseserver")
    p.add_argument("--server-pid", type=int, default=0, help="process to measure (RSS, CPU)")
    p.add_argument("--label", default="", help="prefix of progress lines")
    p.add_argument("--sources", type=int, default=0, help="loopback source addresses (0: auto)")
    p.add_argument("--concurrency", type=int, default=256, help="connects not yet answered")
    p.add_argument("--max-s", type=float, default=120, help="bound on the opening phase")
    # idle
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument(
        "--idle-kind",
        choices=IDLE_KINDS,
        default="generations",
        help="what each idle stream is: a /v1/stream generation with a far first token, or "
        f"a subscription to topic {IDLE_TOPIC!r} (nchan: always a subscription)",
    )
    # tokens
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--interval-ms", type=float, default=20)
    p.add_argument("--ttft-ms", type=float, default=0)
    p.add_argument("--ramp-s", type=float, default=1.0, help="stream starts spread over this")
    # fanout
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--publishers", type=int, default=1)
    p.add_argument("--depth", type=int, default=4, help="POSTs in flight per publisher")
    p.add_argument("--probes", type=int, default=100, help="subscribers that time events")
    p.add_argument(
        "--rcvlowat",
        type=int,
        default=4096,
        help="SO_RCVLOWAT of the other subscribers: they wake for this many bytes at a time "
        "(1: on every event) so that counting deliveries costs the generator little",
    )
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--duration-s", type=float, default=4.0)
    p.add_argument("--drain-s", type=float, default=10.0)
    # ttft
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--target", default="", help="request target (default: a synthetic stream)")
    p.add_argument("--body", default="", help="POST this JSON body instead of a GET")
    p.add_argument("--marker", default='{"text"', help="bytes that show the first token")
    # cancel, proxy
    p.add_argument("--upstream-port", type=int, default=0, help="fake OpenAI upstream")
    p.add_argument(
        "--upstream-pid",
        type=int,
        default=0,
        help="a process on this core (fake upstream, redis-server): its CPU is reported and "
        "not counted as noise",
    )
    p.add_argument(
        "--upstream-name",
        default="upstream",
        help="prefix of that process's CPU keys (upstream_util, redis_util, ...)",
    )
    p.add_argument("--cancel-wait-s", type=float, default=2.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Meter.upstream_pid = args.upstream_pid
    Meter.upstream_name = args.upstream_name
    try:
        import uvloop
    except ImportError:  # pragma: no cover - bench extra installs it
        loop_factory = asyncio.new_event_loop
    else:
        loop_factory = uvloop.new_event_loop
    progress = Progress(args.label or args.scenario)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(SCENARIOS[args.scenario](args, progress))
    result = {"scenario": args.scenario, **result}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
