"""The Mercure hub on ``/.well-known/mercure``: subscribe (SSE) and publish (form POST), in
the classic protocol (``topic=`` selectors, the ``mercure`` claim, ``lastEventID``) and in
draft-dunglas-mercure-08 (``match`` / ``match_exact`` / ``match_urlpattern``, ``at+jwt``
access tokens, ``last_event_id``, ``Mercure-Last-Event-ID``), side by side: a request's
parameters and a token's ``typ`` say which protocol each speaks, and updates cross over.

Divergences from the Mercure spec, on purpose:
- When authentication is off, anyone may publish and subscribe, and private updates are
  delivered to nobody (only a token's subscribe grant can let them through).
- Classic: a ``Last-Event-ID`` that is no longer held gets an ``event: missed`` notice,
  then everything still held, so the client knows it may have lost updates. Draft-08
  subscribers learn it from ``Mercure-Last-Event-ID: earliest`` instead (§6).
- Classic: a token must cover each ``topic=`` asked for (403 otherwise). Draft-08 routing
  is free, as §4.5 says; tokens decide only which private updates get through.
- The rules draft-08 sets to protect what the hub generates (no topic in its reserved
  namespace nor ``*``, no ``mercure`` type, ids and types without control characters)
  and its 413 for publish limits hold for classic publishers too: it is one hub.
"""

from __future__ import annotations

import json

from ..http.request import Request
from ..http.stream import EventStream
from ..hub.base import EARLIEST, Subscription, any_match, matchers_of
from ..web.app import Application
from ..web.auth import Claims, challenge, draft_request, hub_url
from ..web.context import Context
from ..wire.errors import HTTPError
from . import mercure_subscriptions
from .mercure_draft import (
    FORM,
    MAX_MATCHER_LENGTH,
    MAX_MATCHERS,
    SubscribeParams,
    check_publish,
    form_pairs,
    hub_path,
    subscribe_params,
)

PATH = "/.well-known/mercure"
MAX_TOPICS = MAX_MATCHERS
MAX_TOPIC_LENGTH = MAX_MATCHER_LENGTH
# A classic ``private`` value that says "not private"; any other value, and for a draft-08
# publisher the field's mere presence, makes the update private (draft-08 §5).
NOT_PRIVATE = frozenset(("false", "off", "0", "no"))


def _first(form: dict[str, list[str]], name: str) -> str | None:
    """The first value of a form field; None when it is absent."""
    values = form.get(name)
    return values[0] if values else None


def _forbidden(request: Request, message: str, public_url: str | None, draft: bool) -> HTTPError:
    return HTTPError(
        403,
        "forbidden",
        message,
        [challenge(request, "insufficient_scope", public_url=public_url, draft=draft)],
    )


