"""Drop-in protocols for existing clients: OpenAI's ``/v1/chat/completions`` (so the
official SDKs can use sseserver as their base URL, whatever the provider behind it) and
the Vercel AI SDK UI message stream (v1) on ``/v1/chat`` (so ``useChat`` pages work).

Both run the provider in the request's own task: when the client leaves, the task is
cancelled and the upstream call with it. The response head waits for the first delta, so
an upstream that fails at once gets a real HTTP status instead of a 200 and an error.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

from ..http.request import Request
from ..http.stream import EventStream
from ..metrics import Metrics
from ..providers.base import (
    Delta,
    Message,
    PipedAnswer,
    Provider,
    ProviderError,
    RawAnswer,
    Relay,
    Usage,
    implements,
    retry_after,
    status_error,
)
from ..web.app import Application
from ..web.context import Context
from ..wire import ids
from ..wire.errors import HTTPError, error_body
from ..wire.sse import DONE, encode_event
from ..wire.sse_decode import EventDecoder
from .streams import build_request, json_body, parse_messages

DONE_EVENT = encode_event(DONE)
UI_STREAM_HEADERS = [("x-vercel-ai-ui-message-stream", "v1")]


def _data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _upstream_status(exc: ProviderError) -> int:
    if exc.code == "bad_request":
        return 400
    if exc.status in (401, 403):
        return 502  # our key is wrong: not the caller's fault
    if exc.status == 429:
        return 429
    return 504 if exc.code == "upstream_timeout" else 502


def _raise_for(exc: ProviderError) -> HTTPError:
    headers = []
    if exc.retry_after_s is not None:
        headers.append(("Retry-After", str(max(1, round(exc.retry_after_s)))))
    return HTTPError(_upstream_status(exc), exc.code, exc.message, headers)


def _pick_provider(ctx: Context, body: dict[str, Any]) -> tuple[Any, Any]:
    """``provider`` field, or a ``provider/model`` model name, or the default."""
    provider, model = body.get("provider"), body.get("model")
    if provider is None and isinstance(model, str) and "/" in model:
        prefix, _, rest = model.partition("/")
        if prefix in ctx.providers:
            provider, model = prefix, rest
    return provider, model


class _Tally:
    """TTFT and token counts of one compat stream, for its access line and the metrics
    (these streams are not generations, which count themselves)."""

    __slots__ = ("metrics", "provider", "stream", "tokens", "ttft_ms")

    def __init__(self, metrics: Metrics, provider: Provider, stream: EventStream) -> None:
        self.metrics = metrics
        self.provider = provider.name
        self.stream = stream
        self.tokens = 0
        self.ttft_ms: float | None = None

    def delta(self, delta: Delta) -> None:
        if not delta.text:
            return
        self.tokens += 1
        if self.ttft_ms is None:
            ttft_s = time.monotonic() - self.stream.request.received_at
            self.ttft_ms = round(ttft_s * 1000, 2)
            self.stream.log["ttft_ms"] = self.ttft_ms
            self.metrics.first_token(self.provider, ttft_s)

    def end(self, error_code: str | None = None) -> None:
        self.stream.log["tokens"] = self.tokens
        if error_code is not None and not self.stream.close_reason:
            self.stream.close_reason = error_code
        self.metrics.generation_ended(self.provider, self.tokens, error_code)

    async def watch(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """Pass ``deltas`` through, counting them; ends the tally however they end."""
        error: str | None = "abandoned"  # the reader stopped early (client gone)
        try:
            async with aclosing(deltas) as inner:  # type: ignore[type-var]
                async for delta in inner:
                    self.delta(delta)
                    yield delta
            error = None
        except ProviderError as exc:
            error = exc.code
            raise
        finally:
            self.end(error)


async def _first(deltas: AsyncIterator[Delta]) -> Delta | None:
    """The first delta with text (or the last one), so the head can wait for it."""
    async for delta in deltas:
        if delta.text or delta.finish_reason or delta.usage:
            return delta
    return None


def register(app: Application, ctx: Context) -> None:
    @app.route(["POST"], "/v1/chat/completions", stream=True)
    async def chat_completions(request: Request, stream: EventStream) -> None:
        body = json_body(request)
        provider_name, model = _pick_provider(ctx, body)
        chosen = ctx.provider(provider_name) if isinstance(provider_name, str | None) else None
        if chosen is not None and implements(type(chosen), Relay) and "sseserver" not in body:
            await _relay(ctx, stream, chosen, body, model)
            return
        params = {k: body[k] for k in ("temperature", "max_tokens") if body.get(k) is not None}
        if body.get("max_completion_tokens") is not None and "max_tokens" not in params:
            params["max_tokens"] = body["max_completion_tokens"]
        extra = body.get("sseserver") or {}
        if not isinstance(extra, dict):
            raise HTTPError(400, "bad_request", "sseserver must be an object")
        params.update(extra)
        messages = parse_messages(body.get("messages"))
        provider, gen = build_request(ctx, provider_name, model, messages, params)
        completion_id = "chatcmpl-" + ids.token_hex(12)
        created = int(time.time())
        model_name = gen.model or provider.default_model
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            await _openai_stream(
                stream,
                _Tally(ctx.metrics, provider, stream).watch(provider.stream(gen)),
                completion_id,
                created,
                model_name,
                include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
            )
        else:
            deltas = _Tally(ctx.metrics, provider, stream).watch(provider.stream(gen))
            await _openai_whole(stream, deltas, completion_id, created, model_name)

    @app.route(["POST"], "/v1/chat", stream=True)
    async def ui_chat(request: Request, stream: EventStream) -> None:
        body = json_body(request)
        provider_name, model = _pick_provider(ctx, body)
        messages = _ui_messages(body.get("messages"))
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        provider, gen = build_request(ctx, provider_name, model, messages, params or {})
        await _ui_stream(stream, _Tally(ctx.metrics, provider, stream).watch(provider.stream(gen)))


def _ui_messages(raw: Any) -> tuple[Message, ...]:
    """useChat sends UIMessages (``parts``); plain ``content`` is accepted too."""
    if not isinstance(raw, list) or not raw:
        raise HTTPError(400, "bad_request", "messages must be a non-empty list")
    plain = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and isinstance(item.get("parts"), list):
            text = "".join(
                p.get("text", "")
                for p in item["parts"]
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            )
            plain.append({"role": item.get("role"), "content": text})
        elif isinstance(item, dict):
            plain.append(item)
        else:
            raise HTTPError(400, "bad_request", f"messages[{i}] must be an object")
    return parse_messages(plain)


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _usage(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    return {
        "prompt_tokens": u.prompt_tokens or 0,
        "completion_tokens": u.completion_tokens or 0,
        "total_tokens": u.total_tokens or 0,
    }


async def _openai_stream(
    stream: EventStream,
    source: AsyncIterator[Delta],
    cid: str,
    created: int,
    model: str,
    *,
    include_usage: bool,
) -> None:
    async with aclosing(source) as deltas:  # type: ignore[type-var]
        try:
            first = await _first(deltas)
        except ProviderError as exc:
            raise _raise_for(exc) from None
        if not stream.start():
            return
        stream.write(_data(_chunk(cid, created, model, {"role": "assistant", "content": ""})))
        usage: Usage | None = None
        finish = "stop"
        try:
            delta = first
            while delta is not None:
                if delta.text:
                    stream.write(_data(_chunk(cid, created, model, {"content": delta.text})))
                    await stream.drain()
                usage = delta.usage or usage
                finish = delta.finish_reason or finish
                delta = await anext(deltas, None)
        except ProviderError as exc:
            stream.write(_data(json.loads(error_body(exc.code, exc.message))))
            stream.write(DONE_EVENT)
            return
        stream.write(_data(_chunk(cid, created, model, {}, finish)))
        if include_usage:
            stream.write(
                _data(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(usage),
                    }
                )
            )
        stream.write(DONE_EVENT)


async def _openai_whole(
    stream: EventStream,
    source: AsyncIterator[Delta],
    cid: str,
    created: int,
    model: str,
) -> None:
    parts: list[str] = []
    usage: Usage | None = None
    finish = "stop"
    try:
        async with aclosing(source) as deltas:  # type: ignore[type-var]
            async for delta in deltas:
                parts.append(delta.text)
                usage = delta.usage or usage
                finish = delta.finish_reason or finish
    except ProviderError as exc:
        raise _raise_for(exc) from None
    stream.respond_json(
        200,
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish,
                    "message": {"role": "assistant", "content": "".join(parts)},
                }
            ],
            "usage": _usage(usage),
        },
    )


async def _ui_stream(stream: EventStream, source: AsyncIterator[Delta]) -> None:
    async with aclosing(source) as deltas:  # type: ignore[type-var]
        try:
            first = await _first(deltas)
        except ProviderError as exc:
            raise _raise_for(exc) from None
        if not stream.start(UI_STREAM_HEADERS):
            return
        text_id = "text-" + ids.token_hex(4)
        stream.write(_data({"type": "start", "messageId": "msg-" + ids.token_hex(8)}))
        stream.write(_data({"type": "start-step"}))
        stream.write(_data({"type": "text-start", "id": text_id}))
        finish = "stop"
        try:
            delta = first
            while delta is not None:
                if delta.text:
                    stream.write(_data({"type": "text-delta", "id": text_id, "delta": delta.text}))
                    await stream.drain()
                finish = delta.finish_reason or finish
                delta = await anext(deltas, None)
        except ProviderError as exc:
            stream.write(_data({"type": "text-end", "id": text_id}))
            stream.write(_data({"type": "error", "errorText": exc.message}))
            stream.write(DONE_EVENT)
            return
        stream.write(_data({"type": "text-end", "id": text_id}))
        stream.write(_data({"type": "finish-step"}))
        stream.write(_data({"type": "finish", "finishReason": finish}))
        stream.write(DONE_EVENT)


# -- the transparent relay (SPEC §7) ----------------------------------------------------

# Fields of ours, never sent upstream.
OWN_FIELDS = ("provider", "sseserver")
# Upstream answer headers worth passing on with an error or a whole answer.
PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-request-id")


async def _relay(
    ctx: Context, stream: EventStream, provider: Provider, body: dict[str, Any], model: Any
) -> None:
    """The request to an OpenAI-compatible upstream with every field the client sent (only
    ours taken out, and a ``provider/`` prefix of the model), the answer back as it came:
    a stream's events byte for byte inside their SSE framing, a whole answer whole, the
    upstream's own 4xx refusals with their status and body. The server reads only what its
    duties need: first token, token count, the end, errors."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "bad_request", "messages must be a non-empty list")
    if model is not None and not isinstance(model, str):
        raise HTTPError(400, "bad_request", "model must be a string")
    relay = cast(Relay, provider)
    forward = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    forward["model"] = model or provider.default_model
    tally = _Tally(ctx.metrics, provider, stream)
    try:
        answer = await relay.relay(forward)
    except ProviderError as exc:
        tally.end(exc.code)
        raise _raise_for(exc) from None
    error: str | None = "abandoned"  # until the answer has been passed on
    try:
        if not 200 <= answer.status < 300:
            error = f"upstream_{answer.status}"
            await _relay_refusal(stream, answer)
        elif forward.get("stream"):
            error = await _relay_stream(stream, answer, tally)
        else:
            raw = await answer.read()
            _count_whole(tally, raw)
            stream.respond(200, raw, _passed(answer), _content_type(answer))
            error = None
    except ProviderError as exc:
        error = exc.code
        raise _raise_for(exc) from None
    finally:
        await answer.aclose()
        tally.end(error)


