"""cancel: a client disconnects after its first token; time until the fake upstream sees
its own connection closed (SPEC §7)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bench.load.addressing import get_request
from bench.load.meters import now, percentiles
from bench.load.streams import Progress, TTFTStream


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