def register(app: Application, ctx: Context) -> None:
    hub = ctx.hub
    config = ctx.config
    public_url = config.public_url
    subscriptions = mercure_subscriptions.Subscriptions(hub)
    mercure_subscriptions.register(app, hub, subscriptions, public_url)

    # QUERY carries the parameters in a form body (draft-08 §3); EventSource uses GET.
    # ``--anonymous``: subscribers need no token (they get public updates only).
    @app.route(
        ["GET", "QUERY"],
        PATH,
        stream=True,
        auth="optional" if config.anonymous else "required",
    )
    async def subscribe(request: Request, stream: EventStream) -> None:
        base = hub_url(public_url, request.header("host"))
        params = subscribe_params(request, base)
        claims = request.claims
        if claims is not None and not params.draft:
            # Classic: the token must cover each topic asked for. Draft-08 routing is free
            # (§4.5): a token only decides which private updates get through.
            _check_classic_subscribe(request, params, claims, public_url)
        private = claims.private_matchers() if claims is not None else None
        sub = Subscription(stream, matchers_of(params.topics) + params.matchers, private)
        await hub.fetch(sub.selectors if sub.exact else None)
        requested = params.last_event_id
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
        headers = [("Last-Event-ID", head_id)]
        if requested is not None:
            # The event before the first one sent: the id asked for, when held (§6).
            headers.append(("Mercure-Last-Event-ID", EARLIEST if gap else requested))
        if not stream.start(headers, retry_ms=config.retry_ms):
            return
        stream.on_full = "drop"
        stream.detached = True
        stream.log["topics"] = ",".join(sub.selectors)[:200]
        if gap and not params.draft:
            stream.send(
                json.dumps(
                    {
                        "last_event_id": requested[:200] if requested else None,
                        "message": "events after this id are no longer held",
                    }
                ),
                event="missed",
            )
        await hub.subscribe(sub, replay_from)
        if params.matchers and stream.open:
            subscriptions.open(stream, params.matchers, claims, hub_path(base))

    @app.route(["POST"], PATH)
    async def publish(request: Request, stream: EventStream) -> None:
        ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != FORM:
            raise HTTPError(415, "unsupported_media_type", f"publish with {FORM}")
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "bad_request", "body must be a UTF-8 form") from None
        pairs = form_pairs(text)
        form: dict[str, list[str]] = {}
        for name, value in pairs:
            form.setdefault(name, []).append(value)
        topics = form.get("topic", [])
        if not topics or not all(topics):
            raise HTTPError(400, "bad_request", "topic is required")
        # Limits answer 413 (draft-08 §5).
        if len(topics) > MAX_TOPICS:
            raise HTTPError(413, "too_large", f"at most {MAX_TOPICS} topics")
        if any(len(t) > MAX_TOPIC_LENGTH for t in topics):
            raise HTTPError(413, "too_large", f"topic longer than {MAX_TOPIC_LENGTH} characters")
        event_id = _first(form, "id") or None
        event_type = _first(form, "type") or None
        base = hub_url(public_url, request.header("host"))
        check_publish(topics, event_id, event_type, base)
        claims = request.claims
        if claims is not None:
            if claims.draft and claims.via == "cookie":
                _check_origin(request, base, config.cors_origins)
            if not all(claims.may_publish(t) for t in topics):
                raise _forbidden(
                    request,
                    "token may not publish to these topics",
                    public_url,
                    claims.draft or draft_request(request),
                )
        # No data is empty data: the event still carries a ``data:`` line, or EventSource
        # would never dispatch it (the reference hub writes one too).
        data = "\n".join(form.get("data", ()))
        retry_raw = _first(form, "retry")
        private = _private(form.get("private"), draft=claims is not None and claims.draft)
        retry = None
        if retry_raw:
            if not retry_raw.isdigit() or not retry_raw.isascii() or len(retry_raw) > 9:
                raise HTTPError(400, "bad_request", "retry must be a non-negative integer")
            retry = int(retry_raw)
        try:
            published = await hub.publish(
                tuple(topics), data, id=event_id, event=event_type, retry=retry, private=private
            )
        except ValueError as exc:
            field = "id" if event_id and "id" in str(exc) else "type" if event_type else "data"
            raise HTTPError(400, "bad_request", f"{field}: {exc}"[:300]) from None
        except ConnectionError:
            raise HTTPError(
                503, "hub_unavailable", "the hub cannot store updates now", [("Retry-After", "1")]
            ) from None
        stream.respond(200, published.encode(), content_type="text/plain; charset=utf-8")


def _check_classic_subscribe(
    request: Request, params: SubscribeParams, claims: Claims, public_url: str | None
) -> None:
    topics = params.topics
    if claims.draft:
        allowed = all(claims.may_subscribe(t) for t in topics)
    else:
        sel = claims.subscribe
        allowed = sel is not None and all(any_match(sel, (t,)) or "*" in sel for t in topics)
    if not allowed:
        raise _forbidden(
            request, "token may not subscribe to these topics", public_url, claims.draft
        )


def _private(values: list[str] | None, *, draft: bool) -> bool:
    if values is None:
        return False
    if draft:
        return True  # present: private, whatever its value (draft-08 §5)
    return values[0].lower() not in NOT_PRIVATE


def _check_origin(request: Request, base: str, allowed: tuple[str, ...] | list[str]) -> None:
    """A publish authorized by the draft-08 cookie comes from a page of the hub's own
    origin or of an allowed one (CSRF, draft-08 §10): its Origin, or its Referer's."""
    origin = request.header("origin")
    if not origin:
        referer = request.header("referer") or ""
        scheme, _, rest = referer.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0]}" if rest else ""
    own = base.split("/.well-known/", 1)[0]
    own_origin = "/".join(own.split("/")[:3])
    # Only origins named: a CORS allowlist of "*" does not vouch for a cookie's page.
    if origin and (origin == own_origin or origin in allowed):
        return
    raise HTTPError(403, "forbidden", "a cookie-authorized publish needs an allowed Origin")
