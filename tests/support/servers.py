"""In-process servers on free loopback ports, composed exactly as production does
(``sseserver.cli.compose``), shut down in phases on exit: one way to run one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from sseserver import cli
from sseserver.config import Config
from sseserver.http.server import Server
from sseserver.web.context import Context


@asynccontextmanager
async def app_server(
    config: Config | None = None, **overrides: Any
) -> AsyncIterator[tuple[Server, Context]]:
    """The server and its application ``Context`` (generations, hub), for white-box
    assertions."""
    config = replace(config or Config(), port=0, **overrides).validate()
    server, ctx = cli.compose(config, environ={})
    await server.start()
    try:
        yield server, ctx
    finally:
        await server.shutdown()


@asynccontextmanager
async def running_server(config: Config | None = None, **overrides: Any) -> AsyncIterator[Server]:
    """The server alone."""
    async with app_server(config, **overrides) as (server, _ctx):
        yield server
