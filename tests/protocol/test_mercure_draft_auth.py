"""draft-dunglas-mercure-08 authorization on the hub, over real loopback sockets (§4:
presenting, validating and reading access tokens; private updates, live and on replay),
``--anonymous``, the two protocols crossing (a draft-08 publisher with a classic
subscriber, and the reverse), active subscriptions (§7) and protected resource metadata
(§8.2)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from tests.protocol.test_mercure import BOOK1, BOOK2, PATH, SECRET, nothing_more, subscribe
from tests.protocol.test_mercure import token as classic_token
from tests.protocol.test_mercure_draft import (
    DETAIL,
    HUB,
    access_token,
    auth,
    detail,
    post,
    published,
    target,
)
from tests.support.hubclient import request
from tests.support.rawhttp import Response, SSEReader, read_until_id
from tests.support.servers import app_server
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(60)

METADATA = "/.well-known/oauth-protected-resource/.well-known/mercure"
RESOURCE_METADATA = f'resource_metadata="http://127.0.0.1{METADATA}"'
AUTHOR7 = "https://example.com/users/42/books/1"


def challenge_of(resp: Response) -> str:
    value = resp.header("www-authenticate")
    assert value is not None and value.startswith("Bearer "), resp.headers
    return value


# -- §4.1 Presenting the token, §4.2 errors -----------------------------------------------


async def test_no_token_401_with_a_bare_challenge_and_metadata() -> None:
    """§4.2: no token where one is needed: 401, a Bearer challenge without an error code,
    pointing at the resource metadata."""
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        for method, path, body in [
            ("GET", target(("match", BOOK1)), b""),
            ("GET", f"{PATH}/subscriptions", b""),
        ]:
            resp = await request(server.port, method, path, body=body)
            assert resp.status == 401
            value = challenge_of(resp)
            assert "error=" not in value and RESOURCE_METADATA in value
        resp = await post(server.port, [("topic", BOOK1)], token=None)
        assert resp.status == 401 and "error=" not in challenge_of(resp)


async def test_header_wins_over_cookie_and_the_draft_cookie_works() -> None:
    """§4.1: the Authorization header's token is used and a cookie beside it ignored;
    without the header, ``__Secure-mercure_access_token``."""
    good = access_token(detail(["subscribe"], BOOK1))
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        path = target(("match", BOOK1))
        client, _r, _reader = await subscribe(
            port, path, [*auth(good), ("Cookie", "__Secure-mercure_access_token=garbage")]
        )
        await client.close()
        client, _r, reader = await subscribe(
            port, path, [("Cookie", f"theme=x; __Secure-mercure_access_token={good}")]
        )
        async with client:
            await published(port, [("topic", BOOK1), ("private", "on"), ("id", "c")])
            assert [e.last_event_id for e in await read_until_id(reader, "c")] == ["c"]
        resp = await request(port, "GET", path, auth("garbage"))
        assert resp.status == 401


async def test_access_token_in_the_url_is_refused() -> None:
    """§4.1: an access token never travels in the URL (RFC 9700): 400 invalid_request."""
    good = access_token(detail(["subscribe"], "*"))
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        resp = await request(server.port, "GET", target(("match", BOOK1), ("access_token", good)))
        assert resp.status == 400
        assert 'error="invalid_request"' in challenge_of(resp)


def _token_cases() -> list[tuple[str, str]]:
    now = int(time.time())
    grant = detail(["publish", "subscribe"], "*")
    claims = {"iss": "i", "aud": HUB, "exp": now + 60, "authorization_details": [grant]}
    none_alg = jwt.encode(claims, "", algorithm="none", headers={"typ": "at+jwt"})
    return [
        (none_alg, "alg none"),
        (access_token(grant, secret="another-secret-of-32-bytes-or-more!!"), "wrong key"),
        (access_token(grant, drop=["exp"]), "no exp"),
        (access_token(grant, exp=now - 60), "expired"),
        (access_token(grant, nbf=now + 600), "not yet valid"),
        (access_token(grant, aud="https://other.example/.well-known/mercure"), "another hub"),
        (access_token(grant, drop=["aud"]), "no aud"),
        (access_token(grant, drop=["iss"]), "no iss"),
        (access_token({**grant, "topics": [{"match": "x", "match_type": "regex"}]}), "type"),
        (access_token({**grant, "topics": ["x"]}), "a topic not an object"),
        (access_token({**grant, "topics": []}), "no topics"),
        (access_token({**grant, "actions": []}), "no actions"),
        (access_token({**grant, "actions": ["publish", 1]}), "an action not a string"),
        (access_token({**grant, "payload": "x"}), "payload not an object"),
        (access_token(grant, {"type": DETAIL}), "a second, broken detail"),
        (access_token(*([grant] * 65)), "too many details"),
        (access_token(detail(["publish"], *[f"t{i}" for i in range(65)])), "too many topics"),
        (access_token(detail(["publish"], "x" * 2049)), "pattern too long"),
        (access_token(detail(["publish"], ("https://x/(", "urlpattern"))), "bad URL Pattern"),
    ]


@pytest.mark.parametrize(("token", "why"), _token_cases())
async def test_invalid_access_tokens_401(token: str, why: str) -> None:
    """§4.3, §4.4: every validation failure is 401 ``invalid_token`` (no partial
    acceptance of authorization details), for subscribing and publishing alike."""
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        resp = await request(server.port, "GET", target(("match", BOOK1)), auth(token))
        assert resp.status == 401, why
        value = challenge_of(resp)
        assert 'error="invalid_token"' in value and RESOURCE_METADATA in value, why
        resp = await post(server.port, [("topic", BOOK1)], token)
        assert resp.status == 401, why


async def test_token_checks_that_pass() -> None:
    """§4.3: ``application/at+jwt`` in any case, ``aud`` as an array holding the hub,
    unknown actions and other detail types ignored (they grant nothing)."""
    grant = detail(["publish"], "*")
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        for token in (
            access_token(grant, typ="Application/AT+JWT"),
            access_token(grant, aud=["https://other.example", HUB]),
            access_token(grant, detail(["archive"], "*"), {"type": "https://other/detail"}),
        ):
            assert (await post(server.port, [("topic", BOOK1)], token)).status == 200
        only_unknown = access_token(detail(["archive"], "*"))
        resp = await post(server.port, [("topic", BOOK1)], only_unknown)
        assert resp.status == 403


async def test_a_token_not_typed_at_jwt_gets_no_draft_rights() -> None:
    """§4.3: without ``typ: at+jwt`` the token is a classic one: its
    ``authorization_details`` grant nothing."""
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        for typ in ("JWT", "id_token+jwt"):
            token = access_token(detail(["publish"], "*"), typ=typ)
            assert (await post(server.port, [("topic", BOOK1)], token)).status == 403


async def test_audience_is_the_public_url_and_issuer_is_checked() -> None:
    """§4.3: with ``--public-url`` the resource identifier is that URL + the hub's path,
    whatever Host the request carries; with ``--jwt-issuer`` only that issuer."""
    public = "https://example.com/.well-known/mercure"
    grant = detail(["publish"], "*")
    async with app_server(
        jwt_secret=SECRET, public_url="https://example.com", jwt_issuer="https://issuer.example"
    ) as (server, _ctx):
        assert (await post(server.port, [("topic", BOOK1)], access_token(grant))).status == 401
        good = access_token(grant, aud=public)
        assert (await post(server.port, [("topic", BOOK1)], good)).status == 200
        other = access_token(grant, aud=public, iss="https://rogue.example")
        assert (await post(server.port, [("topic", BOOK1)], other)).status == 401
        resp = await request(server.port, "GET", METADATA)
        assert resp.json()["resource"] == public


# -- §4.5 Publishers ----------------------------------------------------------------------


async def test_publisher_needs_publish_on_every_topic() -> None:
    """§4.5: every topic, canonical and alternate, granted publish, or 403
    ``insufficient_scope`` and nothing dispatched."""
    token = access_token(
        detail(["publish"], BOOK1, ("https://example.com/authors/:id", "urlpattern")),
        detail(["subscribe"], "*"),
    )
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        client, _resp, reader = await subscribe(port, target(("match", "*")), auth(token))
        async with client:
            own = await reader.next()  # its own subscription's event: it may read them all
            assert own.type == "mercure"
            for topics in ([BOOK2], [BOOK1, BOOK2], ["https://example.com/authors/1/x"]):
                resp = await post(port, [("topic", t) for t in topics], token)
                assert resp.status == 403, topics
                assert 'error="insufficient_scope"' in challenge_of(resp)
            await nothing_more(reader)
            ok = await published(
                port, [("topic", BOOK1), ("topic", "https://example.com/authors/7")], token
            )
            events = await read_until_id(reader, ok)
            assert [e.last_event_id for e in events] == [own.last_event_id, ok]


async def test_cookie_publish_needs_an_allowed_origin() -> None:
    """§10 (CSRF): a publish authorized by the draft-08 cookie must come from the hub's
    own origin or an allowed one."""
    token = access_token(detail(["publish"], "*"))
    cookie = ("Cookie", f"__Secure-mercure_access_token={token}")
    form = ("Content-Type", "application/x-www-form-urlencoded")
    async with app_server(jwt_secret=SECRET, cors_origins=("https://app.example",)) as (
        server,
        _ctx,
    ):
        body = b"topic=x"
        for headers, status in [
            ([cookie, form], 403),
            ([cookie, form, ("Origin", "https://evil.example")], 403),
            ([cookie, form, ("Referer", "https://evil.example/page")], 403),
            ([cookie, form, ("Origin", "https://app.example")], 200),
            ([cookie, form, ("Referer", "http://127.0.0.1/page")], 200),
        ]:
            resp = await request(server.port, "POST", PATH, headers, body)
            assert resp.status == status, headers


# -- §4.5 Subscribers, §6 replay: private updates -----------------------------------------


PRIVATE_FEED = [
    ([("topic", BOOK1), ("private", "on")], "p-book1"),
    ([("topic", BOOK2), ("topic", AUTHOR7), ("private", "")], "p-alt"),  # empty: private
    ([("topic", BOOK2), ("private", "on")], "p-book2"),
    ([("topic", BOOK1)], "public"),
]


async def _feed(port: int, publisher: str) -> None:
    for fields, id_ in PRIVATE_FEED:
        await published(port, [*fields, ("id", id_)], publisher)


async def _open(
    stack: AsyncExitStack, port: int, path: str, headers: Sequence[tuple[str, str]] = ()
) -> SSEReader:
    client, _resp, reader = await subscribe(port, path, headers)
    stack.push_async_callback(client.close)
    return reader


def _subscribers(replay: bool) -> list[tuple[str, str, list[tuple[str, str]], list[str]]]:
    """(name, path, headers, the ids it must get), both protocols: routing selects every
    book; tokens decide which private ones get through."""
    books_draft = [("match_urlpattern", "https://example.com/books/:id")]
    cursor = [("last_event_id", "earliest")] if replay else []
    draft = target(*books_draft, *cursor)
    classic = f"{PATH}?topic={quote('https://example.com/books/{id}')}" + (
        "&lastEventID=earliest" if replay else ""
    )
    books_pattern = ("https://example.com/books/:id", "urlpattern")
    return [
        ("draft, no token", draft, [], ["public"]),
        ("draft, no details", draft, auth(access_token()), ["public"]),
        ("draft, publish only", draft, auth(access_token(detail(["publish"], "*"))), ["public"]),
        (
            "draft, other topic",
            draft,
            auth(access_token(detail(["subscribe"], "https://example.com/books/3"))),
            ["public"],
        ),
        (
            "draft, book1",
            draft,
            auth(access_token(detail(["subscribe"], BOOK1))),
            ["p-book1", "public"],
        ),
        (
            "draft, alternate topic",
            draft,
            auth(
                access_token(
                    detail(["subscribe"], ("https://example.com/users/42/*", "urlpattern"))
                )
            ),
            ["p-alt", "public"],
        ),
        (
            "draft, all books",
            draft,
            auth(access_token(detail(["subscribe"], books_pattern))),
            ["p-book1", "p-alt", "p-book2", "public"],
        ),
        (
            "classic, all books",
            classic,
            auth(classic_token(subscribe=["https://example.com/books/{id}"])),
            ["p-book1", "p-alt", "p-book2", "public"],
        ),
        (
            "classic token, draft request, book1",
            draft,
            auth(classic_token(subscribe=[BOOK1])),
            ["p-book1", "public"],
        ),
        (
            "draft token, classic request",
            f"{PATH}?topic={quote(BOOK1)}" + ("&lastEventID=earliest" if replay else ""),
            auth(access_token(detail(["subscribe"], BOOK1))),
            ["p-book1", "public"],
        ),
    ]


@pytest.mark.parametrize("replay", [False, True], ids=["live", "replay"])
async def test_private_updates_only_to_tokens_that_cover_them(replay: bool) -> None:
    """§4.5, §6, §10: a private update reaches a subscriber only when its token grants
    subscribe on one of the update's topics, in either protocol, live and on replay (the
    current token re-evaluated)."""
    publisher = access_token(detail(["publish"], "*"))
    async with app_server(jwt_secret=SECRET, anonymous=True) as (server, _ctx):
        port = server.port
        if replay:
            await _feed(port, publisher)
        async with AsyncExitStack() as stack:
            readers = []
            for name, path, headers, expected in _subscribers(replay):
                readers.append((name, await _open(stack, port, path, headers), expected))
            if not replay:
                await _feed(port, publisher)
            for name, reader, expected in readers:
                events = await read_until_id(reader, "public")
                assert [e.last_event_id for e in events] == expected, name


async def test_the_connection_ends_at_the_token_expiry() -> None:
    """§4.5: a subscriber's connection is closed no later than its token's ``exp``."""
    token = access_token(detail(["subscribe"], "*"), exp=int(time.time()) + 2)
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, target(("match", BOOK1)), auth(token))
        async with client:
            started = time.monotonic()
            await reader.rest(within=10)
            assert time.monotonic() - started < 4


# -- --anonymous ----------------------------------------------------------------------------


async def test_anonymous_subscribers_get_public_updates_and_publishing_needs_a_token() -> None:
    async with app_server(jwt_secret=SECRET, anonymous=True) as (server, _ctx):
        port = server.port
        for path in (target(("match", BOOK1)), f"{PATH}?topic={quote(BOOK1)}"):
            client, _resp, reader = await subscribe(port, path)
            async with client:
                await published(port, [("topic", BOOK1), ("private", "on"), ("id", "p")])
                last = await published(port, [("topic", BOOK1)])
                assert [e.last_event_id for e in await read_until_id(reader, last)] == [last]
        assert (await post(port, [("topic", BOOK1)], token=None)).status == 401
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        resp = await request(server.port, "GET", target(("match", BOOK1)))
        assert resp.status == 401


# -- the two protocols together -------------------------------------------------------------


async def test_draft_publisher_to_classic_subscriber_and_back() -> None:
    """Cross-protocol: a draft-08 publisher's updates (private ones too) reach a classic
    subscriber with a classic token, and a classic publisher's reach a draft-08 one."""
    draft_pub = access_token(detail(["publish"], "*"))
    classic_pub = classic_token(publish=["*"])
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        async with AsyncExitStack() as stack:
            classic = await _open(
                stack, port, f"{PATH}?topic={quote(BOOK1)}", auth(classic_token(subscribe=[BOOK1]))
            )
            draft = await _open(
                stack,
                port,
                target(("match", BOOK1)),
                auth(access_token(detail(["subscribe"], BOOK1))),
            )
            await published(port, [("topic", BOOK1), ("data", "d"), ("id", "d1")], draft_pub)
            await published(port, [("topic", BOOK1), ("private", "on"), ("id", "d2")], draft_pub)
            await published(port, [("topic", BOOK1), ("data", "c"), ("id", "c1")], classic_pub)
            await published(port, [("topic", BOOK1), ("private", "on"), ("id", "c2")], classic_pub)
            for reader in (classic, draft):
                events = await read_until_id(reader, "c2")
                assert [e.last_event_id for e in events] == ["d1", "d2", "c1", "c2"]


