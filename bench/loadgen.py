"""The load generator: raw asyncio Protocols on uvloop, minimal incremental SSE parsing.

One process runs one scenario against one server and prints ONE JSON object on stdout
(progress lines go to stderr). ``bench/run.py`` pins it to core 1 and the server to core 0.
This module is the command line only; the meters, requests, streams and one module per
scenario live in ``bench.load``.

    python -m bench.loadgen idle   --port 8000 --server-pid PID --streams 10000
    python -m bench.loadgen idle   ... --idle-kind subscriptions   # subscriptions to one topic
    python -m bench.loadgen tokens --port 8000 --server-pid PID --streams 1000 --tokens 150
    python -m bench.loadgen tokens ... --target "/v1/stream?provider=openai&q=..." --upstream-pid UP
    python -m bench.loadgen tokens ... --target /v1/chat/completions --body '{"stream":true,...}' \
        --marker '"content":"tok' --start-marker 'data: ' --ramp-s 2
    python -m bench.loadgen fanout --port 8000 --server-pid PID --subscribers 1000
    python -m bench.loadgen ttft   --port 8000 --server-pid PID --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from bench.load import SCENARIOS
from bench.load.addressing import FLAVORS
from bench.load.idle import IDLE_KINDS, IDLE_TOPIC
from bench.load.meters import Meter
from bench.load.streams import Progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """One parser for every scenario: ``Bench.loadgen`` passes the options its scenario uses."""
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
    # ttft (and tokens: --target, --body, --marker, --start-marker)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--target", default="", help="request target (default: a synthetic stream)")
    p.add_argument("--body", default="", help="POST this JSON body instead of a GET")
    p.add_argument(
        "--marker",
        default='{"text"',
        help="bytes that show a text event (ttft: the first token; tokens: each token)",
    )
    p.add_argument(
        "--start-marker",
        default="event: start",
        help="tokens: bytes that show a stream's first event (its first-event time)",
    )
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
    """Run one scenario on uvloop and print its result as the one JSON line on stdout."""
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
