"""The Mercure protocol over real loopback sockets (SPEC §5, §6, §8, §9).

Subscribe: ``GET /.well-known/mercure?topic=…`` (one or several topics, selectors),
resume after ``Last-Event-ID`` (header, ``lastEventID`` or ``last_event_id``), ``earliest``,
an unknown id (``event: missed`` then everything held). Publish: a form POST answered
200 with the event's id. JWT claims ``mercure.publish`` / ``mercure.subscribe``. Then the
load properties: heartbeats only on idle streams, ``max_stream_s``, ordering with no loss
and no duplicates across 1,000 events x 200 subscribers, resume at every position, a
subscriber that reads nothing cut without holding back 199 others, bounded memory.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from sseserver.http.protocol import HTTPProtocol
from sseserver.http.server import Server
from sseserver.hub.memory import MemoryHub
from sseserver.web.context import Context
from tests.support.chunks import complete_chunks
from tests.support.jwt_keys import bearer
from tests.support.rawhttp import HOST, RawClient, Response, SSEReader, open_stream, read_until_id
from tests.support.servers import app_server
from tests.support.sse_parser import Event, SSEParser
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(120)

PATH = "/.well-known/mercure"
SECRET = "test-secret-that-is-long-enough-for-hs256!"  # >= 32 bytes: no PyJWT warning
BOOK1 = "https://example.com/books/1"
BOOK2 = "https://example.com/books/2"
BOOKS = "https://example.com/books/{id}"


def memory_hub(ctx: Context) -> MemoryHub:
    """The in-memory hub behind a test server, to look at its history's internals."""
    assert isinstance(ctx.hub, MemoryHub)
    return ctx.hub


# -- helpers -----------------------------------------------------------------------------


def token(**mercure: Any) -> str:
    return jwt.encode({"sub": "tester", "mercure": mercure}, SECRET, algorithm="HS256")


def sub_target(*topics: str, **params: str) -> str:
    return f"{PATH}?" + urlencode([*(("topic", t) for t in topics), *params.items()])


class Publisher:
    """Publishes form POSTs, one connection each (keep-alive between publishes is checked
    once, by ``test_publish_keeps_the_connection_alive``, not relied upon here)."""

    def __init__(self, port: int) -> None:
        self.port = port

    @classmethod
    async def connect(cls, port: int) -> Publisher:
        return cls(port)

    async def post(
        self,
        fields: Sequence[tuple[str, str]],
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "application/x-www-form-urlencoded",
        within: float = 5.0,
    ) -> Response:
        body = urlencode(list(fields)).encode()
        async with await RawClient.connect(self.port) as client:
            client.request("POST", PATH, [("Content-Type", content_type), *headers], body)
            return await client.response(within)

    async def publish(self, topic: str, data: str, **fields: str) -> str:
        """Publish and return the id; fails unless the answer is 200."""
        resp = await self.post([("topic", topic), ("data", data), *fields.items()])
        assert resp.status == 200, (resp.status, resp.body)
        return resp.body.decode()

    async def close(self) -> None:
        return None


async def subscribe(
    port: int, target: str, headers: Iterable[tuple[str, str]] = ()
) -> tuple[RawClient, Response, SSEReader]:
    client, resp, reader = await open_stream(port, target, headers=headers)
    assert resp.status == 200, (resp.status, await client.body())
    assert resp.header("content-type") == "text/event-stream; charset=utf-8"
    return client, resp, reader


async def publish_one_shot(port: int, fields: Sequence[tuple[str, str]], **kw: Any) -> Response:
    pub = await Publisher.connect(port)
    try:
        return await pub.post(fields, **kw)
    finally:
        await pub.close()


