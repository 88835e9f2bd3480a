"""Peer: uvicorn (uvloop + httptools) + Starlette + sse-starlette's EventSourceResponse.

Same endpoint semantics as sseserver for the benchmarks:
    GET  /v1/stream?tokens&interval_ms&size&ttft_ms   synthetic answer, absolute deadlines
    GET  /sub?topic=T                                 subscribe (in-memory fan-out)
    POST /pub  (form: topic, data)                    publish; answers the event id
    GET  /healthz

    python bench/peers/uvicorn_sse.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

WORDS = ("stream", "token", "event", "server", "browser", "answer", "model", "socket")
QUEUE_BOUND = 1024  # events a subscriber may lag behind before it is dropped
PING_S = 15


def token_text(i: int, size: int) -> str:
    word = WORDS[i % len(WORDS)] + " "
    return word if not size else (word * (size // len(word) + 1))[:size]


def number(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    return float(raw) if raw else default


async def stream(request: Request) -> Response:
    tokens = int(number(request, "tokens", 32))
    interval = number(request, "interval_ms", 30) / 1000
    size = int(number(request, "size", 0))
    ttft = number(request, "ttft_ms", 0) / 1000
    gen = secrets.token_urlsafe(12)

    async def events() -> AsyncIterator[dict[str, str]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        start_event = {"id": gen, "provider": "synthetic", "model": "synthetic-1"}
        yield {"event": "start", "id": f"{gen}:0", "data": json.dumps(start_event)}
        first = None
        for i in range(tokens):
            delay = start + ttft + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if first is None:
                first = loop.time()
            yield {"id": f"{gen}:{i + 1}", "data": json.dumps({"text": token_text(i, size)})}
        end = loop.time()
        metrics = {
            "ttft_ms": round(((first or end) - start) * 1000, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / (end - start), 2) if end > start else 0,
            "duration_ms": round((end - start) * 1000, 2),
        }
        yield {"event": "metrics", "id": f"{gen}:{tokens + 1}", "data": json.dumps(metrics)}
        yield {"id": f"{gen}:{tokens + 2}", "data": "[DONE]"}

    return EventSourceResponse(events(), ping=PING_S, sep="\n")


class Hub:
    """Topics of in-memory subscriber queues; one event is encoded once per publish."""

    def __init__(self) -> None:
        self.topics: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        self.last_id = 0

    def publish(self, topic: str, data: str) -> int:
        self.last_id += 1
        encoded = ServerSentEvent(data, id=str(self.last_id), sep="\n").encode()
        for queue in list(self.topics.get(topic, ())):
            try:
                queue.put_nowait(encoded)
            except asyncio.QueueFull:  # a slow subscriber: drop it, it may reconnect
                self.topics[topic].discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
        return self.last_id


hub = Hub()


async def subscribe(request: Request) -> Response:
    topic = request.query_params.get("topic")
    if not topic:
        return PlainTextResponse("topic is required", status_code=400)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_BOUND)
    hub.topics.setdefault(topic, set()).add(queue)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield ServerSentEvent(comment="subscribed", retry=2000, sep="\n").encode()
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            subscribers = hub.topics.get(topic)
            if subscribers is not None:
                subscribers.discard(queue)

    return EventSourceResponse(events(), ping=PING_S, sep="\n")


async def publish(request: Request) -> Response:
    form = parse_qs((await request.body()).decode(), keep_blank_values=True)
    topic = (form.get("topic") or [""])[0]
    if not topic:
        return PlainTextResponse("topic is required", status_code=400)
    event_id = hub.publish(topic, "\n".join(form.get("data", [""])))
    return PlainTextResponse(str(event_id))


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/v1/stream", stream),
        Route("/sub", subscribe),
        Route("/pub", publish, methods=["POST"]),
        Route("/healthz", healthz),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
