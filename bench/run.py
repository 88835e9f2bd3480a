"""Benchmarks side by side: sseserver and its peers, one scenario and one server at a time.

    python -m bench.run --quick                       # a few minutes, every server
    python -m bench.run --full                        # longer: bigger counts, finer ramps
    python -m bench.run --quick --only idle,tokens --servers sseserver
    python -m bench.run --quick --only fanout --servers sseserver --profile
    python -m bench.run --quick --only proxy --servers sseserver,aiohttp-relay [--profile]
    python -m bench.run --quick --only proxy --servers sseserver --proxy-rows 'chat-*' \
        --proxy-parts streams --proxy-steps 50          # one step of 50 streams per row
    python -m bench.run --quick --only fanout --servers sseserver,sseserver-redis

For each scenario and server: start the server pinned to core 0 (``taskset -c 0``) with
RLIMIT_NOFILE raised to its hard limit, warm it up, run ``bench.loadgen`` pinned to core 1,
stop the server by its PID. Progress goes to stderr; ONE JSON line per result goes to
stdout and is appended to bench/results/results.jsonl. At the end bench/results/RESULTS.md
(scenarios as rows, servers as columns, ratio to sseserver) and PNG charts are rewritten
from the newest result of each (scenario, variant, server) of this mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import subprocess
import sys
import time

from bench import harness
from bench.harness import ROOT, raise_nofile
from bench.report import closing_note, latest_records, write_charts, write_report
from bench.scenarios import SCENARIOS
from bench.scenarios.proxy import ALL_ROWS, pick_rows
from bench.servers import ALL_SERVERS, SERVERS
from bench.session import Bench
from bench.settings import ALL_SCENARIOS, FULL, IDLE_KINDS, PROXY_PARTS, QUICK

# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes (default)")
    mode.add_argument("--full", action="store_true", help="bigger counts, finer ramps")
    p.add_argument("--only", default=",".join(ALL_SCENARIOS), help="scenarios, comma-separated")
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="servers, comma-separated")
    p.add_argument(
        "--profile",
        action="store_true",
        help="record sseserver with py-spy during each load (bench/results/profile_*.txt); "
        "the records are marked profiled: sampling costs the server a little",
    )
    p.add_argument("--no-report", action="store_true", help="skip RESULTS.md and charts")
    p.add_argument(
        "--fanout-subscribers",
        default="",
        help="override the mode's fan-out sizes, e.g. 10000 or 1000,10000",
    )
    p.add_argument("--idle-streams", default="", help="override the mode's idle counts, e.g. 20000")
    p.add_argument(
        "--idle-kinds",
        default=",".join(IDLE_KINDS),
        help="what idle holds: generations (rows 'idle'), subscriptions (rows 'idle-sub'), "
        "or both (default)",
    )
    p.add_argument(
        "--proxy-rows",
        default="",
        help="proxy rows to run, comma-separated names or patterns (default: all): "
        + ", ".join(ALL_ROWS),
    )
    p.add_argument(
        "--proxy-parts",
        default=",".join(PROXY_PARTS),
        help="proxy parts to run: ttft (TTFT added), streams (50 chunk/s streams held, "
        "CPU per chunk), or both (default)",
    )
    p.add_argument(
        "--proxy-steps",
        default="",
        help="override the mode's proxy ramp, e.g. 50 (one step) or 200,500",
    )
    p.add_argument(
        "--ttft-requests",
        type=int,
        default=0,
        help="override the mode's TTFT request count (proxy: a third of it, at least 50)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run servers and load generator at this nice level (e.g. -5, as root) so that "
        "other programs on a shared machine disturb the measurements less",
    )
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    bad += [s for s in args.server_list if s not in SERVERS]
    args.idle_kind_list = tuple(k.strip() for k in args.idle_kinds.split(",") if k.strip())
    bad += [k for k in args.idle_kind_list if k not in IDLE_KINDS]
    args.proxy_row_list = tuple(r.strip() for r in args.proxy_rows.split(",") if r.strip())
    bad += [r for r in args.proxy_row_list if not pick_rows((r,))]
    args.proxy_part_list = tuple(k.strip() for k in args.proxy_parts.split(",") if k.strip())
    bad += [k for k in args.proxy_part_list if k not in PROXY_PARTS]
    if bad:
        p.error(f"unknown scenario, server, proxy row or part: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(FULL if args.full else QUICK)
    if args.fanout_subscribers:
        settings.fanout_subscribers = [int(x) for x in args.fanout_subscribers.split(",")]
        settings.redis_fanout_subscribers = list(settings.fanout_subscribers)
    if args.idle_streams:
        settings.idle_streams = [int(x) for x in args.idle_streams.split(",")]
    if args.proxy_steps:
        settings.proxy_steps = [int(x) for x in args.proxy_steps.split(",")]
    if args.ttft_requests:
        settings.ttft_requests = args.ttft_requests
    settings.proxy_rows = args.proxy_row_list
    settings.proxy_parts = args.proxy_part_list
    if args.nice:
        harness.NICE[:] = ["nice", "-n", str(args.nice)]
    raise_nofile()
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench = Bench(settings, run_id, profile=args.profile, idle_kinds=args.idle_kind_list)
    started = time.monotonic()
    for scenario in args.scenarios:
        for name in args.server_list:
            spec = SERVERS[name]
            if scenario not in spec.scenarios:
                continue
            why = spec.available()
            if why:
                bench.say(f"{name}: skipped ({why})")
                bench.record(scenario, "-", name, None, skipped=why)
                continue
            try:
                SCENARIOS[scenario](bench, name)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                bench.say(f"{name} {scenario}: ERROR {exc}")
                bench.record(scenario, "-", name, None, error=str(exc)[:500])
    bench.say(f"done in {time.monotonic() - started:.0f} s")
    if not args.no_report:
        records = latest_records(settings.mode)
        charts = write_charts(records)
        report = write_report(records, settings)
        bench.say(f"wrote {report.relative_to(ROOT)} and {len(charts)} charts")
        summary = closing_note(records)
        if summary:
            print(summary, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