async def nothing_more(reader: SSEReader, within: float = 0.2) -> None:
    """Assert that no further event arrives within ``within`` seconds."""
    before = len(reader.parser.events)
    try:
        await reader.until(lambda r: len(r.parser.events) > before, within=within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected event {reader.parser.events[before:]}")


# -- subscribe and publish ---------------------------------------------------------------


async def test_subscribe_one_topic_gets_only_its_updates() -> None:
    async with app_server() as (server, _ctx):
        client, resp, reader = await subscribe(server.port, sub_target(BOOK1))
        pub = await Publisher.connect(server.port)
        async with client:
            assert resp.header("cache-control") == "no-cache, no-transform"
            other = await pub.publish(BOOK2, "not for you")
            mine = await pub.publish(BOOK1, "for you")
            events = await read_until_id(reader, mine)
            assert [(e.data, e.last_event_id) for e in events] == [("for you", mine)]
            assert other != mine
            assert reader.parser.retry == 2000  # the stream opens with retry:
        await pub.close()


async def test_subscribe_several_topics_and_selectors() -> None:
    async with app_server() as (server, _ctx):
        async with AsyncExitStack() as stack:
            c1, _, both = await subscribe(server.port, sub_target(BOOK1, BOOK2))
            c2, _, template = await subscribe(server.port, sub_target(BOOKS))
            c3, _, star = await subscribe(server.port, sub_target("*"))
            c4, _, plus = await subscribe(server.port, sub_target("https://example.com/{+p}"))
            for c in (c1, c2, c3, c4):
                stack.push_async_callback(c.close)
            pub = await Publisher.connect(server.port)
            stack.push_async_callback(pub.close)
            await pub.publish(BOOK1, "b1", id="b1")
            await pub.publish("https://example.com/authors/1", "a1", id="a1")
            await pub.publish(BOOK2, "b2", id="b2")
            await pub.publish("https://example.com/books/2/reviews", "r", id="r")
            await pub.publish("urn:other", "o", id="o")
            await pub.publish(BOOK1, "end", id="end")
            expect = {
                "both": ["b1", "b2", "end"],
                "template": ["b1", "b2", "end"],
                "star": ["b1", "a1", "b2", "r", "o", "end"],
                "plus": ["b1", "a1", "b2", "r", "end"],
            }
            for name, reader in (
                ("both", both),
                ("template", template),
                ("star", star),
                ("plus", plus),
            ):
                got = [e.last_event_id for e in await read_until_id(reader, "end")]
                assert got == expect[name], name


async def test_publish_form_fields() -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            resp = await publish_one_shot(
                server.port,
                [
                    ("topic", BOOK1),
                    ("data", "line one\nline two\r\nline three"),
                    ("id", "custom-1"),
                    ("type", "book-updated"),
                    ("retry", "5000"),
                ],
            )
            assert resp.status == 200
            assert resp.body == b"custom-1"
            assert resp.header("content-type") == "text/plain; charset=utf-8"
            # Several data fields are several lines of one event.
            resp2 = await publish_one_shot(
                server.port, [("topic", BOOK1), ("data", "first"), ("data", "second")]
            )
            assert resp2.status == 200
            generated = resp2.body.decode()
            assert generated.startswith("urn:uuid:")
            events = await read_until_id(reader, generated)
            assert events[0] == Event("book-updated", "line one\nline two\nline three", "custom-1")
            assert reader.parser.retry == 5000
            assert events[1] == Event("message", "first\nsecond", generated)
            # Raw bytes: data split into data: lines, in one chunk.
            assert (
                b"id: custom-1\nevent: book-updated\nretry: 5000\ndata: line one\n"
                b"data: line two\ndata: line three\n\n" in reader.data
            )


async def test_publish_without_data_is_dispatched_with_empty_data() -> None:
    """An update may carry no data (a topic "changed" ping); EventSource dispatches an
    event only with a data line, so one is written, empty."""
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            resp = await publish_one_shot(server.port, [("topic", BOOK1), ("id", "ping-1")])
            assert resp.status == 200
            (event,) = await read_until_id(reader, "ping-1")
            assert event == Event("message", "", "ping-1")
            assert b"id: ping-1\ndata: \n\n" in reader.data


async def test_publish_keeps_the_connection_alive() -> None:
    """SPEC §3: keep-alive after a finished response; a publisher may POST many updates
    over one connection."""
    async with app_server() as (server, _ctx):
        body = urlencode([("topic", BOOK1), ("data", "x")]).encode()
        headers = [("Content-Type", "application/x-www-form-urlencoded")]
        async with await RawClient.connect(server.port) as client:
            ids = []
            for _ in range(3):
                client.request("POST", PATH, headers, body)
                resp = await client.response()
                assert resp.status == 200
                assert resp.header("connection") != "close"
                ids.append(resp.body)
            assert len(set(ids)) == 3


async def test_private_update_reaches_nobody_when_auth_is_off() -> None:
    async with app_server() as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            pub = await Publisher.connect(server.port)
            await pub.publish(BOOK1, "secret", id="p", private="on")
            last = await pub.publish(BOOK1, "public", id="u")
            events = await read_until_id(reader, last)
            assert [e.last_event_id for e in events] == ["u"]
            await pub.close()


# -- resume ------------------------------------------------------------------------------


async def _seed(port: int, topic: str, n: int, prefix: str = "e") -> list[str]:
    pub = await Publisher.connect(port)
    try:
        return [await pub.publish(topic, f"d{i}", id=f"{prefix}{i}") for i in range(n)]
    finally:
        await pub.close()


@pytest.mark.parametrize("via", ["header", "lastEventID", "last_event_id"])
async def test_resume_after_last_event_id(via: str) -> None:
    async with app_server() as (server, _ctx):
        ids = await _seed(server.port, BOOK1, 6)
        await _seed(server.port, BOOK2, 2, prefix="x")
        if via == "header":
            target, headers = sub_target(BOOK1), [("Last-Event-ID", "e2")]
        else:
            target, headers = sub_target(BOOK1, **{via: "e2"}), []
        client, resp, reader = await subscribe(server.port, target, headers)
        async with client:
            assert resp.header("last-event-id") == "e2"
            events = await read_until_id(reader, ids[-1])
            assert [e.last_event_id for e in events] == ids[3:]
            assert [e.data for e in events] == ["d3", "d4", "d5"]
            live = await _seed(server.port, BOOK1, 1, prefix="live")
            events = await read_until_id(reader, live[0])
            assert [e.last_event_id for e in events] == [*ids[3:], "live0"]


async def test_last_event_id_response_header_without_resume() -> None:
    async with app_server() as (server, _ctx):
        client, resp, _reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            assert resp.header("last-event-id") == "earliest"  # nothing published yet
        ids = await _seed(server.port, BOOK2, 3)
        client, resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            # The hub's latest id (of any topic): resuming from it misses nothing.
            assert resp.header("last-event-id") == ids[-1]
            await nothing_more(reader)


async def test_earliest_replays_everything_held() -> None:
    async with app_server() as (server, _ctx):
        ids = await _seed(server.port, BOOK1, 5)
        await _seed(server.port, BOOK2, 2, prefix="x")
        client, resp, reader = await subscribe(
            server.port, sub_target(BOOK1), [("Last-Event-ID", "earliest")]
        )
        async with client:
            assert resp.header("last-event-id") == "earliest"
            events = await read_until_id(reader, ids[-1])
            assert [e.last_event_id for e in events] == ids
        client, _resp, reader = await subscribe(
            server.port, sub_target(BOOK1, lastEventID="earliest")
        )
        async with client:
            assert [e.last_event_id for e in await read_until_id(reader, ids[-1])] == ids


async def test_unknown_id_gets_missed_then_everything_held() -> None:
    async with app_server(history=3) as (server, _ctx):
        ids = await _seed(server.port, BOOK1, 6)  # e0..e2 evicted
        for lost in ("e1", "never-published"):
            client, resp, reader = await subscribe(
                server.port, sub_target(BOOK1), [("Last-Event-ID", lost)]
            )
            async with client:
                events = await read_until_id(reader, ids[-1])
                assert events[0].type == "missed"
                assert json.loads(events[0].data)["last_event_id"] == lost
                assert [e.last_event_id for e in events[1:]] == ids[3:]
                assert resp.header("last-event-id") == "earliest"


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([("data", "x")], "no topic"),
        ([("topic", ""), ("data", "x")], "empty topic"),
        ([("topic", BOOK1), ("data", "x"), ("id", "earliest")], "reserved id"),
        ([("topic", BOOK1), ("data", "x"), ("id", "a\nb")], "id with a line break"),
        ([("topic", BOOK1), ("data", "x"), ("type", "a\rb")], "type with a line break"),
        ([("topic", BOOK1), ("data", "x"), ("retry", "abc")], "retry not a number"),
        ([("topic", BOOK1), ("data", "x"), ("retry", "-1")], "negative retry"),
        ([("topic", BOOK1), ("data", "x"), ("retry", "1.5")], "fractional retry"),
    ],
)
async def test_publish_400(fields: list[tuple[str, str]], why: str) -> None:
    async with app_server() as (server, ctx):
        await _seed(server.port, BOOK1, 1, prefix="dup")  # id "dup0"
        await publish_one_shot(server.port, [("topic", BOOK1), ("data", "x"), ("id", "dup")])
        client, _resp, reader = await subscribe(server.port, sub_target("*"))
        async with client:
            held = len(memory_hub(ctx)._by_id)
            resp = await publish_one_shot(server.port, fields)
            assert resp.status == 400, why
            assert resp.header("content-type") == "application/json"
            assert resp.json()["error"]["code"] == "bad_request"
            assert len(resp.body) < 2048
            assert len(memory_hub(ctx)._by_id) == held, "a refused update must not be stored"
            await nothing_more(reader)


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "multipart/form-data; boundary=x"]
)
async def test_publish_415_wrong_content_type(content_type: str) -> None:
    async with app_server() as (server, _ctx):
        resp = await publish_one_shot(
            server.port, [("topic", BOOK1), ("data", "x")], content_type=content_type
        )
        assert resp.status == 415
        assert resp.json()["error"]["code"] == "unsupported_media_type"


