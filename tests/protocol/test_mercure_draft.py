"""draft-dunglas-mercure-08 on the hub, over real loopback sockets: each MUST the hub
implements, by section of the draft (§3 subscription, §3.1-3.2 matcher types, §5
publication, §6 reconciliation). Authorization (§4), active subscriptions (§7), metadata
(§8.2) and the crossing of the two protocols are in ``test_mercure_draft_auth``.

The raw client sends ``Host: 127.0.0.1``, so the hub's URL (its resource identifier, and
the base of relative URL patterns) is ``http://127.0.0.1/.well-known/mercure``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from tests.protocol.test_mercure import (
    BOOK1,
    BOOK2,
    PATH,
    SECRET,
    Publisher,
    nothing_more,
    publish_one_shot,
    subscribe,
)
from tests.support.hubclient import request
from tests.support.rawhttp import Response, open_stream, read_until_id
from tests.support.servers import app_server

pytestmark = pytest.mark.timeout(60)

HUB = "http://127.0.0.1/.well-known/mercure"  # the hub's URL as the raw client reaches it
DETAIL = "https://mercure.rocks/authorization-detail"
FORM = [("Content-Type", "application/x-www-form-urlencoded")]


# -- helpers -----------------------------------------------------------------------------


def detail(actions: Sequence[str], *topics: str | tuple[str, str], **extra: Any) -> dict[str, Any]:
    """A Mercure authorization detail; a topic is ``match`` or ``(match, match_type)``."""
    return {
        "type": DETAIL,
        "actions": list(actions),
        "topics": [
            {"match": t} if isinstance(t, str) else {"match": t[0], "match_type": t[1]}
            for t in topics
        ],
        **extra,
    }


def access_token(
    *details: dict[str, Any],
    aud: str | list[str] = HUB,
    typ: str = "at+jwt",
    secret: str = SECRET,
    drop: Iterable[str] = (),
    **claims: Any,
) -> str:
    """An RFC 9068 access token with the claims issuers must set (draft-08 §4)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": "https://issuer.example",
        "aud": aud,
        "sub": "subscriber-1",
        "client_id": "https://issuer.example",
        "iat": now,
        "exp": now + 600,
        "jti": f"urn:uuid:{uuid.uuid4()}",
        "authorization_details": list(details),
        **claims,
    }
    for name in drop:
        payload.pop(name, None)
    return jwt.encode(payload, secret, algorithm="HS256", headers={"typ": typ})


