"""Tokens: concurrent 50 token/s streams, ramped to the largest count held as a user sees it."""

from __future__ import annotations

from typing import Any

from bench.session import Bench, _main_cpu
from bench.settings import DELIVERED_SHARE, FIRST_EVENT_BOUND_MS, LATENESS_BOUND_MS


def run(bench: Bench, name: str) -> None:
    s = bench.settings
    steps: list[dict[str, Any]] = []

    def step(n: int) -> bool:
        bench.say(f"{name} tokens: {n} streams x {s.token_count} tokens at 50/s")

        def attempt() -> dict[str, Any]:
            with bench.server(name) as srv:
                return bench.loadgen(
                    srv,
                    "tokens",
                    ["--streams", n, "--tokens", s.token_count, "--interval-ms", 20],
                    timeout_s=120 + s.token_count * 0.02 + n / 100,
                    profile_as=f"tokens_{n}" if bench.profile else "",
                )

        r = bench.lateness_step(f"{name} tokens x{n}", attempt)
        steps.append(r)
        return bool(r["held"])

    held, failed_at = bench.ramp(s.token_steps, s.token_bisect, 50, step)
    at_held = next((r for r in steps if r["streams"] == held and r["held"]), None)
    at_fail = next((r for r in steps if r["streams"] == failed_at), None)
    metrics = {
        "max_streams_held": held,
        "failed_at": failed_at or None,
        "p99_ms_at_held": at_held["steady_lateness_ms"].get("p99") if at_held else None,
        "p99_ms_at_held_incl_opening": at_held["lateness_ms"].get("p99") if at_held else None,
        "events_per_s_at_held": at_held["delivered_events_per_s"] if at_held else None,
        "offered_events_per_s_at_held": (at_held["offered_events_per_s"] if at_held else None),
        "first_event_p99_ms_at_held": (at_held["first_event_ms"].get("p99") if at_held else None),
        "delivered_share_at_held": at_held["delivered_share"] if at_held else None,
        "server_util_at_held": at_held["cpu"].get("server_util") if at_held else None,
        "gen_util_at_held": at_held["cpu"]["gen_util"] if at_held else None,
        "gen_util_at_fail": _main_cpu(at_fail)["gen_util"] if at_fail else None,  # type: ignore[index]
        "server_util_at_fail": _main_cpu(at_fail).get("server_util") if at_fail else None,  # type: ignore[union-attr]
        "bound": LATENESS_BOUND_MS,
        "first_event_bound": FIRST_EVENT_BOUND_MS,
        "delivered_share_bound": DELIVERED_SHARE,
        "tokens_per_stream": s.token_count,
        "steps": steps,
    }
    bench.record("tokens", "50/s", name, metrics)