async def test_publish_content_type_with_charset_is_accepted() -> None:
    async with app_server() as (server, _ctx):
        resp = await publish_one_shot(
            server.port,
            [("topic", BOOK1), ("data", "x")],
            content_type="application/x-www-form-urlencoded; charset=UTF-8",
        )
        assert resp.status == 200


@pytest.mark.parametrize("target", [PATH, f"{PATH}?topic=", f"{PATH}?other=1"])
async def test_subscribe_without_topic_400(target: str) -> None:
    async with app_server() as (server, _ctx):
        client = await RawClient.connect(server.port)
        async with client:
            client.request("GET", target)
            resp = await client.response()
            assert resp.status == 400
            assert resp.json()["error"]["code"] == "bad_request"


# -- JWT ---------------------------------------------------------------------------------


async def test_jwt_publish_needs_a_token_with_the_topic() -> None:
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        fields = [("topic", BOOK1), ("data", "x")]
        resp = await publish_one_shot(server.port, fields)
        assert resp.status == 401
        assert resp.header("www-authenticate") is not None
        resp = await publish_one_shot(server.port, fields, headers=bearer("not-a-jwt"))
        assert resp.status == 401
        wrong = jwt.encode(
            {"mercure": {"publish": ["*"]}}, "another-secret-of-32-bytes-or-more", algorithm="HS256"
        )
        resp = await publish_one_shot(server.port, fields, headers=bearer(wrong))
        assert resp.status == 401
        resp = await publish_one_shot(server.port, fields, headers=bearer(token(publish=[BOOK2])))
        assert resp.status == 403
        resp = await publish_one_shot(server.port, fields, headers=bearer(token(subscribe=["*"])))
        assert resp.status == 403, "a subscribe claim must not allow publishing"
        for allowed in ([BOOK1], [BOOKS], ["*"]):
            resp = await publish_one_shot(
                server.port, fields, headers=bearer(token(publish=allowed))
            )
            assert resp.status == 200, allowed
        # Every topic of a multi-topic update must be allowed.
        resp = await publish_one_shot(
            server.port,
            [("topic", BOOK1), ("topic", "urn:elsewhere"), ("data", "x")],
            headers=bearer(token(publish=[BOOKS])),
        )
        assert resp.status == 403


