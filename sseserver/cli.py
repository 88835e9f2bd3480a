"""The composition root: configuration, providers, hub, routes and the server."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack

from .config import Config, MiB, load_config
from .generations import Generation, Generations
from .http.heartbeat import Ticked
from .http.loops import loop_factory
from .http.server import Server
from .http.stream import EventStream
from .http.workers import supervise
from .hub import SharedHub, load_hub
from .hub.presence import RedisPresence
from .logs import configure_logging
from .metrics import MULTIPROC_ENV, Metrics, disconnect_reason, stream_kind
from .routes import compat, mercure, ops, streams, test_stream
from .web.app import Application
from .web.auth import Authenticator
from .web.context import Context, configured_providers
from .web.middleware import CORS, Guard, request_id
from .web.ratelimit import ClientAddress, ConcurrencyLimiter, WindowLimiter

log = logging.getLogger("sseserver")

GC_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


def build(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Application, Context]:
    """Wire the application for ``config`` (also used by tests and benchmarks)."""
    env = dict(os.environ if environ is None else environ)
    hub = load_hub(
        config.hub,
        history=config.history,
        history_age_s=config.history_age_s,
        history_bytes=config.history_bytes,
        resume_window_s=config.resume_window_s,
    )
    generations = Generations(hub, resume_grace_s=config.resume_grace_s)
    ctx = Context(config, hub, generations, configured_providers(config, env))
    shared = hub if isinstance(hub, SharedHub) else None
    if shared is not None:  # an optional capability: presence across instances
        generations.share(RedisPresence(lambda: shared.redis, config.resume_grace_s))
    generations.observer = observe_generation(ctx.metrics)
    app = Application()
    auth = Authenticator(
        secret=config.jwt_secret,
        public_key=config.jwt_public_key,
        audience=config.jwt_audience,
        issuer=config.jwt_issuer,
        public_url=config.public_url,  # the Mercure hub's resource identifier (aud)
    )
    redis = shared.redis if shared is not None else None
    if config.max_streams_per_subject:
        ctx.stream_limiter = ConcurrencyLimiter(config.max_streams_per_subject, redis)
    app.middlewares.append(request_id)
    if config.cors_origins:
        app.middlewares.append(CORS(config.cors_origins))
    app.middlewares.append(
        Guard(
            auth,
            ClientAddress(config.trusted_proxies),
            ctx.metrics,
            WindowLimiter(config.rate, redis) if config.rate else None,
            ctx.stream_limiter,
        )
    )
    ops.register(app, ctx)
    streams.register(app, ctx)
    mercure.register(app, ctx)
    compat.register(app, ctx)
    if config.test_endpoints:  # never on by default (SPEC §6)
        test_stream.register(app, ctx)
    return app, ctx


def observe_generation(metrics: Metrics) -> Callable[[Generation, str], None]:
    def observe(gen: Generation, what: str) -> None:
        if what == "first_token" and gen.ttft_ms is not None:
            metrics.first_token(gen.provider.name, gen.ttft_ms / 1000)
        elif what == "end":
            metrics.generation_ended(gen.provider.name, gen.tokens, gen.error_code)

    return observe


def observe_responses(server: Server, metrics: Metrics) -> None:
    state = server.state

    def response_done(stream: EventStream) -> None:
        metrics.child(metrics.requests, str(stream.status)).inc()
        if stream.request.method != "HEAD" and stream.status == 200 and stream.close_reason:
            metrics.bytes_out.inc(stream.bytes_sent)
            metrics.stream_duration.observe(time.monotonic() - stream.request.received_at)
            metrics.child(metrics.disconnects, disconnect_reason(stream.close_reason)).inc()
            if stream.close_reason == "slow_client":
                metrics.slow_drops.inc()

    def count_stream(stream: Ticked, delta: int) -> None:
        metrics.child(metrics.open_streams, stream_kind(stream.request.path)).inc(delta)

    state.on_response_done = response_done
    state.on_connections = metrics.open_connections.inc
    state.streams.on_count = count_stream


def compose(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Server, Context]:
    """The server for ``config`` and the application context behind it (tests and
    benchmarks look inside it). What starts with the server stops with it, in reverse
    order: one exit stack, not two lists kept in step by hand."""
    app, ctx = build(config, environ)
    presence = ctx.generations.presence
    resources = AsyncExitStack()

    async def on_startup() -> None:
        await ctx.hub.start()
        resources.push_async_callback(ctx.hub.aclose)
        if presence is not None:
            await presence.start()
            resources.push_async_callback(presence.aclose)
        if ctx.stream_limiter is not None:
            resources.push_async_callback(ctx.stream_limiter.aclose)
        for provider in ctx.providers.values():
            resources.push_async_callback(provider.aclose)

    async def on_shutdown() -> None:
        await ctx.generations.shutdown(config.shutdown_grace_s)
        ctx.hub.close_all("shutdown")
        await resources.aclose()

    server = Server(config, app, on_startup=on_startup, on_shutdown=on_shutdown)
    ctx.server_state = server.state  # /readyz reads whether the server is shutting down
    observe_responses(server, ctx.metrics)
    observe_history(server, ctx)
    return server, ctx


def make_server(config: Config, environ: Mapping[str, str] | None = None) -> Server:
    return compose(config, environ)[0]


def observe_history(server: Server, ctx: Context) -> None:
    """History bytes change with every event: read at each scrape, and on the shared
    tick too, so that other workers' figures (summed by the scraped one) stay fresh."""
    metrics, hub = ctx.metrics, ctx.hub
    shared = hub if isinstance(hub, SharedHub) else None

    def refresh() -> None:
        metrics.history_bytes.set(hub.held_bytes)
        if shared is not None:
            metrics.shared_hub(len(shared.followed), shared.taken, shared.dropped)

    metrics.before_scrape.append(refresh)
    server.state.streams.on_tick = refresh


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ)
    except ValueError as exc:
        print(f"sseserver: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if not (config.jwt_secret or config.jwt_public_key):
        log.warning("authentication is off: anyone who can reach this port can stream")
    elif config.public_url is None:
        log.warning(
            "--public-url is not set: a Mercure access token's audience is checked against "
            "the Host each request names; set it to the address clients use"
        )
    if config.workers > 1:
        if config.port == 0:
            print("sseserver: --workers needs a fixed --port", file=sys.stderr)
            return 2
        if not os.environ.get(MULTIPROC_ENV):  # metrics summed over the workers
            os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="sseserver-metrics-")
        return supervise(
            config.workers, lambda _index: serve(config), grace_s=config.shutdown_grace_s
        )
    return serve(config)


def tune_gc() -> None:
    """Keep the cyclic collector off the hot path: what exists at start-up is moved out of
    its reach, and young collections run far less often. Streams create short-lived
    acyclic objects (frames, updates) that reference counting frees at once, so the
    default threshold of 700 only buys pauses that land as token lateness."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 1000)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 * MiB


def tune_malloc() -> None:
    """Give big blocks back to the system when they are freed. A hub holding hundreds of
    MiB of history has tables of tens of MiB that are rebuilt as they grow; glibc would
    raise its mmap threshold after freeing the first and serve the next from the heap,
    where a freed table stays in RSS for good (measured: +60 MiB over a 256 MiB budget,
    then flat). A fixed threshold keeps such blocks mmapped, so RSS follows what is held.
    Nothing to do off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def serve(config: Config) -> int:
    """Run one server process until SIGTERM/SIGINT; the exit code."""
    try:
        server = make_server(config)
    except ValueError as exc:
        print(f"sseserver: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    tune_malloc()
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        return runner.run(server.serve())