async def _relay_refusal(stream: EventStream, answer: RawAnswer) -> None:
    """The upstream said no. Its 4xx (the request's fault: a bad tool schema, a model it
    does not have) goes back as it came; our key refused (401, 403) or the upstream
    failing (5xx) is our error, told as such."""
    raw = await answer.read()
    status = answer.status
    if 400 <= status < 500 and status not in (401, 403):
        stream.close_reason = f"upstream_{status}"
        stream.respond(status, raw, _passed(answer), _content_type(answer))
        return
    raise _raise_for(status_error(status, retry_after(answer.headers)))


async def _relay_stream(stream: EventStream, answer: RawAnswer, tally: _Tally) -> str | None:
    """Pass the upstream's events on as they come; returns the error code it ended with."""
    if not stream.start():
        return "abandoned"
    reading = _Reading(tally)
    error: ProviderError | None = None
    if implements(type(answer), PipedAnswer):
        error = await _pipe(stream, cast(PipedAnswer, answer), reading)
    else:
        try:
            async for piece in answer:
                stream.write(piece)  # the upstream's bytes, inside our chunk framing
                reading.feed(piece)
                await stream.drain()
        except ProviderError as exc:
            error = exc
    if error is not None:
        stream.write(_data(json.loads(error_body(error.code, error.message))))
        stream.write(DONE_EVENT)
        return error.code
    if not reading.done:  # the upstream ended without [DONE]: the client still gets an end
        stream.write(DONE_EVENT)
    return None


