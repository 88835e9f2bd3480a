"""Idle: N streams held open with nothing to send — memory per stream, opening rate."""

from __future__ import annotations

from typing import Any

from bench.servers import SERVERS
from bench.session import Bench
from bench.settings import IDLE_KINDS


def run(bench: Bench, name: str) -> None:
    """N streams held open with nothing to send, of each kind in ``idle_kinds``:
    generations (/v1/stream with a far first token: recorded as ``idle``) and
    subscriptions to one topic nobody publishes to (recorded as ``idle-sub``). nchan
    has no generations: it runs the subscriptions only."""
    for kind in bench.idle_kinds:
        if kind == "generations" and SERVERS[name].flavor == "nchan":
            continue
        scenario = IDLE_KINDS[kind]
        for n in bench.settings.idle_streams:
            idle_one(bench, name, kind, scenario, n)


def idle_one(bench: Bench, name: str, kind: str, scenario: str, n: int) -> None:
    variant = f"{n // 1000}k"
    what = f"{name} {scenario} {variant}"
    bench.say(f"{what}: opening {n} idle {kind}")

    def attempt() -> dict[str, Any]:
        with bench.server(name) as srv:
            return bench.loadgen(
                srv,
                "idle",
                [
                    *("--streams", n, "--idle-kind", kind),
                    *("--settle-s", bench.settings.settle_s, "--max-s", 180),
                ],
                timeout_s=400,
                profile_as=f"{scenario.replace('-', '_')}_{variant}" if bench.profile else "",
            )

    r = bench.measure(what, attempt, lambda r: False)
    bench.say(
        f"{what}: {r['held']} {kind} held, {r['rss_per_stream_kb']:.2f} KB/stream, "
        f"{r['opened_per_s']:.0f} opened/s, {r['failures']} failures"
        + (f" [capped by {r['capped_by']}]" if r.get("capped_by") else "")
    )
    bench.record(scenario, variant, name, r)
