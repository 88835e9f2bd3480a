"""tokens: concurrent 50 token/s streams, the lateness of each token against the
schedule its request set, and what share of the events offered was delivered in time."""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

from bench.load.addressing import get_request, post_json_request, stream_target
from bench.load.meters import Meter, now, percentiles
from bench.load.streams import TEXT, Dialer, HTTPStream, Progress
from tests.support.procs import raise_nofile

STEADY_MARGIN_S = 0.25  # after the last request of a step is sent
START = b"event: start"
FIRST_EVENT_BOUND_MS = 100.0  # a stream's first event, from its request (what a user waits)
DELIVERED_SHARE = 0.95  # of the events offered in the steady window, delivered in it
END_GRACE_S = 0.5  # after the last token is due: a token later than that is lost


class TokenStream(HTTPStream):
    """Counts text events against the schedule its request set: token i is due at
    request + ttft + i * interval, whatever the server did before answering. A server that
    holds a stream back makes every one of its tokens late, and its first event too.

    A text event is one occurrence of ``run.marker`` (``{"text"``: sseserver's and the
    peers' events; ``"content":"tok``: an OpenAI ``chat.completion.chunk`` with text); the
    first event is the first occurrence of ``run.start`` (``event: start``; ``data: `` for
    a relayed OpenAI stream, whose first event is the role chunk)."""

    def __init__(self, request: bytes, run: TokenRun) -> None:
        super().__init__(request)
        self.run = run
        self.start = run.start
        self.t_first = -1.0  # arrival of the first event (``event: start``)
        self.pre = b""
        self.tail = b""
        self.ntext = 0
        self.done = False

    def on_body(self, data: bytes) -> None:
        t = now()
        run = self.run
        if self.t_first < 0:
            start = self.start
            pre = self.pre + data
            i = pre.find(start)
            if i < 0:
                self.pre = pre[-len(start) :]
                return
            self.t_first = t
            run.first_event.append(t - self.t_sent)
            self.pre = b""
            data = pre[i:]
        scan = self.tail + data
        n = scan.count(run.marker)
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
        self.tail = scan[-run.keep :]
        if b"[DONE]" in scan and not self.done:
            self.done = True
            self.abort()  # keep-alive would be allowed; the step is over for this stream
            run.finished_one()

    def on_lost(self) -> None:
        if not self.done:
            self.done = True
            self.run.finished_one()


class TokenRun:
    """What every stream of one step shares: its schedule, the lateness lists, the
    steady window and how many streams are still running."""

    def __init__(
        self,
        streams: int,
        tokens: int,
        interval: float,
        ttft: float,
        marker: bytes = TEXT,
        start: bytes = START,
    ) -> None:
        self.tokens = tokens
        self.marker = marker
        self.start = start
        # Bytes kept between reads: a marker cut in two is found whole in the next scan, and
        # none is counted twice. Markers of 6 bytes or more, so that `[DONE]` is found too.
        if len(marker) < len(b"[DONE]"):
            raise ValueError(f"marker {marker!r}: 6 bytes or more")
        self.keep = len(marker) - 1
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
    # provider against a fake upstream told `[fake tokens=... interval_ms=...]` (proxy);
    # --body: POSTed as JSON to it instead of a GET (/v1/chat/completions), with --marker
    # and --start-marker telling its text events and its first event.
    target = args.target or stream_target(tokens, args.interval_ms, args.ttft_ms)
    if args.body:
        request = post_json_request(args.host, args.port, target, args.body.encode())
    else:
        request = get_request(args.host, args.port, target)
    dialer = Dialer(args.host, args.port, n, args.sources)
    run = TokenRun(n, tokens, interval, ttft, args.marker.encode(), args.start_marker.encode())
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
