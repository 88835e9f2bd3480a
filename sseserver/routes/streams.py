"""Model streams: ``/v1/stream`` (GET for EventSource, POST for fetch), joining a running
generation as a viewer, and cancelling one (SPEC §6, §8)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from ..generations import Generation, parse_event_id, topic_of
from ..http.request import Request
from ..http.stream import EventStream
from ..hub.base import EARLIEST, Subscription
from ..providers.base import ROLES, BadRequest, GenerationRequest, Message, Provider
from ..web.app import Application
from ..web.auth import Claims
from ..web.context import Context
from ..wire.errors import HTTPError
from ..wire.sse import DONE

# How long a resume waits for an id that another instance may not have forwarded yet.
REMOTE_CATCH_UP_S = 0.25
SYNTHETIC_PARAMS = ("tokens", "interval_ms", "size", "ttft_ms")
MAX_MODEL_NAME = 200


def last_event_id(request: Request) -> str | None:
    """The id a reconnecting client resumes after: the ``Last-Event-ID`` header, or the
    ``lastEventID`` / ``last_event_id`` query parameter (EventSource cannot set headers
    on a first connection, so links carry it in the query)."""
    return (
        request.header("last-event-id")
        or request.query_param("lastEventID")
        or request.query_param("last_event_id")
        or None
    )


def may_follow(claims: Claims | None, generation_id: str, owner: str | None) -> bool:
    """Whether the caller may watch, resume or cancel a generation (SPEC §9): anyone while
    auth is off; with JWT on, the subject that started it, or a token whose subscribe
    claim covers its topic (answers shared on purpose). Everyone else is told nothing: the
    generation is unknown to them, exactly as an id that never existed."""
    if claims is None:
        return True
    if owner is not None and claims.subject == owner:
        return True
    return claims.may_subscribe(topic_of(generation_id))


def owner_of(request: Request) -> str | None:
    claims = request.claims
    return claims.subject if claims is not None else None


def _number(name: str, value: Any, low: float, high: float) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise HTTPError(400, "bad_request", f"{name} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HTTPError(400, "bad_request", f"{name} must be a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise HTTPError(400, "bad_request", f"{name} must be between {low:g} and {high:g}")
    return number


def build_request(
    ctx: Context,
    provider_name: Any,
    model: Any,
    messages: tuple[Message, ...],
    params: Mapping[str, Any],
) -> tuple[Provider, GenerationRequest]:
    """Validate what the client asked for. Raises HTTPError 400 naming the bad field."""
    if provider_name is not None and not isinstance(provider_name, str):
        raise HTTPError(400, "bad_request", "provider must be a string")
    provider = ctx.provider(provider_name or None)
    if provider is None:
        raise HTTPError(
            400, "bad_request", f"provider: unknown or not configured: {str(provider_name)[:100]!r}"
        )
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_NAME):
        raise HTTPError(400, "bad_request", "model must be a string of at most 200 characters")
    system = params.get("system")
    if system is not None and not isinstance(system, str):
        raise HTTPError(400, "bad_request", "params.system must be a string")
    temperature = _number("temperature", params.get("temperature"), 0, 2)
    max_tokens = _number("max_tokens", params.get("max_tokens"), 1, 1_000_000)
    request = GenerationRequest(
        model=model or None,
        messages=messages,
        system=system,
        temperature=temperature,
        max_tokens=int(max_tokens) if max_tokens is not None else None,
        params={k: params[k] for k in SYNTHETIC_PARAMS if k in params},
    )
    if provider.name != "synthetic" and not any(m.role == "user" and m.content for m in messages):
        raise HTTPError(400, "bad_request", "q (or a user message) is required")
    try:
        provider.validate(request)
    except BadRequest as exc:
        raise HTTPError(400, "bad_request", exc.message) from None
    return provider, request


def parse_messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise HTTPError(400, "bad_request", "messages must be a non-empty list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise HTTPError(400, "bad_request", f"messages[{i}] must be an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise HTTPError(400, "bad_request", f"messages[{i}].role must be one of {ROLES}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if all(isinstance(t, str) for t in texts):
                content = "".join(t for t in texts if t)
        if not isinstance(content, str):
            raise HTTPError(400, "bad_request", f"messages[{i}].content must be a string")
        out.append(Message(role, content))
    return tuple(out)


def json_body(request: Request) -> dict[str, Any]:
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise HTTPError(415, "unsupported_media_type", "body must be application/json")
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "bad_request", "body must be valid JSON") from None
    except RecursionError:
        raise HTTPError(400, "bad_request", "body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_request", "body must be a JSON object")
    return body


MISSED_EVENTS = (
    '{"code":"missed_events","message":"events after this id are no longer held","retryable":false}'
)


def missed(stream: EventStream) -> None:
    """A resume whose events were dropped (SPEC §8): say so, then end like any stream
    (``[DONE]``), so a client stops instead of reconnecting into the same gap."""
    stream.send(MISSED_EVENTS, event="error")
    stream.send(DONE)
    stream.finish("missed_events")


def register(app: Application, ctx: Context) -> None:
    generations = ctx.generations
    retry_ms = ctx.config.retry_ms

    async def start(
        request: Request, stream: EventStream, provider: Provider, gen_request: GenerationRequest
    ) -> None:
        if not stream.start(retry_ms=retry_ms):
            return
        generations.start(
            provider, gen_request, stream, started_at=request.received_at, owner=owner_of(request)
        )

    async def resume(
        gen: Generation, after_seq: int, stream: EventStream, *, throttle: bool
    ) -> None:
        if gen.finished and after_seq >= gen.last_seq:
            # Past the end: 204 tells EventSource to stop reconnecting (WHATWG).
            stream.respond(204, content_type=None)
            return
        if not stream.start(retry_ms=retry_ms):
            return
        stream.log["resumed_from"] = after_seq
        if not await generations.join(gen, stream, after_seq, throttle=throttle):
            missed(stream)

    async def fetch_remote(gen_id: str, *, started: bool) -> str:
        """Load into the hub's mirror a generation another instance may run; its topic.
        With ``started``, when nothing of it is here yet its start event (``:0``) is
        awaited a moment: a reader may learn the id from the producing instance before
        that instance has forwarded the event to Redis, then ask this one."""
        topic = topic_of(gen_id)
        await ctx.hub.fetch((topic,))
        if started and not ctx.hub.held(topic):
            await ctx.hub.knows(f"{gen_id}:0", REMOTE_CATCH_UP_S)
        return topic

    async def resume_elsewhere(
        gen_id: str, after_seq: int, stream: EventStream, claims: Claims | None
    ) -> bool:
        """Resume a generation produced by another instance (Redis hub): its events are
        in this instance's mirror of the history. False when they are not (or are not
        the caller's to see)."""
        hub = ctx.hub
        last = f"{gen_id}:{after_seq}" if after_seq >= 0 else EARLIEST
        topic = await fetch_remote(gen_id, started=last == EARLIEST)
        if last == EARLIEST:
            if not hub.held(topic):
                return False
        elif not await hub.knows(last, REMOTE_CATCH_UP_S):
            return False
        if not may_follow(claims, gen_id, hub.owner(topic)):
            return False
        if hub.is_closed(topic) and hub.last_id(topic) == last:
            stream.respond(204, content_type=None)
            return True
        if not stream.start(retry_ms=retry_ms):
            return True
        stream.on_full = "drop"
        stream.detached = True
        stream.log["generation"] = gen_id
        await hub.subscribe(Subscription(stream, (topic,)), last)
        if hub.is_closed(topic):
            stream.finish("complete")
        elif (presence := generations.presence) is not None and stream.open:
            # Tell the producing instance that this reader still watches.
            presence.follow(gen_id)
            stream.on_close(lambda _stream: presence.unfollow(gen_id))
        return True

    async def try_resume(request: Request, stream: EventStream, *, throttle: bool) -> bool:
        """Resume after the client's Last-Event-ID when it names a generation known here
        (and the caller's to follow); False otherwise, as for no Last-Event-ID at all."""
        parsed = parse_event_id(last_event_id(request))
        if parsed is None:
            return False
        gen = generations.get(parsed[0])
        if gen is None:
            return await resume_elsewhere(parsed[0], parsed[1], stream, request.claims)
        if not may_follow(request.claims, gen.id, gen.owner):
            return False
        await resume(gen, parsed[1], stream, throttle=throttle)
        return True

    @app.route(["GET"], "/v1/stream", stream=True)
    async def stream_get(request: Request, stream: EventStream) -> None:
        if await try_resume(request, stream, throttle=True):
            return
        q = request.query_param("q", "") or ""
        messages = (Message("user", q),)
        params: dict[str, Any] = {k: v[0] for k, v in request.query.items() if v}
        provider, gen_request = build_request(
            ctx, request.query_param("provider"), request.query_param("model"), messages, params
        )
        await start(request, stream, provider, gen_request)

    @app.route(["POST"], "/v1/stream", stream=True)
    async def stream_post(request: Request, stream: EventStream) -> None:
        if await try_resume(request, stream, throttle=True):
            return
        body = json_body(request)
        params = body.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise HTTPError(400, "bad_request", "params must be an object")
        messages = parse_messages(body.get("messages"))
        provider, gen_request = build_request(
            ctx, body.get("provider"), body.get("model"), messages, params
        )
        await start(request, stream, provider, gen_request)

    @app.route(["GET"], "/v1/streams/{id}", stream=True)
    async def stream_join(request: Request, stream: EventStream) -> None:
        gen_id = request.params["id"]
        parsed = parse_event_id(last_event_id(request))
        if parsed is not None and parsed[0] == gen_id:
            if await try_resume(request, stream, throttle=False):
                return
        gen = generations.get(gen_id)
        if gen is None:
            if await resume_elsewhere(gen_id, -1, stream, request.claims):
                return
            raise HTTPError(404, "not_found", "no such generation")
        if not may_follow(request.claims, gen.id, gen.owner):
            raise HTTPError(404, "not_found", "no such generation")
        if not stream.start(retry_ms=retry_ms):
            return
        if not await generations.join(gen, stream, None, throttle=False):
            missed(stream)

    async def cancel_elsewhere(gen_id: str, stream: EventStream, claims: Claims | None) -> None:
        """A generation another instance runs (its events are in the hub's mirror)."""
        presence = generations.presence
        topic = topic_of(gen_id)
        if presence is not None:
            await fetch_remote(gen_id, started=True)
        if (
            presence is None
            or not ctx.hub.held(topic)
            or not may_follow(claims, gen_id, ctx.hub.owner(topic))
        ):
            raise HTTPError(404, "not_found", "no such generation")
        if ctx.hub.is_closed(topic):
            stream.respond_json(200, {"id": gen_id, "cancelled": False})
            return
        try:
            await presence.send_cancel(gen_id)
        except (ConnectionError, OSError, RedisError) as exc:
            raise HTTPError(503, "hub_unavailable", "cannot reach the hub") from exc
        stream.respond_json(200, {"id": gen_id, "cancelled": True})

    @app.route(["POST"], "/v1/streams/{id}/cancel")
    async def stream_cancel(request: Request, stream: EventStream) -> None:
        gen_id = request.params["id"]
        gen = generations.get(gen_id)
        if gen is None:
            await cancel_elsewhere(gen_id, stream, request.claims)
            return
        if not may_follow(request.claims, gen.id, gen.owner):
            raise HTTPError(404, "not_found", "no such generation")
        cancelled = generations.cancel(gen, "cancelled")
        stream.respond_json(200, {"id": gen.id, "cancelled": cancelled})
