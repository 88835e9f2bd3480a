"""What a run measures: the scenarios, their sizes per mode, the bounds a step keeps."""

from __future__ import annotations

import dataclasses

from bench.load.tokens import DELIVERED_SHARE, FIRST_EVENT_BOUND_MS

__all__ = ["DELIVERED_SHARE", "FIRST_EVENT_BOUND_MS"]

LATENESS_BOUND_MS = 50.0
ALL_SCENARIOS = ("idle", "tokens", "fanout", "ttft", "proxy", "cancel")
DEFAULT_SCENARIOS = ("idle", "tokens", "fanout", "ttft")
# idle holds either generations (/v1/stream with a far first token; records "idle") or
# subscriptions to one topic nobody publishes to (records "idle-sub"): --idle-kinds
IDLE_KINDS = {"generations": "idle", "subscriptions": "idle-sub"}
# The order of the report's rows: scenarios as recorded (idle-sub is part of idle).
REPORT_SCENARIOS = ("idle", "idle-sub", *ALL_SCENARIOS[1:])

OPENAI_CLIENTS = ("sdk", "lean")  # sseserver --openai-client (SSESERVER_OPENAI_CLIENT)
GEMINI_CLIENTS = ("sdk", "lean")  # sseserver --gemini-client (SSESERVER_GEMINI_CLIENT)
# The proxy scenario's two parts (bench.run --proxy-parts): the TTFT the relay adds, and the
# concurrent 50 chunk/s streams it holds with its CPU per chunk.
PROXY_PARTS = ("ttft", "streams")


@dataclasses.dataclass
class Settings:
    mode: str
    idle_streams: list[int]
    token_steps: list[int]
    token_count: int
    token_bisect: int
    fanout_subscribers: list[int]
    fanout_duration_s: float
    fanout_publishers: list[int]
    ttft_requests: int
    proxy_steps: list[int]  # concurrent 50 chunk/s streams relayed (each proxy row)
    proxy_bisect: int
    # sseserver-redis runs only fanout, at these subscriber counts (--fanout-subscribers
    # overrides them too)
    redis_fanout_subscribers: list[int] = dataclasses.field(default_factory=lambda: [1000])
    settle_s: float = 2.0
    # The relay's streams (issue 12): 200 chunks at 50/s (4 s), their requests spread over
    # 2 s, so that every stream is open upstream at once in the steady window (both modes).
    proxy_tokens: int = 200
    proxy_ramp_s: float = 2.0
    # bench.run --proxy-rows (row-name patterns, e.g. "chat-*"; empty: every row) and
    # --proxy-parts (of PROXY_PARTS)
    proxy_rows: tuple[str, ...] = ()
    proxy_parts: tuple[str, ...] = PROXY_PARTS


QUICK = Settings(
    mode="quick",
    idle_streams=[10_000],
    token_steps=[250, 500, 1000, 2000, 4000, 8000],
    token_count=200,  # 4 s at 50 tokens/s: 3 s of steady state after a 1 s opening ramp
    token_bisect=1,  # one step between the last count held and the first that failed
    fanout_subscribers=[1000],
    fanout_duration_s=4.0,
    fanout_publishers=[1, 4],
    ttft_requests=300,
    proxy_steps=[50, 100, 200, 300, 500, 800, 1600, 3200],  # 500: issue 12's target
    proxy_bisect=1,
)
FULL = Settings(
    mode="full",
    idle_streams=[10_000, 50_000],
    token_steps=[250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000, 16000],
    token_count=500,  # 10 s at 50 tokens/s: 9 s of steady state after the opening ramp
    token_bisect=2,
    fanout_subscribers=[1000, 10_000],
    fanout_duration_s=10.0,
    fanout_publishers=[1, 4],
    ttft_requests=2000,
    proxy_steps=[25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1200, 1600, 2400, 3200],
    proxy_bisect=2,
)