async def test_jwt_expired_token_401() -> None:
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        expired = jwt.encode(
            {"exp": int(time.time()) - 60, "mercure": {"publish": ["*"]}},
            SECRET,
            algorithm="HS256",
        )
        resp = await publish_one_shot(
            server.port, [("topic", BOOK1), ("data", "x")], headers=bearer(expired)
        )
        assert resp.status == 401


async def test_jwt_subscribe() -> None:
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        client = await RawClient.connect(server.port)
        async with client:
            client.request("GET", sub_target(BOOK1))
            assert (await client.response()).status == 401
        client = await RawClient.connect(server.port)
        async with client:
            client.request("GET", sub_target(BOOK1), bearer(token(subscribe=[BOOK2])))
            assert (await client.response()).status == 403
        client = await RawClient.connect(server.port)
        async with client:
            client.request("GET", sub_target(BOOK1), bearer(token(publish=["*"])))
            assert (await client.response()).status == 403, "no subscribe claim"
        # Allowed: a "*" claim for anything; the token in each of the places it may be.
        star = token(subscribe=["*"])
        ways = [
            (sub_target(BOOK1, "urn:x"), bearer(star)),
            (sub_target("*"), bearer(star)),
            (sub_target(BOOK1, access_token=star), []),
            (sub_target(BOOK1), [("Cookie", f"mercureAuthorization={star}")]),
            (sub_target(BOOK1), [("Cookie", f"sseserver_token={star}")]),
            (sub_target(BOOK1), bearer(token(subscribe=[BOOKS]))),
        ]
        async with AsyncExitStack() as stack:
            readers = []
            for target, headers in ways:
                client, _resp, reader = await subscribe(server.port, target, headers)
                stack.push_async_callback(client.close)
                readers.append(reader)
            resp = await publish_one_shot(
                server.port,
                [("topic", BOOK1), ("data", "hi"), ("id", "j1")],
                headers=bearer(token(publish=["*"])),
            )
            assert resp.status == 200
            for reader in readers:
                assert [e.data for e in await read_until_id(reader, "j1")] == ["hi"]