# -- §7 Active subscriptions ----------------------------------------------------------------


SUBS_PATTERN = ("/.well-known/mercure/subscriptions{/*}?", "urlpattern")


async def test_subscription_events_on_start_and_end() -> None:
    """§7.1: an update each time a subscription starts and ends, on
    ``/.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}`` (each
    variable escaped once), private, of type ``mercure``, with the JSON document."""
    watcher_token = access_token(detail(["subscribe"], SUBS_PATTERN))
    payload_token = access_token(
        detail(["subscribe"], ("https://example.com/books/:id", "urlpattern"), payload={"a": 1}),
        detail(["subscribe"], "*", payload={"default": True}),
    )
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        async with AsyncExitStack() as stack:
            watcher = await _open(
                stack,
                port,
                target(("match_urlpattern", "/.well-known/mercure/subscriptions/*")),
                auth(watcher_token),
            )
            blind = await _open(
                stack,
                port,
                target(("match_urlpattern", "/.well-known/mercure/subscriptions/*")),
                auth(access_token()),
            )
            client, _resp, _reader = await subscribe(
                port,
                target(
                    ("match_urlpattern", "https://example.com/books/:id"),
                    ("match", "https://example.com/a b"),
                ),
                auth(payload_token),
            )

            def watched(reader: SSEReader) -> list[dict[str, Any]]:
                docs = [json.loads(e.data) for e in reader.parser.events]
                return [d for d in docs if d["match"] != "/.well-known/mercure/subscriptions/*"]

            await watcher.until(lambda r: len(watched(r)) >= 2)
            await client.close()
            await watcher.until(lambda r: len(watched(r)) >= 4)
            assert {e.type for e in watcher.parser.events} == {"mercure"}
            docs = watched(watcher)
            subscriber = docs[0]["subscriber"]
            assert subscriber.startswith("urn:uuid:")
            assert docs[0] == {
                "id": "/.well-known/mercure/subscriptions/urlpattern/"
                + quote("https://example.com/books/:id", safe="")
                + "/"
                + quote(subscriber, safe=""),
                "type": "subscription",
                "match_type": "urlpattern",
                "match": "https://example.com/books/:id",
                "subscriber": subscriber,
                "active": True,
                "payload": {"a": 1},
            }
            assert docs[1]["id"].endswith(
                "/exact/https%3A%2F%2Fexample.com%2Fa%20b/" + quote(subscriber, safe="")
            )
            assert docs[1]["payload"] == {"default": True}
            assert [d["active"] for d in docs] == [True, True, False, False]
            assert docs[2]["id"] == docs[0]["id"] and docs[3]["id"] == docs[1]["id"]
            await nothing_more(blind)