def auth(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


PUBLISHER = access_token(detail(["publish"], "*"))


def target(*pairs: tuple[str, str]) -> str:
    return f"{PATH}?{urlencode(list(pairs))}"


async def post(
    port: int, fields: Sequence[tuple[str, str]], token: str | None = PUBLISHER
) -> Response:
    return await publish_one_shot(port, fields, headers=auth(token) if token else ())


async def published(port: int, fields: Sequence[tuple[str, str]], token: str = PUBLISHER) -> str:
    resp = await post(port, fields, token)
    assert resp.status == 200, (resp.status, resp.body)
    return resp.body.decode()


async def bad_subscription(port: int, path: str) -> Response:
    resp = await request(port, "GET", path)
    assert resp.status == 400, (path, resp.status, resp.body)
    return resp


# -- §3 Subscription ----------------------------------------------------------------------


async def test_match_parameters_select_topics() -> None:
    """§3: ``match`` (exact by default), ``match_exact`` and ``match_urlpattern``, several
    in any combination; the subscriber gets every topic some matcher matches, only those."""
    async with app_server() as (server, _ctx):
        port = server.port
        path = target(
            ("match", BOOK1),
            ("match_exact", "bar"),
            ("match_urlpattern", "https://example.com/authors/:id"),
        )
        client, _resp, reader = await subscribe(port, path)
        async with client:
            pub = Publisher(port)
            for topic, id_ in [
                (BOOK1, "b1"),
                (BOOK2, "b2"),
                ("bar", "bar"),
                ("https://example.com/authors/7", "a7"),
                ("https://example.com/authors/7/books", "a7b"),
                ("https://example.com/books/{id}", "tpl"),
            ]:
                await pub.publish(topic, id_, id=id_)
            await pub.publish(BOOK1, "end", id="end")
            events = await read_until_id(reader, "end")
            assert [e.last_event_id for e in events] == ["b1", "bar", "a7", "end"]


async def test_exact_matching_is_byte_for_byte() -> None:
    """§3.1: case-sensitive, no normalization, no resolution of relative values."""
    async with app_server() as (server, _ctx):
        port = server.port
        client, _resp, reader = await subscribe(port, target(("match", "/books/1")))
        async with client:
            pub = Publisher(port)
            for topic in ("/Books/1", "http://127.0.0.1/books/1", "/books/1/", "/books/%31"):
                await pub.publish(topic, "no")
            await pub.publish("/books/1", "yes", id="yes")
            assert [e.data for e in await read_until_id(reader, "yes")] == ["yes"]


async def test_wildcard_matches_every_topic_whatever_the_type() -> None:
    """§3: ``*`` is the wildcard before the matcher type is looked at."""
    async with app_server() as (server, _ctx):
        for name in ("match", "match_exact", "match_urlpattern"):
            client, _resp, reader = await subscribe(server.port, target((name, "*")))
            async with client:
                last = await Publisher(server.port).publish(f"urn:x:{name}", "d")
                assert [e.last_event_id for e in await read_until_id(reader, last)] == [last]


async def test_query_method_body_and_query_are_one_union() -> None:
    """§3: matchers in a QUERY body and in the query both subscribe; ``last_event_id``
    is single-valued, the query's wins over the body's, the header over both."""
    async with app_server() as (server, _ctx):
        port = server.port
        ids = [await Publisher(port).publish(t, t, id=f"h{i}") for i, t in enumerate("abcab")]
        body = urlencode([("match", "b"), ("last_event_id", "h0")]).encode()
        for query, headers, expected in [
            ([("match", "a")], [], ["h1", "h3", "h4"]),  # the body's cursor
            ([("match", "a"), ("last_event_id", "h2")], [], ["h3", "h4"]),  # the query's
            ([("match", "a"), ("last_event_id", "h2")], [("Last-Event-ID", "h3")], ["h4"]),
        ]:
            client, resp, reader = await open_stream(
                port, target(*query), method="QUERY", headers=[*FORM, *headers], body=body
            )
            async with client:
                assert resp.status == 200
                events = await read_until_id(reader, ids[-1])
                assert [e.last_event_id for e in events] == expected
        # The body alone may carry every matcher.
        client, resp, reader = await open_stream(
            port, PATH, method="QUERY", headers=FORM, body=b"match=a&last_event_id=h0"
        )
        async with client:
            assert resp.status == 200
            assert [e.last_event_id for e in await read_until_id(reader, "h3")] == ["h3"]
        # Its checks are the query's (§3: the same rules apply to body-decoded names).
        resp = await request(port, "QUERY", PATH, FORM, b"match_regex=x")
        assert resp.status == 400
        resp = await request(port, "QUERY", PATH, [("Content-Type", "text/plain")], b"match=a")
        assert resp.status == 415


@pytest.mark.parametrize(
    "name", ["match_regex", "Match", "MATCH_exact", "match_URLPattern", "matches", "match_"]
)
async def test_reserved_match_namespace_400(name: str) -> None:
    """§3: any other name in the ``match`` namespace (case-insensitive prefix) is a 400,
    even beside a valid matcher."""
    async with app_server() as (server, _ctx):
        await bad_subscription(server.port, target(("match", BOOK1), (name, BOOK1)))


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("match=a%00b", "C0 control"),
        ("match=a%09b", "tab"),
        ("match=a%7Fb", "DEL"),
        ("match=a%C2%85b", "C1 control"),
        ("match=a%E2%80%8Bb", "zero-width space (Cf)"),
        ("match=a%E2%80%AEb", "bidi override (Cf)"),
        ("match=%FF%FE", "not UTF-8"),
        ("match_urlpattern=https%3A%2F%2Fx%2F(", "not a URL Pattern"),
        ("match_urlpattern=%7B", "not a URL Pattern"),
        ("match=", "empty"),
        ("match", "name alone (an empty value)"),
        ("topic=x&match=a%00", "bad matcher beside a classic topic"),
    ],
)
async def test_matcher_value_constraints_400(query: str, why: str) -> None:
    """§3: values are UTF-8 without control or format characters, valid for their type."""
    async with app_server() as (server, _ctx):
        await bad_subscription(server.port, f"{PATH}?{query}")


