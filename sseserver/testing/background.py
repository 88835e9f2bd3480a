"""An in-process sseserver on a free loopback port, run by a background thread on an event
loop of its own, so that sync tests and asyncio tests (whatever their loop) can both talk
to it. Composed exactly as production is (``cli.compose``), with the test endpoints on.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from ..wire.scenario_body import Expected

if TYPE_CHECKING:
    from ..config import Config
    from ..http.server import Server
    from ..hub.base import Hub
    from ..web.context import Context

T = TypeVar("T")

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
# A test's server stops as its test ends: streams still open are cut at once (grace 0)
# rather than given the production default of 10 s to finish.
DEFAULTS: Mapping[str, Any] = {"test_endpoints": True, "shutdown_grace_s": 0.0}


def query_string(params: Mapping[str, Any]) -> str:
    """``key=value&…`` for scenario and stream parameters: True/False as 1/0, lists and
    tuples comma-joined, None left out."""
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, list | tuple | set | frozenset):
            text = ",".join(str(v) for v in (sorted(value) if isinstance(value, set) else value))
        else:
            text = str(value)
        pairs.append((name, text))
    return urlencode(pairs, quote_via=quote)


class SSEServer:
    """A running server: URLs for its endpoints, and its insides for white-box checks.

    ``scenario(**params)`` gives the URL of a scripted wire scenario
    (``/v1/test/stream``), ``stream(**params)`` one synthetic model answer
    (``/v1/stream``), ``mercure(*topics)`` a hub subscription; ``publish`` sends an update
    to the hub.
    """

    def __init__(self, server: Server, context: Context, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.context = context
        self.loop = loop
        self.host = HOST
        self.port = server.port
        self.base_url = f"http://{HOST}:{self.port}"

    @property
    def config(self) -> Config:
        return self.context.config

    @property
    def hub(self) -> Hub:
        return self.context.hub

    def url(self, path: str = "/", **params: Any) -> str:
        query = query_string(params)
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    def scenario(self, **params: Any) -> str:
        """The URL of a scripted scenario, e.g. ``scenario(line_endings="crlf", split=1)``."""
        return self.url("/v1/test/stream", **params)

    def stream(self, **params: Any) -> str:
        """The URL of a synthetic answer (``tokens``, ``interval_ms``, ``size``,
        ``ttft_ms``, ``q``), as the browser demo's ``EventSource`` opens it."""
        params.setdefault("provider", "synthetic")
        return self.url("/v1/stream", **params)

    def mercure(self, *topics: str, **params: Any) -> str:
        """The URL that subscribes to ``topics`` on the hub (Mercure's ``topic=``)."""
        query = urlencode([("topic", t) for t in topics], quote_via=quote)
        extra = query_string(params)
        return f"{self.base_url}/.well-known/mercure?" + "&".join(q for q in (query, extra) if q)

    def publish(
        self,
        topic: str,
        data: str,
        *,
        id: str | None = None,
        type: str | None = None,
        retry: int | None = None,
        timeout: float = 10.0,
    ) -> str:
        """Publish one update to the hub (Mercure's form POST); its id. Blocking: from an
        asyncio test, run it with ``asyncio.to_thread``."""
        form = {"topic": topic, "data": data, "id": id, "type": type, "retry": retry}
        body = urlencode({k: v for k, v in form.items() if v is not None}).encode()
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request("POST", "/.well-known/mercure", body, headers)
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"publish answered {resp.status}: {text[:200]}")
        return text

    def expected(self, **params: Any) -> list[Expected]:
        """The events a client that follows the WHATWG standard dispatches from
        ``scenario(**params)`` (type, data, last event id), to compare with what a client
        under test made of it. ``lastEventID=`` resumes as the server would."""
        from ..wire.scenario import parse_scenario
        from ..wire.scenario_body import expected_events

        resume = params.pop("lastEventID", None) or params.pop("last_event_id", None)
        scenario = parse_scenario(query_string(params), last_event_id=resume)
        if scenario.status != 200 or (scenario.after and scenario.after >= scenario.events):
            return []
        return expected_events(scenario)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop (e.g. ``hub`` methods) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def status(self, path: str) -> tuple[int, Any]:
        """GET ``path``: (status, JSON body or text), for quick checks."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Whatever the shutdown left (none, normally) is cancelled, not abandoned.
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@contextmanager
def serve_in_background(
    config: Config | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Iterator[SSEServer]:
    """Start a server on a free loopback port in a background thread; stop it (in phases,
    as SIGTERM would) on leaving the ``with``.

    Args:
        config: the options (defaults: ``Config()``), then ``overrides`` on top, e.g.
            ``heartbeat_s=1``. The test endpoints are on unless ``test_endpoints=False``.
        environ: the environment the providers read (API keys); none by default.
    """
    from ..cli import compose  # imported here: a plugin that is never used costs nothing
    from ..config import Config

    options = {**DEFAULTS, **overrides, "host": HOST, "port": 0}
    cfg = replace(config or Config(), **options).validate()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="sseserver", daemon=True)
    thread.start()
    try:

        async def start() -> tuple[Server, Context]:
            server, ctx = compose(cfg, environ=dict(environ or {}))
            await server.start()
            return server, ctx

        server, ctx = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
        try:
            yield SSEServer(server, ctx, loop)
        finally:
            stop = asyncio.run_coroutine_threadsafe(server.shutdown(), loop)
            stop.result(cfg.shutdown_grace_s * 2 + START_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
