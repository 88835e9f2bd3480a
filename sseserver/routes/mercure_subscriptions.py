"""Active subscriptions (draft-dunglas-mercure-08 §7), the hub's protected resource
metadata (§8.2, RFC 9728), and the ``Link`` cursor they carry.

Every draft-08 matcher of a subscription is announced when it starts and when it ends,
as a private update of type ``mercure`` on the topic
``{hub path}/subscriptions/{match_type}/{match}/{subscriber}``; the same documents are
served by the subscription API, to tokens granted ``subscribe`` on its URL.

Divergences, on purpose:
- Classic ``topic=`` selectors are neither announced nor listed: they have no draft-08
  matcher type (URI templates are none of ``exact`` and ``urlpattern``).
- The API lists the subscriptions of this instance only; with the Redis hub, the events
  of every instance reach every subscriber, but the listing is per instance.
- Terminated subscriptions are left out of the listings (§7.2 allows either).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from ..http.request import Request
from ..http.stream import EventStream
from ..hub.base import Hub, Matcher
from ..web.app import Application, Handler
from ..web.auth import (
    DETAIL_TYPE,
    DRAFT_COOKIE,
    MATCHER_TYPES,
    MERCURE_PATH,
    METADATA_PREFIX,
    Claims,
    challenge,
    hub_url,
)
from ..wire.errors import HTTPError
from .mercure_draft import RESERVED_TYPE, hub_path

log = logging.getLogger(__name__)

SUBSCRIPTIONS = "/subscriptions"
JSON = "application/json"


def _segment(value: str) -> str:
    """One URI template variable, percent-encoded exactly once as a whole (§7.1)."""
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Active:
    """One active subscription: one matcher of one connection."""

    match_type: str
    match: str
    subscriber: str
    payload: Any = None

    def path(self, root: str) -> str:
        return (
            f"{root}{SUBSCRIPTIONS}/{_segment(self.match_type)}/{_segment(self.match)}"
            f"/{_segment(self.subscriber)}"
        )

    def document(self, root: str, active: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.path(root),
            "type": "subscription",
            "match_type": self.match_type,
            "match": self.match,
            "subscriber": self.subscriber,
            "active": active,
        }
        if self.payload is not None:
            doc["payload"] = self.payload
        return doc


class Subscriptions:
    """The draft-08 subscriptions open on this instance, and their announcements."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._open: dict[str, list[Active]] = {}  # subscriber -> its matchers
        self._tasks: set[asyncio.Task[None]] = set()

    def open(
        self, stream: EventStream, matchers: tuple[Matcher, ...], claims: Claims | None, root: str
    ) -> str:
        """Record the subscriptions of one connection, announce them, and announce their
        end when the stream closes; the subscriber's identifier (a random URN per
        connection, which no client can choose, §7.1)."""
        subscriber = f"urn:uuid:{uuid.uuid4()}"
        seen: set[tuple[str, str]] = set()
        actives: list[Active] = []
        for m in matchers:
            if (m.type, m.pattern) in seen:  # identical matchers are one subscription
                continue
            seen.add((m.type, m.pattern))
            payload = claims.payload_for(m.pattern) if claims is not None else None
            actives.append(Active(m.type, m.pattern, subscriber, payload))
        if not actives:
            return subscriber
        self._open[subscriber] = actives
        self._announce(actives, root, active=True)

        def closed(_stream: EventStream) -> None:
            if self._open.pop(subscriber, None) is not None:
                self._announce(actives, root, active=False)

        stream.on_close(closed)
        return subscriber

    def listing(self, match_type: str | None = None, match: str | None = None) -> list[Active]:
        return [
            a
            for group in self._open.values()
            for a in group
            if (match_type is None or a.match_type == match_type)
            and (match is None or a.match == match)
        ]

    def _announce(self, actives: list[Active], root: str, *, active: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(actives, root, active))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, actives: list[Active], root: str, active: bool) -> None:
        for a in actives:
            try:
                await self.hub.publish(
                    (a.path(root),),
                    json.dumps(a.document(root, active), separators=(",", ":")),
                    event=RESERVED_TYPE,
                    private=True,  # only for tokens granted subscribe on it (§7.1)
                )
            except (ConnectionError, ValueError) as exc:  # the hub is away: lost, as live updates
                log.warning("subscription event not published: %s", exc)