async def test_matcher_limits_400() -> None:
    """§3: past the hub's maximum count of matchers, or length of one, a 400."""
    async with app_server() as (server, _ctx):
        port = server.port
        many = [("match", f"t{i}") for i in range(65)]
        await bad_subscription(port, target(*many))
        client, _resp, _reader = await subscribe(port, target(*many[:64]))
        await client.close()
        await bad_subscription(port, target(("match", "t" * 2049)))
        client, _resp, _reader = await subscribe(port, target(("match", "t" * 2048)))
        await client.close()


async def test_a_subscription_needs_a_matcher() -> None:
    async with app_server() as (server, _ctx):
        for path in (PATH, f"{PATH}?last_event_id=earliest", f"{PATH}?x=1"):
            await bad_subscription(server.port, path)


async def test_updates_are_event_stream_events_with_every_field() -> None:
    """§3: text/event-stream events; the SSE properties (id, event, retry, multi-line
    data) are supported."""
    async with app_server() as (server, _ctx):
        client, resp, reader = await subscribe(server.port, target(("match", BOOK1)))
        async with client:
            assert resp.header("content-type") == "text/event-stream; charset=utf-8"
            await Publisher(server.port).post(
                [
                    ("topic", BOOK1),
                    ("data", "l1\nl2\r\nl3"),
                    ("id", "f1"),
                    ("type", "t"),
                    ("retry", "1500"),
                ]
            )
            (event,) = await read_until_id(reader, "f1")
            assert (event.type, event.data, event.last_event_id) == ("t", "l1\nl2\nl3", "f1")
            assert b"retry: 1500\n" in reader.data


# -- §3.2 URL Pattern ---------------------------------------------------------------------


async def test_urlpattern_relative_patterns_and_topics_resolve_against_the_hub() -> None:
    """§3.2: a relative pattern, or topic, is resolved against the hub's URL; a topic that
    is no URL reference never matches; components but the host are case-sensitive."""
    async with app_server() as (server, _ctx):
        port = server.port
        client, _resp, reader = await subscribe(
            port,
            target(
                ("match_urlpattern", "/books/:id"),
                ("match_urlpattern", "https://EXAMPLE.com/Authors/:id"),
            ),
        )
        async with client:
            pub = Publisher(port)
            for topic in (
                "/books/1",  # relative topic, relative pattern
                "http://127.0.0.1/books/2",  # absolute topic on the hub's origin
                "http://other.example/books/3",  # another origin
                "/books/4/x",
                "https://example.com/Authors/5",  # the host is case-insensitive
                "https://example.com/authors/6",  # the path is not
                "http://[not-a-url",
            ):
                await pub.publish(topic, topic, id=f"u:{topic}")
            await pub.publish("/books/end", "end", id="end")
            events = await read_until_id(reader, "end")
            assert [e.data for e in events] == [
                "/books/1",
                "http://127.0.0.1/books/2",
                "https://example.com/Authors/5",
                "end",
            ]


async def test_urlpattern_matching_time_is_bounded() -> None:
    """§3.2: a pattern made to backtrack catastrophically costs no more than any other
    (a linear-time engine), so the hub keeps dispatching."""
    async with app_server() as (server, _ctx):
        port = server.port
        client, _resp, reader = await subscribe(
            port, target(("match_urlpattern", "https://x.example/((?:a|aa)+)b"))
        )
        async with client:
            start = time.monotonic()
            pub = Publisher(port)
            for _ in range(20):
                await pub.publish("https://x.example/" + "a" * 1500 + "c", "no")
            await pub.publish("https://x.example/aab", "yes", id="yes")
            assert [e.data for e in await read_until_id(reader, "yes")] == ["yes"]
            assert time.monotonic() - start < 5


