"""``GET /v1/test/stream``: scripted SSE wire scenarios for testing SSE clients (SPEC §6),
registered only with ``--test-endpoints``.

The scenario and every byte of its answer come from the pure ``wire.scenario`` and
``wire.scenario_wire``; this route plays the plan back on a hijacked connection (the
normal response path frames, heartbeats and keeps alive, and a scenario must control each
byte). Each planned write goes out alone with TCP_NODELAY and is drained (a write buffer
limit of 0 pauses the producer until the kernel has taken every byte) before the next, so
the planned cuts are real segment boundaries as far as the OS allows. Waits run to
absolute deadlines, so a slow drip does not drift.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from ..http.request import Request
from ..http.stream import EventStream
from ..web.app import Application
from ..web.context import Context
from ..wire.errors import HTTPError
from ..wire.scenario import describe, parse_scenario
from ..wire.scenario_wire import Plan, build_plan
from .streams import last_event_id

log = logging.getLogger("sseserver")

# Scenarios played at once per process: each holds its plan (up to about a MiB) and a
# connection, and a test suite needs a handful, so the cap is far above use, far below harm.
MAX_CONCURRENT = 32
# Socket options an already closing or non-TCP transport may refuse; a best effort.
SOCKET_OPTION_ERRORS = (OSError, AttributeError, TypeError)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def register(app: Application, ctx: Context) -> None:
    playing = 0

    @app.route(["GET"], "/v1/test/stream", auth="optional", stream=True)
    async def test_stream(request: Request, stream: EventStream) -> None:
        nonlocal playing
        try:
            scenario = parse_scenario(
                request.query,
                last_event_id=last_event_id(request),
                http10_request=request.http_version == "1.0",
                path=request.path,
            )
            plan = build_plan(scenario, head_only=request.method == "HEAD")
        except ValueError as exc:
            raise HTTPError(400, "bad_request", str(exc)) from None
        if playing >= MAX_CONCURRENT:
            raise HTTPError(
                503, "too_many_scenarios", "too many scenarios at once", [("Retry-After", "1")]
            )
        transport = stream.hijack()
        if transport is None:
            return
        stream.status = plan.status
        stream.log["scenario"] = describe(scenario)
        playing += 1
        try:
            await play(plan, transport, stream)
        finally:
            playing -= 1


async def play(plan: Plan, transport: asyncio.WriteTransport, stream: EventStream) -> None:
    """Write ``plan`` to ``transport`` write by write, then close or reset. Raises
    ClientGone when the client leaves first."""
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except SOCKET_OPTION_ERRORS:
        pass
    transport.set_write_buffer_limits(high=0, low=0)
    loop = asyncio.get_running_loop()
    due = loop.time()
    for wait_ms, data in plan.writes():
        if wait_ms:
            due += wait_ms / 1000
            await asyncio.sleep(max(0.0, due - loop.time()))
        transport.write(data)
        stream.bytes_sent += len(data)
        await stream.drain()
    if plan.end_wait_ms:
        await asyncio.sleep(max(0.0, due + plan.end_wait_ms / 1000 - loop.time()))
    if plan.end == "rst":
        stream.close_reason = "reset"
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except SOCKET_OPTION_ERRORS:
            pass
        transport.abort()
    else:
        stream.close_reason = "complete"
        transport.close()
