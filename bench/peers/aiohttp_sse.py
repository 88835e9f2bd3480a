"""Peer: aiohttp's web server (on uvloop) with web.StreamResponse.

Same endpoint semantics as sseserver for the benchmarks:
    GET  /v1/stream?tokens&interval_ms&size&ttft_ms   synthetic answer, absolute deadlines
    GET  /sub?topic=T                                 subscribe (in-memory fan-out)
    POST /pub  (form: topic, data)                    publish; answers the event id
    GET  /healthz

    python bench/peers/aiohttp_sse.py --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets

import uvloop
from aiohttp import web

WORDS = ("stream", "token", "event", "server", "browser", "answer", "model", "socket")
QUEUE_BOUND = 1024  # events a subscriber may lag behind before it is dropped
PING_S = 15
PING = b": ping\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}

streams: set[web.StreamResponse] = set()  # open event streams, pinged by one timer
topics: dict[str, set[asyncio.Queue[bytes | None]]] = {}
last_id = 0


def token_text(i: int, size: int) -> str:
    word = WORDS[i % len(WORDS)] + " "
    return word if not size else (word * (size // len(word) + 1))[:size]


def event(data: str, *, id: str | None = None, name: str | None = None) -> bytes:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if name is not None:
        lines.append(f"event: {name}")
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    streams.add(response)
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    q = request.query
    tokens = int(float(q.get("tokens") or 32))
    interval = float(q.get("interval_ms") or 30) / 1000
    size = int(float(q.get("size") or 0))
    ttft = float(q.get("ttft_ms") or 0) / 1000
    gen = secrets.token_urlsafe(12)
    response = await open_stream(request)
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        start_event = {"id": gen, "provider": "synthetic", "model": "synthetic-1"}
        await response.write(event(json.dumps(start_event), id=f"{gen}:0", name="start"))
        first = None
        for i in range(tokens):
            delay = start + ttft + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if first is None:
                first = loop.time()
            await response.write(
                event(json.dumps({"text": token_text(i, size)}), id=f"{gen}:{i + 1}")
            )
        end = loop.time()
        metrics = {
            "ttft_ms": round(((first or end) - start) * 1000, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / (end - start), 2) if end > start else 0,
            "duration_ms": round((end - start) * 1000, 2),
        }
        await response.write(event(json.dumps(metrics), id=f"{gen}:{tokens + 1}", name="metrics"))
        await response.write(event("[DONE]", id=f"{gen}:{tokens + 2}"))
        await response.write_eof()
    finally:
        streams.discard(response)
    return response


async def subscribe(request: web.Request) -> web.StreamResponse:
    topic = request.query.get("topic")
    if not topic:
        raise web.HTTPBadRequest(text="topic is required")
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_BOUND)
    topics.setdefault(topic, set()).add(queue)
    response = await open_stream(request)
    try:
        await response.write(b"retry: 2000\n: subscribed\n\n")
        while True:
            item = await queue.get()
            if item is None:
                break
            await response.write(item)
    finally:
        streams.discard(response)
        topics.get(topic, set()).discard(queue)
    return response


async def publish(request: web.Request) -> web.Response:
    global last_id
    form = await request.post()
    topic = form.get("topic")
    if not isinstance(topic, str) or not topic:
        raise web.HTTPBadRequest(text="topic is required")
    last_id += 1
    data = "\n".join(str(d) for d in form.getall("data", [""]))
    encoded = event(data, id=str(last_id))  # encoded once for every subscriber
    subscribers = topics.get(topic, set())
    for queue in list(subscribers):
        try:
            queue.put_nowait(encoded)
        except asyncio.QueueFull:  # a slow subscriber: drop it, it may reconnect
            subscribers.discard(queue)
            queue.get_nowait()
            queue.put_nowait(None)
    return web.Response(text=str(last_id))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def heartbeat(app: web.Application) -> None:
    while True:
        await asyncio.sleep(PING_S)
        for response in list(streams):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(PING)


async def background(app: web.Application):  # type: ignore[no-untyped-def]
    task = asyncio.get_running_loop().create_task(heartbeat(app))
    yield
    task.cancel()


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/sub", subscribe)
    app.router.add_post("/pub", publish)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(background)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        backlog=4096,
        print=None,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
