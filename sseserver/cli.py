"""The composition root: configuration, providers, hub, routes and the server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from .app import Application
from .config import Config, load_config
from .context import Context, configured_providers
from .generations import Generations
from .hub.memory import MemoryHub
from .logs import configure_logging
from .loops import loop_factory
from .routes import mercure, ops, streams
from .server import Server

log = logging.getLogger("sseserver")


def build(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Application, Context]:
    """Wire the application for ``config`` (also used by tests and benchmarks)."""
    env = dict(os.environ if environ is None else environ)
    hub: MemoryHub
    if config.hub == "memory":
        hub = MemoryHub(config.history, config.history_age_s)
    else:
        from .hub.redis import RedisHub  # imported only when used

        hub = RedisHub(config.hub, config.history, config.history_age_s)
    generations = Generations(
        hub,
        resume_grace_s=config.resume_grace_s,
        retry_ms=config.retry_ms,
        keep_s=config.history_age_s,
    )
    ctx = Context(config, hub, generations, configured_providers(config, env))
    app = Application()
    ops.register(app, ctx)
    streams.register(app, ctx)
    mercure.register(app, ctx)
    return app, ctx


def make_server(config: Config, environ: Mapping[str, str] | None = None) -> Server:
    app, ctx = build(config, environ)

    async def on_shutdown() -> None:
        ctx.shutting_down = True
        await ctx.generations.shutdown(config.shutdown_grace_s)
        ctx.hub.close_all("shutdown")
        for provider in ctx.providers.values():
            await provider.aclose()
        await ctx.hub.aclose()

    return Server(config, app, on_startup=ctx.hub.start, on_shutdown=on_shutdown)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ)
    except ValueError as exc:
        print(f"sseserver: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if not (config.jwt_secret or config.jwt_public_key):
        log.warning("authentication is off: anyone who can reach this port can stream")
    try:
        server = make_server(config)
    except ValueError as exc:
        print(f"sseserver: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        return runner.run(server.serve())