async def test_jwt_private_update_only_to_matching_subscribe_claim() -> None:
    async with app_server(jwt_secret=SECRET) as (server, _ctx):
        publisher = bearer(token(publish=["*"]))
        async with AsyncExitStack() as stack:

            async def open_sub(topics: Sequence[str], claim: list[str]) -> SSEReader:
                client, _resp, reader = await subscribe(
                    server.port, sub_target(*topics), bearer(token(subscribe=claim))
                )
                stack.push_async_callback(client.close)
                return reader

            book_reader = await open_sub([BOOKS], [BOOKS])
            star_reader = await open_sub(["*"], ["*"])
            book1_reader = await open_sub([BOOK1], [BOOK1])
            book2_reader = await open_sub([BOOK2], [BOOK2])
            authors_reader = await open_sub(
                ["https://example.com/authors/{id}"], ["https://example.com/authors/{id}"]
            )

            async def post(fields: list[tuple[str, str]]) -> None:
                resp = await publish_one_shot(server.port, fields, headers=publisher)
                assert resp.status == 200, resp.body

            await post([("topic", BOOK1), ("data", "p1"), ("id", "p1"), ("private", "on")])
            # One private update with two topics: a right on either topic is enough.
            await post(
                [
                    ("topic", BOOK2),
                    ("topic", "https://example.com/authors/7"),
                    ("data", "p2"),
                    ("id", "p2"),
                    ("private", "true"),
                ]
            )
            await post(
                [
                    ("topic", BOOK1),
                    ("topic", BOOK2),
                    ("topic", "https://example.com/authors/7"),
                    ("data", "end"),
                    ("id", "end"),
                ]
            )
            got = {}
            for name, reader in (
                ("books", book_reader),
                ("star", star_reader),
                ("book1", book1_reader),
                ("book2", book2_reader),
                ("authors", authors_reader),
            ):
                got[name] = [e.last_event_id for e in await read_until_id(reader, "end")]
            assert got == {
                "books": ["p1", "p2", "end"],
                "star": ["p1", "p2", "end"],
                "book1": ["p1", "end"],
                "book2": ["p2", "end"],
                "authors": ["p2", "end"],
            }


# -- heartbeats and stream life ----------------------------------------------------------


async def test_updates_reset_the_heartbeat_and_idle_streams_get_pings() -> None:
    heartbeat = 0.4
    async with app_server(heartbeat_s=heartbeat) as (server, _ctx):
        busy_client, _r, busy = await subscribe(server.port, sub_target("busy"))
        idle_client, _r, idle = await subscribe(server.port, sub_target("idle"))
        pub = await Publisher.connect(server.port)
        async with busy_client, idle_client:
            start = time.monotonic()
            n = 0
            last = ""
            while time.monotonic() - start < 4 * heartbeat:  # bounded in time...
                last = await pub.publish("busy", f"tick {n}")
                n += 1
                assert n < 10_000  # ...and in count
                await asyncio.sleep(heartbeat / 8)
            await read_until_id(busy, last)
            await idle.until(lambda r: r.parser.comments.count("ping") >= 2, within=3 * heartbeat)
            assert busy.parser.comments.count("ping") == 0, busy.parser.comments
            assert len(busy.parser.events) == n
            assert idle.parser.events == []
        await pub.close()


