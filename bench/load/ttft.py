"""ttft: time from a request sent to its first text event, on a fresh connection each
time and on one kept alive."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.load.addressing import get_request, post_json_request, stream_target
from bench.load.meters import Meter, now, percentiles
from bench.load.streams import Progress, TTFTStream


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
