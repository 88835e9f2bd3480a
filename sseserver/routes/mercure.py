"""The Mercure protocol on ``/.well-known/mercure``: subscribe (SSE) and publish (form POST).

Divergences from the Mercure spec, on purpose:
- When authentication is off, anyone may publish and subscribe, and private updates are
  delivered to nobody (only a JWT ``mercure.subscribe`` claim can grant them).
- A ``Last-Event-ID`` that is no longer held gets an ``event: missed`` notice, then
  everything still held, so the client knows it may have lost updates.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from ..http.request import Request
from ..http.stream import EventStream
from ..hub.base import EARLIEST, Subscription, any_match
from ..web.app import Application
from ..web.context import Context
from ..wire.errors import HTTPError
from .streams import last_event_id

PATH = "/.well-known/mercure"
MAX_TOPICS = 64
MAX_TOPIC_LENGTH = 2048
MAX_FIELDS = 1000  # topics and fields of one publish


def _check_topics(topics: list[str]) -> tuple[str, ...]:
    if not topics or not all(topics):
        raise HTTPError(400, "bad_request", "topic is required")
    if len(topics) > MAX_TOPICS:
        raise HTTPError(400, "bad_request", f"at most {MAX_TOPICS} topics")
    if any(len(t) > MAX_TOPIC_LENGTH for t in topics):
        raise HTTPError(400, "bad_request", f"topic longer than {MAX_TOPIC_LENGTH} characters")
    return tuple(topics)


def _first(form: dict[str, list[str]], name: str) -> str | None:
    """The first value of a form field; None when it is absent."""
    values = form.get(name)
    return values[0] if values else None


def register(app: Application, ctx: Context) -> None:
    hub = ctx.hub
    config = ctx.config

    @app.route(["GET"], PATH, stream=True)
    async def subscribe(request: Request, stream: EventStream) -> None:
        topics = _check_topics(request.query.get("topic", []))
        claims = request.claims
        private: tuple[str, ...] | None = None
        if claims is not None:
            allowed = claims.subscribe
            if allowed is None or not all(
                any_match(allowed, (t,)) or "*" in allowed for t in topics
            ):
                raise HTTPError(403, "forbidden", "token may not subscribe to these topics")
            private = allowed
        requested = last_event_id(request)
        replay_from: str | None
        if requested is not None and requested != EARLIEST and hub.get(requested) is None:
            replay_from, gap = EARLIEST, True
        else:
            replay_from, gap = requested, False
        head_id = (
            requested
            if requested and not gap
            else (EARLIEST if requested else (hub.last_id() or EARLIEST))
        )
        if not stream.start([("Last-Event-ID", head_id)], retry_ms=config.retry_ms):
            return
        stream.on_full = "drop"
        stream.detached = True
        stream.log["topics"] = ",".join(topics)[:200]
        if gap:
            stream.send(
                json.dumps(
                    {
                        "last_event_id": requested[:200] if requested else None,
                        "message": "events after this id are no longer held",
                    }
                ),
                event="missed",
            )
        await hub.subscribe(Subscription(stream, topics, private), replay_from)

    @app.route(["POST"], PATH)
    async def publish(request: Request, stream: EventStream) -> None:
        ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise HTTPError(
                415, "unsupported_media_type", "publish with application/x-www-form-urlencoded"
            )
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "bad_request", "body must be a UTF-8 form") from None
        try:
            form = parse_qs(
                text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS
            )
        except ValueError:
            raise HTTPError(400, "bad_request", f"form has more than {MAX_FIELDS} fields") from None
        topics = _check_topics(form.get("topic", []))
        claims = request.claims
        if claims is not None:
            allowed = claims.publish
            if allowed is None or not all(any_match(allowed, (t,)) for t in topics):
                raise HTTPError(403, "forbidden", "token may not publish to these topics")
        # No data is empty data: the event still carries a ``data:`` line, or EventSource
        # would never dispatch it (the reference hub writes one too).
        data = "\n".join(form.get("data", ()))
        event_id = _first(form, "id") or None
        event_type = _first(form, "type") or None
        retry_raw = _first(form, "retry")
        private = (form.get("private") or [""])[0].lower() in ("on", "true", "1", "yes")
        retry = None
        if retry_raw:
            if not retry_raw.isdigit() or len(retry_raw) > 9:
                raise HTTPError(400, "bad_request", "retry must be a non-negative integer")
            retry = int(retry_raw)
        try:
            published = await hub.publish(
                topics, data, id=event_id, event=event_type, retry=retry, private=private
            )
        except ValueError as exc:
            field = "id" if event_id and "id" in str(exc) else "type" if event_type else "data"
            raise HTTPError(400, "bad_request", f"{field}: {exc}"[:300]) from None
        except ConnectionError:
            raise HTTPError(
                503, "hub_unavailable", "the hub cannot store updates now", [("Retry-After", "1")]
            ) from None
        stream.respond(200, published.encode(), content_type="text/plain; charset=utf-8")
