"""What forwarding to Redis costs an instance, in process: generation tokens dispatched
through the memory hub alone and through the Redis hub (whose outbox writes them to a
real redis-server), so that the difference is the outbox's CPU per update.

``--topics`` generations each put a token every few loop iterations, ``--per-write``
tokens every 2 ms in all (about what a write carries in bench.scaleout: 3,000 tokens/s,
a write at most every 2 ms). Rows, measured in alternation (the machine is noisy; the
median of ``--repeat`` runs each):

- ``memory``: the memory hub, no Redis — the baseline;
- ``redis, 1 per call``: one script call per entry (what a Redis Cluster takes);
- ``redis, 128 per call``: one call per 128 entries (what one redis-server takes).

    python -m bench.outbox                    # results/OUTBOX.md
    python -m bench.outbox --per-write 30     # bigger writes: the cost per write shows
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench.harness import RESULTS
from sseserver.generations import _text_frame
from sseserver.hub.base import Hub
from sseserver.hub.memory import MemoryHub
from sseserver.hub.redis import RedisHub
from sseserver.hub.redis_outbox import PER_CALL
from tests.support.redis_server import redis_running

TICK_S = 0.002


async def cpu_per_update(hub: Hub, topics: int, per_write: int, ticks: int) -> float:
    """Process CPU µs per token dispatched (and, on Redis, written)."""
    names = [(f"streams/bench{i:04d}",) for i in range(topics)]
    seq = [0] * topics
    k = 0
    start = time.process_time()
    for _ in range(ticks):
        for _ in range(per_write):
            i = k % topics
            k += 1
            seq[i] += 1
            event_id = f"bench{i:04d}:{seq[i]}"
            hub.dispatch(hub.update_of(names[i], event_id, _text_frame(event_id, "tok ")))
        await asyncio.sleep(TICK_S)
    # Answered once Redis holds it, and so everything queued before it (the queue is in
    # order): the tokens' writes are inside the measure.
    await hub.publish(("bench/end",), "end")
    return (time.process_time() - start) / (ticks * per_write) * 1e6


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    names = ("memory", "redis, 1 per call", f"redis, {PER_CALL} per call")
    rows: dict[str, list[float]] = {name: [] for name in names}
    redis = RedisHub(url)
    await redis.start()
    try:
        for _ in range(args.repeat):
            for name in rows:
                if name == "memory":
                    hub: Hub = MemoryHub(1000, 3600.0)
                else:
                    redis.outbox.per_call = 1 if "1 per" in name else PER_CALL
                    hub = redis
                cost = await cpu_per_update(hub, args.topics, args.per_write, args.ticks)
                rows[name].append(cost)
    finally:
        await redis.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--topics", type=int, default=60)
    parser.add_argument("--per-write", type=int, default=6, help="tokens every 2 ms")
    parser.add_argument("--ticks", type=int, default=1500, help="2 ms ticks per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "OUTBOX.md"))
    args = parser.parse_args(argv)
    with TemporaryDirectory(prefix="bench-outbox-") as tmp, redis_running(Path(tmp)) as server:
        rows = uvloop.run(measure(server.url, args))
    base = statistics.median(rows["memory"])
    lines = [
        "| hub | µs CPU per update (median) | runs | added by Redis |",
        "|---|---|---|---|",
    ]
    for name, runs in rows.items():
        median = statistics.median(runs)
        added = "" if name == "memory" else f"{median - base:.1f}"
        listed = ", ".join(f"{r:.1f}" for r in runs)
        lines.append(f"| {name} | {median:.1f} | {listed} | {added} |")
    report = "\n".join(lines)
    print(report)
    Path(args.out).write_text(
        "# The Redis hub's outbox, in process (python -m bench.outbox)\n\n"
        f"{args.topics} topics, {args.per_write} tokens every 2 ms, {args.ticks} ticks a run; "
        f"rows in alternation, the median of {args.repeat} runs\n\n" + report + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
