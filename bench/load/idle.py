"""idle: N open streams held with nothing to send — the server's memory per stream and
how fast it opens them."""

from __future__ import annotations

import argparse
import asyncio
import resource
from typing import Any

from bench.load.addressing import get_request, stream_target, sub_target
from bench.load.meters import Meter, now, proc_rss_kb
from bench.load.streams import Dialer, HTTPStream, Progress, forever, open_many
from tests.support.procs import raise_nofile

IDLE_KINDS = ("generations", "subscriptions")
IDLE_TOPIC = "idle"  # nobody publishes to it


class IdleStream(HTTPStream):
    """A stream held open; counts, class-wide, those the server drops while held."""

    lost_after_open = 0  # class-wide: streams the server closed while we held them
    closing = False

    def on_lost(self) -> None:
        if self.status == 200 and not IdleStream.closing:
            IdleStream.lost_after_open += 1


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
        forever(factory),
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
