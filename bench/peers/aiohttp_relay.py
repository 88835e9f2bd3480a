"""Peer for the relay benchmark: a plain aiohttp server (on uvloop) that relays
``POST /v1/chat/completions`` to an OpenAI-compatible upstream through aiohttp's own client.

What a developer would write in a few lines, and what sseserver's
``/v1/chat/completions`` relay is compared with (bench/scenarios/proxy.py):
- one shared ``ClientSession`` (its ``TCPConnector`` keeps upstream connections alive and
  reuses them; no cap on their number, as sseserver's pool has none: one per stream);
- the request body goes upstream as it came (not parsed), with the client's
  ``Authorization`` (else ``Bearer $OPENAI_API_KEY``);
- a ``text/event-stream`` answer is passed through as it comes, bytes untouched
  (``resp.content.iter_any()`` -> ``StreamResponse.write``, chunked to the client); any
  other answer (a whole ``chat.completion``, an error) is read and sent back whole, with its
  status;
- when the client leaves, aiohttp cancels the handler, which releases (closes) the upstream
  connection.

    GET  /healthz
    POST /v1/chat/completions     (also /chat/completions)

    python bench/peers/aiohttp_relay.py --port 8003 --upstream http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import os

import aiohttp
import uvloop
from aiohttp import web

SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {
        "Content-Type": "application/json",
        "Accept": request.headers.get("Accept", "application/json"),
        "Authorization": request.headers.get("Authorization")
        or f"Bearer {os.environ.get('OPENAI_API_KEY', 'sk-none')}",
    }
    session = request.app[SESSION]
    try:
        up = await session.post(
            request.app[UPSTREAM] + "/chat/completions", data=body, headers=headers
        )
    except aiohttp.ClientError as exc:
        return web.json_response(
            {"error": {"message": f"upstream unreachable: {exc}", "type": "upstream_error"}},
            status=502,
        )
    done = False  # the answer read to its end: the connection goes back to the pool
    try:
        content_type = up.headers.get("Content-Type", "application/json")
        if up.status != 200 or not content_type.startswith("text/event-stream"):
            raw = await up.read()
            done = True
            return web.Response(status=up.status, body=raw, headers={"Content-Type": content_type})
        response = web.StreamResponse(headers={**SSE_HEADERS, "Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        async for piece in up.content.iter_any():
            await response.write(piece)
        done = True
        await response.write_eof()
        return response
    finally:
        if done:
            up.release()
        else:  # the client left (the handler is cancelled) or a write failed
            up.close()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def client_session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        auto_decompress=False,
    ) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(client_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument(
        "--upstream",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1"),
        help="the OpenAI-compatible base URL ({base}/chat/completions)",
    )
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
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
