"""Prometheus metrics (prometheus-client). Updated per connection, stream and generation,
never per event, so the fan-out hot path stays free of metric locks. With ``--workers``
the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums every worker."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client import values as prom_values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class Metrics:
    """All of the server's metrics, in a registry of their own (tests make several)."""

    def __init__(self) -> None:
        if os.environ.get(MULTIPROC_ENV) and prom_values.ValueClass is prom_values.MutexValue:
            # prometheus-client chooses per-process files or plain values when it is first
            # imported; ``--workers`` sets the directory after that, before the workers
            # build their metrics, so choose again (or each worker counts for itself).
            choose: Callable[[], Any] = prom_values.get_value_class  # unannotated upstream
            prom_values.ValueClass = choose()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        live: dict[str, Any] = {"multiprocess_mode": "livesum"}
        self.open_connections = Gauge(
            "sseserver_open_connections", "Open TCP connections", registry=r, **live
        )
        self.open_streams = Gauge(
            "sseserver_open_streams", "Open event streams, by kind", ["kind"], registry=r, **live
        )
        self.history_bytes = Gauge(
            "sseserver_history_bytes",
            "Bytes the hub's history holds (all topics; bounded by --history-bytes)",
            registry=r,
            **live,
        )
        self.hub_followed = Gauge(
            "sseserver_hub_followed_topics",
            "Topics this instance reads from Redis (its subscribers' and resumes')",
            registry=r,
            **live,
        )
        self.hub_received = Counter(
            "sseserver_hub_received",
            "Entries read from Redis (other instances' updates)",
            registry=r,
        )
        self.hub_dropped = Counter(
            "sseserver_hub_dropped",
            "Updates that never reached Redis (the outbox overflowed during an outage)",
            registry=r,
        )
        self._hub_counts = (0, 0)
        # Set before each scrape, for values that change per event (history bytes).
        self.before_scrape: list[Callable[[], None]] = []
        self.requests = Counter("sseserver_requests", "Requests answered", ["status"], registry=r)
        self.ttft = Histogram(
            "sseserver_ttft_seconds",
            "Time to first token",
            ["provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("sseserver_tokens", "Text deltas streamed", ["provider"], registry=r)
        self.generations = Counter(
            "sseserver_generations", "Generations ended", ["provider", "outcome"], registry=r
        )
        self.bytes_out = Counter(
            "sseserver_stream_bytes", "Body bytes written to streams", registry=r
        )
        self.stream_duration = Histogram(
            "sseserver_stream_duration_seconds",
            "Stream durations",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.disconnects = Counter(
            "sseserver_disconnects", "Streams ended, by reason", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "sseserver_upstream_errors", "Upstream errors", ["provider", "code"], registry=r
        )
        self.slow_drops = Counter(
            "sseserver_slow_client_drops", "Subscribers cut for reading too slowly", registry=r
        )
        self.rate_limited = Counter(
            "sseserver_rate_limited", "Requests refused with 429", ["limit"], registry=r
        )
        self.auth_failures = Counter(
            "sseserver_auth_failures", "Requests refused 401/403", ["status"], registry=r
        )

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: prometheus-client's ``labels``
        takes a lock and rebuilds its key on every call, several times per request."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def first_token(self, provider: str, ttft_s: float) -> None:
        self.child(self.ttft, provider).observe(ttft_s)

    def generation_ended(self, provider: str, tokens: int, error_code: str | None) -> None:
        self.child(self.tokens, provider).inc(tokens)
        self.child(self.generations, provider, error_code or "complete").inc()
        if error_code and error_code not in ("cancelled", "abandoned", "shutdown"):
            self.child(self.upstream_errors, provider, error_code).inc()

    def shared_hub(self, followed: int, received: int, dropped: int) -> None:
        """A Redis hub's figures, read at scrape time (its counts only grow)."""
        self.hub_followed.set(followed)
        last_received, last_dropped = self._hub_counts
        self.hub_received.inc(max(0, received - last_received))
        self.hub_dropped.inc(max(0, dropped - last_dropped))
        self._hub_counts = (received, dropped)

    def render(self) -> tuple[bytes, str]:
        """The exposition text; summed over workers in multi-process mode."""
        for refresh in self.before_scrape:
            refresh()
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            # Typed here: prometheus_client leaves MultiProcessCollector.__init__ unannotated.
            collect_into: Callable[[CollectorRegistry], object] = (
                prom_multiprocess.MultiProcessCollector
            )
            collect_into(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


STREAM_KINDS = (
    ("/v1/streams/", "viewer"),
    ("/v1/stream", "generation"),
    ("/v1/chat", "compat"),
    ("/.well-known/mercure", "subscription"),
)


def stream_kind(path: str) -> str:
    """A stream's kind for the open-streams gauge, from its endpoint."""
    for prefix, kind in STREAM_KINDS:
        if path.startswith(prefix):
            return kind
    return "other"


def disconnect_reason(close_reason: str) -> str:
    """Fold the many close reasons into the few a dashboard wants."""
    if close_reason in ("client_disconnect", "cancelled"):
        return "client"
    if close_reason == "slow_client":
        return "slow"
    if close_reason in ("shutdown", "max_duration"):
        return "shutdown" if close_reason == "shutdown" else "max_duration"
    if close_reason in ("complete", ""):
        return "complete"
    return "error"