async def _pipe(
    stream: EventStream, answer: PipedAnswer, reading: _Reading
) -> ProviderError | None:
    """The body pushed from the upstream's socket straight to the client's: the handler
    waits once, for the end, not once per chunk. A client that falls behind stops the
    upstream's socket being read until it catches up."""
    ended: asyncio.Future[ProviderError | None] = asyncio.get_running_loop().create_future()
    held = False

    def resume() -> None:
        nonlocal held
        held = False
        if not ended.done():
            answer.resume()

    def piece(data: bytes) -> None:
        nonlocal held
        stream.write(data)
        reading.feed(data)
        if stream.paused and not held:
            held = True
            answer.pause()
            stream.when_drained(resume)

    def end(error: ProviderError | None) -> None:
        if not ended.done():
            ended.set_result(error)

    answer.pipe(piece, end)
    return await ended


# An output chunk: text, a refusal or a tool call in a ``delta`` (keys are never escaped
# in JSON, so a key cannot be faked by a string's content).
OUTPUT = re.compile(r'"(?:content|refusal)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{')


class _Reading:
    """What the relay reads of the upstream's events: their ends, its output for the
    token count and TTFT, and ``[DONE]`` — never re-encoded."""

    __slots__ = ("_decoder", "done", "tally")

    def __init__(self, tally: _Tally) -> None:
        self.tally = tally
        self._decoder = EventDecoder()
        self.done = False

    def feed(self, piece: bytes) -> None:
        try:
            for _event, data in self._decoder.feed(piece):
                if data.startswith("[DONE]"):
                    self.done = True
                elif OUTPUT.search(data):
                    self.tally.delta(COUNTED)
        except UnicodeDecodeError:
            pass  # not ours to judge: the client reads what the upstream sent


COUNTED = Delta(text="\u2026")  # one token, counted


def _count_whole(tally: _Tally, raw: bytes) -> None:
    """A whole answer's completion tokens, from its usage when it tells them."""
    try:
        usage = json.loads(raw).get("usage") or {}
        tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        tokens = 0
    if tokens:
        tally.delta(COUNTED)  # the first token's time: the answer's
        tally.tokens = tokens


def _passed(answer: RawAnswer) -> list[tuple[str, str]]:
    return [(name, answer.headers[name]) for name in PASSED_HEADERS if name in answer.headers]


def _content_type(answer: RawAnswer) -> str:
    return answer.headers.get("content-type") or "application/json"