def link(hub: str, last_id: str | None) -> tuple[str, str]:
    """The ``rel="mercure"`` Link with the reconciliation cursor (§7.2)."""
    cursor = (last_id or "earliest").replace("\\", "\\\\").replace('"', '\\"')
    return (
        "Link",
        f'<{hub}>; rel="mercure"; last-event-id="{cursor}"; type="{RESERVED_TYPE}"; '
        f'content-type="{JSON}"',
    )


def register(
    app: Application, hub: Hub, subscriptions: Subscriptions, public_url: str | None
) -> None:
    """The subscription API (a middleware: its ``{match}`` segment holds escaped
    slashes, which a router matching decoded paths cannot split) and the metadata."""
    api_prefix = MERCURE_PATH + SUBSCRIPTIONS

    async def subscriptions_api(request: Request, stream: EventStream, call_next: Handler) -> None:
        path = request.path
        if path != api_prefix and not path.startswith(api_prefix + "/"):
            await call_next(request, stream)
            return
        if request.method == "OPTIONS":
            stream.respond(204, headers=[("Allow", "GET, HEAD, OPTIONS")], content_type=None)
            return
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(
                405, "method_not_allowed", f"{request.method} is not allowed here",
                [("Allow", "GET, HEAD, OPTIONS")],
            )  # fmt: skip
        here = hub_url(public_url, request.header("host"))
        root = hub_path(here)
        raw = request.target.partition("?")[0]
        suffix = raw[len(MERCURE_PATH) :]  # as sent, escapes kept: the topic to authorize
        topic = root + suffix
        claims = request.claims
        if claims is not None and not claims.may_subscribe(topic):
            raise HTTPError(
                403,
                "forbidden",
                "token may not read these subscriptions",
                [challenge(request, "insufficient_scope", public_url=public_url, draft=True)],
            )
        parts = [unquote(p) for p in suffix[len(SUBSCRIPTIONS) :].split("/")[1:]]
        body: dict[str, Any]
        if not parts:
            body = _collection(topic, subscriptions.listing(), root)
        elif len(parts) == 2 and parts[0] in MATCHER_TYPES:
            body = _collection(topic, subscriptions.listing(parts[0], parts[1]), root)
        elif len(parts) == 3 and parts[0] in MATCHER_TYPES:
            found = [
                a for a in subscriptions.listing(parts[0], parts[1]) if a.subscriber == parts[2]
            ]
            if not found:
                raise HTTPError(404, "not_found", "no such subscription")
            body = found[0].document(root)
        else:
            raise HTTPError(404, "not_found", "no such subscriptions resource")
        await hub.fetch(None)  # the cursor is the hub's latest id, of any topic
        stream.respond(
            200,
            json.dumps(body).encode(),
            headers=[link(here, hub.last_id()), ("Cache-Control", "must-revalidate")],
            content_type=JSON,
        )

    app.middlewares.append(subscriptions_api)

    @app.route(["GET"], METADATA_PREFIX + MERCURE_PATH, auth="none")
    async def metadata(request: Request, stream: EventStream) -> None:
        """OAuth 2.0 protected resource metadata (RFC 9728, draft-08 §8.2)."""
        doc = {
            "resource": hub_url(public_url, request.header("host")),
            "authorization_details_types_supported": [DETAIL_TYPE],
            "bearer_methods_supported": ["header"],
            "mercure_cookie": DRAFT_COOKIE,
            "mercure_matcher_types_supported": list(MATCHER_TYPES),
            "mercure_subscriptions": True,
        }
        stream.respond(200, json.dumps(doc).encode(), content_type=JSON)


def _collection(url: str, actives: list[Active], root: str) -> dict[str, Any]:
    return {
        "id": url,
        "type": "subscriptions",
        "subscriptions": [a.document(root) for a in actives],
    }