async def test_subscription_api() -> None:
    """§7.2: the collection, the per-matcher collection and one subscription, as JSON,
    with the cursor in the ``rel="mercure"`` Link; 404 for an unknown subscription; the
    requested path must be granted subscribe (403 otherwise)."""
    reader_token = access_token(detail(["subscribe"], SUBS_PATTERN))
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        port = server.port
        client, _resp, _reader = await subscribe(
            port,
            target(("match", BOOK1), ("match_urlpattern", "/books/:id")),
            auth(access_token()),
        )
        async with client:
            resp = await request(port, "GET", f"{PATH}/subscriptions", auth(reader_token))
            assert resp.status == 200
            assert resp.header("content-type") == "application/json"
            link = resp.header("link") or ""
            assert link.startswith(f'<{HUB}>; rel="mercure"; last-event-id="')
            assert 'type="mercure"' in link and 'content-type="application/json"' in link
            body = resp.json()
            assert (body["id"], body["type"]) == (
                "/.well-known/mercure/subscriptions",
                "subscriptions",
            )
            subs = body["subscriptions"]
            assert sorted((s["match_type"], s["match"]) for s in subs) == [
                ("exact", BOOK1),
                ("urlpattern", "/books/:id"),
            ]
            one = next(s for s in subs if s["match_type"] == "exact")
            by_match = f"{PATH}/subscriptions/exact/{quote(BOOK1, safe='')}"
            resp = await request(port, "GET", by_match, auth(reader_token))
            assert resp.json()["id"] == by_match
            assert [s["id"] for s in resp.json()["subscriptions"]] == [one["id"]]
            resp = await request(port, "GET", one["id"], auth(reader_token))
            assert resp.json() == one
            resp = await request(port, "GET", one["id"] + "x", auth(reader_token))
            assert resp.status == 404
            narrow = access_token(detail(["subscribe"], by_match))
            assert (await request(port, "GET", by_match, auth(narrow))).status == 200
            resp = await request(port, "GET", one["id"], auth(narrow))
            assert resp.status == 403
            assert 'error="insufficient_scope"' in challenge_of(resp)
        await eventually(
            lambda: _listed(port, reader_token), what="the ended subscription left the list"
        )