async def test_max_stream_s_ends_cleanly_with_retry() -> None:
    heartbeat = 0.5  # the shared tick (heartbeat / 5 = 0.1 s) enforces deadlines
    tick = heartbeat / 5
    async with app_server(max_stream_s=1.0, heartbeat_s=heartbeat, retry_ms=1234) as (
        server,
        _ctx,
    ):
        client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            opened = time.monotonic()
            await reader.rest(within=5.0)  # until the chunked terminator
            elapsed = time.monotonic() - opened
            assert 0.88 <= elapsed <= 1.2 + tick, f"stream ended after {elapsed:.3f}s"
            assert reader.ended  # h11 saw 0\r\n\r\n: a clean end, not a bare close
            body = bytes(reader.data)
            assert body.endswith(b"\n\nretry: 1234\n\n"), body[-80:]  # its own event
            assert body.count(b"retry: 1234") == 2  # the one that opened it, and this
            assert reader.parser.retry == 1234
            assert client.raw.endswith(b"\r\n0\r\n\r\n")
            assert await client.closed_by_server(within=2.0)


async def test_max_stream_s_deadlines_are_spread() -> None:
    async with app_server(max_stream_s=1.0, heartbeat_s=0.25) as (server, _ctx):
        async with AsyncExitStack() as stack:
            readers = []
            for _ in range(20):
                client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
                stack.push_async_callback(client.close)
                readers.append(reader)
            deadlines = sorted(s.deadline for s in server.state.streams.streams)
            assert len(deadlines) == 20
            assert deadlines[-1] - deadlines[0] > 0.01, "deadlines are not randomised"
            assert deadlines[-1] - deadlines[0] <= 0.1 + 0.05
            for reader in readers:
                await reader.rest(within=3.0)


async def test_shutdown_ends_subscriber_streams_with_retry_and_terminator() -> None:
    """SPEC §10: stop accepting, tell open streams to reconnect (``retry:``) and end every
    body with the chunked terminator, not a bare close. Hub subscribers' streams outlive
    their handler task (they are detached), and must be ended like the others."""
    async with app_server(shutdown_grace_s=1.0, retry_ms=1500) as (server, _ctx):
        client, _resp, reader = await subscribe(server.port, sub_target(BOOK1))
        async with client:
            last = await Publisher(server.port).publish(BOOK1, "before shutdown")
            await read_until_id(reader, last)
            stopping = asyncio.create_task(server.shutdown())
            try:
                await reader.rest(within=5.0)
            finally:
                await asyncio.wait_for(stopping, 10.0)
            body = bytes(reader.data)
            assert body.endswith(b"retry: 1500\n\n"), body[-80:]
            assert body.count(b"retry: 1500") == 2
            assert client.raw.endswith(b"\r\n0\r\n\r\n")


# -- many subscribers --------------------------------------------------------------------


async def test_fanout_1000_events_200_subscribers_in_order_no_loss_no_duplicates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    subscribers, events = 200, 1000
    async with app_server(history=events) as (server, ctx):
        async with AsyncExitStack() as stack:
            readers = []
            for _ in range(subscribers):
                client, _resp, reader = await subscribe(server.port, sub_target("fan"))
                stack.push_async_callback(client.close)
                readers.append(reader)
            assert ctx.hub.subscriber_count("fan") == subscribers
            expected = [f"ev-{i}" for i in range(events)]
            last = expected[-1]

            async def consume(reader: SSEReader) -> None:
                await read_until_id(reader, last, within=60.0)

            consumers = [asyncio.create_task(consume(r)) for r in readers]
            pub = await Publisher.connect(server.port)
            stack.push_async_callback(pub.close)
            deliveries_before = ctx.hub.deliveries
            start = time.monotonic()
            for i, event_id in enumerate(expected):
                assert await pub.publish("fan", f"payload {i}", id=event_id) == event_id
            published = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*consumers), 60.0)
            done = time.monotonic()
            for n, reader in enumerate(readers):
                got = reader.parser.events
                assert [e.last_event_id for e in got] == expected, f"subscriber {n}"
                assert [e.data for e in got] == [f"payload {i}" for i in range(events)]
            assert ctx.hub.deliveries - deliveries_before == subscribers * events
            assert all(s.close_reason == "" for s in server.state.streams.streams)
            with capsys.disabled():
                print(
                    f"\n[fan-out] {events} events x {subscribers} subscribers: publish "
                    f"{published - start:.2f}s, all received {done - start:.2f}s, "
                    f"{subscribers * events / (done - start):,.0f} deliveries/s "
                    "(in-process, client and server on one loop; not a benchmark)"
                )