# -- §5 Publication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "/.well-known/mercure",
        "/.well-known/mercure/subscriptions/exact/x/y",
        "https://elsewhere.example/.well-known/mercure/subscriptions/exact/x/y",
        "/.well-known/%6Dercure/subscriptions",
        "/.well-known/mercure/../mercure/x",
        "/a/%2e%2e/.well-known/mercure",
        "\\.well-known\\mercure\\x",
        "mercure/x",  # relative: resolves below the hub's URL
        "*",
    ],
)
async def test_publish_reserved_topics_400(topic: str) -> None:
    """§5: no topic in the hub's namespace (resolved, normalized) nor ``*``, whatever the
    token: a 400 and nothing dispatched."""
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, target(("match", "*")))
        async with client:
            for token in (PUBLISHER, None):
                resp = await post(server.port, [("topic", BOOK1), ("topic", topic)], token)
                assert resp.status == 400, (topic, resp.body)
            await nothing_more(reader)


async def test_publish_near_reserved_topics_are_fine() -> None:
    async with app_server() as (server, _ctx):
        for topic in ("/.well-known/mercurex", "/.well-known/Mercure/x", "urn:mercure", "**"):
            await published(server.port, [("topic", topic)])


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ([("type", "mercure")], 400),
        ([("type", "a\u200bb")], 400),
        ([("type", "a\x85b")], 400),
        ([("id", "#fragment")], 400),
        ([("id", "a\u202eb")], 400),
        ([("id", "earliest")], 400),
        ([("topic", "x\x7fy")], 400),
        ([("topic", "x\u2066y")], 400),
        ([("retry", "\uff11\uff12")], 400),  # fullwidth digits: not ASCII ones
        ([("retry", "+5")], 400),
        ([("topic", f"t{i}") for i in range(64)], 413),
        ([("topic", "t" * 2049)], 413),
    ],
)
async def test_publish_field_constraints(fields: list[tuple[str, str]], status: int) -> None:
    """§5: character rules on topic, id and type, the reserved type, ASCII-digit retry
    (400); past the hub's limits, 413."""
    async with app_server() as (server, _ctx):
        resp = await post(server.port, [("topic", BOOK1), *fields])
        assert resp.status == status, (fields, resp.body)


async def test_publish_answers_200_with_the_id_as_text() -> None:
    """§5: 200, the id as the ``text/plain; charset=utf-8`` body; a generated id is an
    IRI; unknown fields are ignored."""
    async with app_server() as (server, _ctx):
        resp = await post(server.port, [("topic", BOOK1), ("data", "x"), ("future", "1")])
        assert resp.status == 200
        assert resp.header("content-type") == "text/plain; charset=utf-8"
        assert resp.body.startswith(b"urn:uuid:")
        assert await published(server.port, [("topic", BOOK1), ("id", "mine")]) == "mine"


async def test_alternate_topics_reach_subscribers_of_any() -> None:
    """§5: the update goes to subscribers matching its canonical or an alternate topic."""
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, target(("match", "alt")))
        async with client:
            last = await published(server.port, [("topic", BOOK1), ("topic", "alt")])
            assert [e.last_event_id for e in await read_until_id(reader, last)] == [last]


# -- §6 Reconciliation --------------------------------------------------------------------


