"""TTFT: request sent to first token, on fresh and on kept-alive connections."""

from __future__ import annotations

from typing import Any

from bench.session import Bench


def run(bench: Bench, name: str) -> None:
    bench.say(f"{name} ttft: {bench.settings.ttft_requests} fresh + keep-alive requests")

    def attempt() -> dict[str, Any]:
        with bench.server(name) as srv:
            return bench.loadgen(
                srv,
                "ttft",
                ["--requests", bench.settings.ttft_requests],
                timeout_s=300,
                profile_as="ttft" if bench.profile else "",
            )

    r = bench.measure(f"{name} ttft", attempt, lambda r: False)
    bench.say(
        f"{name} ttft: fresh p50 {r['fresh_ms'].get('p50')} ms / p99 "
        f"{r['fresh_ms'].get('p99')} ms, keep-alive p50 {r['keepalive_ms'].get('p50')} ms"
        f" / p99 {r['keepalive_ms'].get('p99')} ms"
    )
    bench.record("ttft", "tokens=1", name, r)