async def _listed(port: int, token: str) -> bool:
    resp = await request(port, "GET", f"{PATH}/subscriptions", auth(token))
    listed: list[Any] = resp.json()["subscriptions"]
    return listed == []


# -- §8.2 Protected resource metadata -------------------------------------------------------


async def test_protected_resource_metadata() -> None:
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        resp = await request(server.port, "GET", METADATA)
        assert resp.status == 200
        doc: dict[str, Any] = resp.json()
        assert doc == {
            "resource": HUB,
            "authorization_details_types_supported": [DETAIL],
            "bearer_methods_supported": ["header"],
            "mercure_cookie": "__Secure-mercure_access_token",
            "mercure_matcher_types_supported": ["exact", "urlpattern"],
            "mercure_subscriptions": True,
        }


async def test_a_cors_wildcard_does_not_vouch_for_a_cookie_publish() -> None:
    """§10: ``--cors-origins '*'`` lets any page read responses, never publish with the
    cookie (a form POST needs no preflight)."""
    token = access_token(detail(["publish"], "*"))
    cookie = ("Cookie", f"__Secure-mercure_access_token={token}")
    form = ("Content-Type", "application/x-www-form-urlencoded")
    async with app_server(jwt_secret=SECRET, cors_origins=("*",)) as (server, _ctx):
        evil = await request(
            server.port,
            "POST",
            PATH,
            [cookie, form, ("Origin", "https://evil.example")],
            b"topic=x",
        )
        assert evil.status == 403
        own = await request(
            server.port, "POST", PATH, [cookie, form, ("Origin", "http://127.0.0.1")], b"topic=x"
        )
        assert own.status == 200
