"""Fan-out: one topic, many subscribers, publishers as fast as the server accepts."""

from __future__ import annotations

from typing import Any

from bench.servers import SERVERS
from bench.session import Bench


def run(bench: Bench, name: str) -> None:
    s = bench.settings
    redis = SERVERS[name].redis
    for n in s.redis_fanout_subscribers if redis else s.fanout_subscribers:
        for pubs in s.fanout_publishers:
            variant = f"{n // 1000}k x{pubs}pub"
            bench.say(f"{name} fanout {variant}")

            def attempt(n: int = n, pubs: int = pubs) -> dict[str, Any]:
                with bench.server(name) as srv:
                    return bench.loadgen(
                        srv,
                        "fanout",
                        [
                            *("--subscribers", n, "--publishers", pubs),
                            *("--duration-s", s.fanout_duration_s),
                        ],
                        timeout_s=240 + s.fanout_duration_s,
                        profile_as=f"fanout_{n // 1000}k_{pubs}pub" if bench.profile else "",
                    )

            r = bench.measure(f"{name} fanout {variant}", attempt, lambda r: False)
            bench.say(
                f"{name} fanout {variant}: {r['deliveries_per_s']:.0f} deliveries/s, "
                f"p99 {r['latency_ms'].get('p99')} ms, "
                f"{r['server_cpu_us_per_delivery']} us/delivery, "
                f"server {r['cpu'].get('server_util', 0):.0%} / "
                f"generator {r['cpu']['gen_util']:.0%} cpu"
                + (f" + redis-server {r['cpu'].get('redis_util', 0):.0%}" if redis else "")
            )
            bench.record("fanout", variant, name, r)
