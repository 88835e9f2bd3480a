"""Cancel: client disconnect to upstream connection closed (SPEC §7: within 100 ms)."""

from __future__ import annotations

from typing import Any

from bench.scenarios.proxy import OPENAI_Q, prerequisites, proxied
from bench.session import Bench


def run(bench: Bench, name: str) -> None:
    """Client disconnect -> upstream connection closed, measured by the fake upstream
    at its socket (SPEC §7: within 100 ms)."""
    why = prerequisites("python")
    if why:
        bench.record("cancel", "openai", name, None, skipped=why)
        return
    n = max(30, bench.settings.ttft_requests // 6)
    bench.say(f"{name} cancel: {n} streams disconnected after their first token")

    def attempt() -> dict[str, Any]:
        with proxied(bench, name) as (srv, up):
            return bench.loadgen(
                srv,
                "cancel",
                [
                    *("--requests", n, "--upstream-port", up.port),
                    *("--target", OPENAI_Q.format("tokens%3D100000%20interval_ms%3D20")),
                ],
                timeout_s=300,
            )

    r = bench.measure(f"{name} cancel", attempt, lambda r: False)
    bench.say(
        f"{name} cancel: upstream closed p50 {r['cancel_ms'].get('p50')} ms, "
        f"p99 {r['cancel_ms'].get('p99')} ms after the client left; "
        f"{r['over_100ms']} over 100 ms, {r['not_closed_within_s']['count']} not closed"
    )
    bench.record("cancel", "openai", name, r)