async def test_resume_at_every_position() -> None:
    n = 50
    async with app_server() as (server, _ctx):
        ids = await _seed(server.port, "fifty", n)
        await _seed(server.port, "noise", 5, prefix="x")
        async with AsyncExitStack() as stack:
            resumers: list[tuple[str | None, SSEReader]] = []
            for after in [None, "earliest", *ids]:
                headers = [("Last-Event-ID", after)] if after else []
                client, resp, reader = await subscribe(server.port, sub_target("fifty"), headers)
                stack.push_async_callback(client.close)
                if after:
                    assert resp.header("last-event-id") == after
                resumers.append((after, reader))
            sentinel = (await _seed(server.port, "fifty", 1, prefix="sentinel"))[0]
            for after, reader in resumers:
                got = [e.last_event_id for e in await read_until_id(reader, sentinel)]
                if after is None:
                    want = []
                elif after == "earliest":
                    want = ids
                else:
                    want = ids[ids.index(after) + 1 :]
                assert got == [*want, sentinel], f"resumed after {after}"


def _connection_of(server: Server, local_port: int) -> HTTPProtocol:
    for conn in server.state.connections:
        if conn.client is not None and conn.client[1] == local_port:
            return conn
    raise AssertionError(f"no server connection from port {local_port}")


async def test_slow_subscriber_is_cut_and_does_not_hold_back_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    others, events = 199, 600
    write_buffer = 16384
    payload = "x" * 1000
    async with app_server(write_buffer_bytes=write_buffer, history=events + 10) as (
        server,
        ctx,
    ):
        loop = asyncio.get_running_loop()
        # The slow one: a tiny receive buffer, a request, then never a read.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        async with AsyncExitStack() as stack:
            stack.callback(slow.close)
            await asyncio.wait_for(loop.sock_connect(slow, (HOST, server.port)), 5)
            await loop.sock_sendall(
                slow, f"GET {sub_target('load')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            slow_port = slow.getsockname()[1]
            await eventually(
                lambda: ctx.hub.subscriber_count("load") == 1, what="slow subscriber attached"
            )
            slow_conn = _connection_of(server, slow_port)
            slow_stream = slow_conn._stream
            assert slow_stream is not None
            # Linux autotunes a loopback socket's send buffer up to tcp_wmem's maximum
            # (4 MiB), which would swallow the whole test before the server's own bound
            # (write_buffer_bytes) is ever reached. A fixed small send buffer on this one
            # server-side socket plays a kernel that has no more room.
            assert slow_conn.transport is not None
            server_sock = slow_conn.transport.get_extra_info("socket")
            server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            readers = []
            for _ in range(others):
                client, _resp, reader = await subscribe(server.port, sub_target("load"))
                stack.push_async_callback(client.close)
                readers.append(reader)
            expected = [f"L{i}" for i in range(events)]
            consumers = [
                asyncio.create_task(read_until_id(r, expected[-1], within=60.0)) for r in readers
            ]
            pub = await Publisher.connect(server.port)
            stack.push_async_callback(pub.close)
            frame_size = 1100
            bound = write_buffer + frame_size + 200
            max_buffer = 0
            dropped_at = None
            slow_reading: asyncio.Task[bytes] | None = None

            async def read_all(sock: socket.socket) -> bytes:
                raw = bytearray()
                for _ in range(10_000):
                    try:
                        chunk = await loop.sock_recv(sock, 65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    raw += chunk
                return bytes(raw)

            start = time.monotonic()
            for i, event_id in enumerate(expected):
                await pub.publish("load", payload, id=event_id)
                for conn in list(server.state.connections):
                    if conn.transport is not None:
                        max_buffer = max(max_buffer, conn.transport.get_write_buffer_size())
                if dropped_at is None and slow_stream.close_reason == "slow_client":
                    dropped_at = i
                    slow_reading = asyncio.create_task(read_all(slow))
            await asyncio.wait_for(asyncio.gather(*consumers), 60.0)
            elapsed = time.monotonic() - start

            # The others: everything, in order, and none of them was cut.
            for n, reader in enumerate(readers):
                assert [e.last_event_id for e in reader.parser.events] == expected, n
            assert ctx.hub.subscriber_count("load") == others
            # The slow one was cut, and no transport buffer ever grew past the bound.
            assert slow_stream.close_reason == "slow_client"
            assert dropped_at is not None
            assert max_buffer <= bound, f"a transport buffered {max_buffer} bytes"

            # It started reading as soon as it was cut: what was buffered, the goodbye
            # comment, then the close.
            assert slow_reading is not None
            raw = await asyncio.wait_for(slow_reading, 15.0)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            parser = SSEParser()
            got = parser.feed(complete_chunks(body))
            slow_ids = [e.last_event_id for e in got]
            assert slow_ids == expected[: len(slow_ids)], "the slow one saw a gap"
            assert len(slow_ids) < events
            goodbye = any(c.startswith("slow consumer") for c in parser.comments)
            assert goodbye, parser.comments
            await eventually(
                lambda: slow_conn not in server.state.connections,
                within=server.state.streams.LINGER_S + server.state.streams.tick_s + 2,
                what="the slow connection is closed",
            )

            # It may resume by Last-Event-ID and get exactly the rest.
            resume_after = slow_ids[-1] if slow_ids else "earliest"
            client, _resp, reader = await subscribe(
                server.port, sub_target("load"), [("Last-Event-ID", resume_after)]
            )
            stack.push_async_callback(client.close)
            rest = [e.last_event_id for e in await read_until_id(reader, expected[-1])]
            assert slow_ids + rest == expected
            with capsys.disabled():
                print(
                    f"\n[slow] cut after event {dropped_at}; it had received {len(slow_ids)} "
                    f"events (goodbye comment seen: {goodbye}); max transport buffer "
                    f"{max_buffer} B (bound {bound}); 199 others: {others * events / elapsed:,.0f}"
                    " deliveries/s"
                )


async def test_memory_bounded_with_history_full() -> None:
    history = 100
    topics = ("m1", "m2", "m3")
    async with app_server(history=history) as (server, ctx):
        hub = memory_hub(ctx)
        pub = await Publisher.connect(server.port)
        try:
            for i in range(5 * history):
                for topic in topics:
                    await pub.publish(topic, f"{topic}-{i}")
                if i % 50 == 0:
                    assert all(len(hub._topics[t]) <= history for t in topics)
                    assert len(hub._by_id) <= history * len(topics)
        finally:
            await pub.close()
        for topic in topics:
            held = hub._topics[topic]
            assert len(held) == history
            want = [f"{topic}-{i}" for i in range(4 * history, 5 * history)]
            got = [bytes(u.frame.raw).decode().partition("data: ")[2][:-2] for u in held]
            assert got == want
        assert len(hub._by_id) == history * len(topics)
        assert set(hub._by_id) == {u.id for t in topics for u in hub._topics[t]}


async def test_subscriber_disconnect_unsubscribes() -> None:
    async with app_server() as (server, ctx):
        clients = []
        for _ in range(10):
            client, _resp, _reader = await subscribe(server.port, sub_target(BOOK1))
            clients.append(client)
        client, _resp, _reader = await subscribe(server.port, sub_target(BOOKS))
        clients.append(client)
        assert ctx.hub.subscriber_count() == 11
        for client in clients:
            await client.close()
        await eventually(lambda: ctx.hub.subscriber_count() == 0, what="all unsubscribed")
        await _seed(server.port, BOOK1, 3)  # publishing to nobody is fine
        assert not server.state.streams.streams


async def test_an_id_beyond_latin_1_is_echoed_in_headers_as_utf_8() -> None:
    """An update id may be any text; the head that echoes it (Last-Event-ID) is written as
    UTF-8 instead of failing every later subscription with a 500."""
    async with app_server() as (server, _ctx):
        resp = await publish_one_shot(server.port, [("topic", "t"), ("data", "x"), ("id", "☃")])
        assert resp.status == 200
        client, head, _reader = await subscribe(server.port, sub_target("other"))
        async with client:
            assert head.header("last-event-id") == "☃".encode().decode("latin-1")