async def test_last_event_id_query_and_header_precedence() -> None:
    """§6: ``last_event_id`` in the query; the header wins when both are sent."""
    async with app_server() as (server, _ctx):
        port = server.port
        ids = [await published(port, [("topic", BOOK1), ("id", f"e{i}")]) for i in range(4)]
        client, _resp, reader = await subscribe(
            port, target(("match", BOOK1), ("last_event_id", "e0"))
        )
        async with client:
            assert [e.last_event_id for e in await read_until_id(reader, ids[-1])] == ids[1:]
        client, _resp, reader = await subscribe(
            port, target(("match", BOOK1), ("last_event_id", "e0")), [("Last-Event-ID", "e2")]
        )
        async with client:
            assert [e.last_event_id for e in await read_until_id(reader, ids[-1])] == ids[3:]


@pytest.mark.parametrize(
    ("asked", "expected"),
    [("e1", "e1"), ("earliest", "earliest"), ("never-published", "earliest"), ("e0", "earliest")],
)
async def test_mercure_last_event_id_response_header(asked: str, expected: str) -> None:
    """§6: when an id is asked for, ``Mercure-Last-Event-ID`` is the id before the first
    event sent, or ``earliest`` (asked for, unknown, or discarded); no ``event: missed``."""
    async with app_server(history=3) as (server, _ctx):
        port = server.port
        ids = [await published(port, [("topic", BOOK1), ("id", f"e{i}")]) for i in range(4)]
        client, resp, reader = await subscribe(
            port, target(("match", BOOK1), ("last_event_id", asked))
        )
        async with client:
            assert resp.header("mercure-last-event-id") == expected
            events = await read_until_id(reader, ids[-1])
            assert all(e.type == "message" for e in events)
            held = ids[1:]
            assert [e.last_event_id for e in events] == (
                held[held.index(asked) + 1 :] if asked in held else held
            )
        client, resp, _reader = await subscribe(port, target(("match", BOOK1)))
        async with client:
            assert resp.header("mercure-last-event-id") is None  # none asked for


async def test_reused_id_is_accepted_and_resolves_to_the_earliest() -> None:
    """§6: a reused id is accepted; a Last-Event-ID naming it resolves to the earliest
    update holding it, and everything after is sent, the later same-id update too."""
    async with app_server() as (server, _ctx):
        port = server.port
        for data in ("first", "between"):
            await published(port, [("topic", BOOK1), ("id", "same" if data == "first" else "b")])
        assert await published(port, [("topic", BOOK1), ("id", "same"), ("data", "2")]) == "same"
        await published(port, [("topic", BOOK1), ("id", "last")])
        for protocol in (("match", BOOK1), ("topic", BOOK1)):
            client, resp, reader = await subscribe(
                port, target(protocol, ("last_event_id", "same"))
            )
            async with client:
                assert resp.header("last-event-id") == "same"
                events = await read_until_id(reader, "last")
                assert [(e.last_event_id, e.data) for e in events] == [
                    ("b", ""),
                    ("same", "2"),
                    ("last", ""),
                ]


async def test_replay_and_live_in_order_for_several_matchers() -> None:
    """§6: after the id asked for, everything of the subscribed topics, in order, then
    live, with no duplicate when several matchers select the same update."""
    async with app_server() as (server, _ctx):
        port = server.port
        first = await published(port, [("topic", BOOK1), ("id", "r0")])
        await published(port, [("topic", BOOK1), ("topic", BOOK2), ("id", "r1")])
        await published(port, [("topic", BOOK2), ("id", "r2")])
        client, _resp, reader = await subscribe(
            port,
            target(
                ("match", BOOK1),
                ("match_urlpattern", "https://example.com/books/:id"),
                ("last_event_id", first),
            ),
        )
        async with client:
            await published(port, [("topic", BOOK2), ("id", "r3")])
            events = await read_until_id(reader, "r3")
            assert [e.last_event_id for e in events] == ["r1", "r2", "r3"]


async def test_private_update_reaches_nobody_without_a_token_check() -> None:
    """Auth off: the hub cannot tell who may read a private update, so no one does."""
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, target(("match", BOOK1)))
        async with client:
            await published(server.port, [("topic", BOOK1), ("private", ""), ("id", "p")])
            await published(server.port, [("topic", BOOK1), ("id", "pub")])
            assert [e.last_event_id for e in await read_until_id(reader, "pub")] == ["pub"]
