"""The Redis hub across processes (SPEC §8, §10): server processes started with
``--hub redis://…`` sharing one real redis-server.

- an update published on instance A reaches a subscriber on instance B;
- a subscriber resumes on B after an id that was published on A;
- an instance started later loads the history from Redis and replays it;
- a generation started on A resumes on B (no sticky sessions);
- Redis crashing and coming back under load: publishes during the outage answer 503 (or
  succeed), ``/readyz`` is 503 while Redis is down and 200 after, and every update whose
  publish was answered 200 reaches the subscriber on B, in order, once — possibly after
  a reconnect with ``Last-Event-ID``: nothing acknowledged is silently lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
import redis.asyncio as aioredis

from tests.support.hubclient import (
    all_ready,
    assert_resumed,
    await_status,
    logs,
    move_mid_generation,
    publish,
    publish_ok,
    request,
    subscribe,
    watch_from_start,
)
from tests.support.rawhttp import (
    SSEReader,
    open_stream,
    read_until_id,
    start_generation,
)
from tests.support.redis_server import (
    RedisServer,
    redis_running,
    sseserver_running,
)
from tests.support.sse_parser import Event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def server_args(redis: RedisServer, *extra: str) -> list[str]:
    return ["--hub", redis.url, "--heartbeat-s", "1", "--shutdown-grace-s", "2", *extra]


# -- sharing topics ----------------------------------------------------------------------


async def test_publish_on_one_instance_reaches_subscribers_on_another(tmp_path: Path) -> None:
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        await all_ready(a, b, within=10)
        client_b, reader_b = await subscribe(b.port, "shared")
        client_a, reader_a = await subscribe(a.port, "shared")
        async with client_a, client_b:
            ids = [f"x{i}" for i in range(20)]
            for i, event_id in enumerate(ids):
                await publish_ok(a.port if i % 2 == 0 else b.port, "shared", f"d{i}", event_id)
            for reader in (reader_a, reader_b):
                events = await read_until_id(reader, ids[-1])
                assert [e.last_event_id for e in events] == ids, logs(a, b)
                assert [e.data for e in events] == [f"d{i}" for i in range(20)]
            # Another topic does not leak in.
            await publish_ok(a.port, "other", "o", "o1")
            await publish_ok(a.port, "shared", "end", "end")
            events = await read_until_id(reader_b, "end")
            assert "o1" not in [e.last_event_id for e in events]


async def test_resume_on_b_after_an_id_published_on_a(tmp_path: Path) -> None:
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        live_client, live = await subscribe(b.port, "book")
        async with live_client:
            ids = [f"e{i}" for i in range(10)]
            for i, event_id in enumerate(ids):
                await publish_ok(a.port, "book", f"d{i}", event_id)
            await read_until_id(live, ids[-1])  # B's mirror holds them all now
        for k in (0, 4, 8, 9):
            client, reader = await subscribe(b.port, "book", last_event_id=ids[k])
            async with client:
                sentinel = f"s{k}"
                await publish_ok(a.port, "book", "sentinel", sentinel)
                got = [e.last_event_id for e in await read_until_id(reader, sentinel)]
                sentinels = [f"s{j}" for j in (0, 4, 8, 9) if j < k]
                assert got == [*ids[k + 1 :], *sentinels, sentinel], (k, logs(a, b))


async def test_new_instance_replays_history_from_redis(tmp_path: Path) -> None:
    with redis_running(tmp_path / "redis") as redis:
        with sseserver_running(tmp_path, *server_args(redis), name="a") as a:
            ids = [f"h{i}" for i in range(30)]
            for i, event_id in enumerate(ids):
                await publish_ok(a.port, f"topic{i % 3}", f"d{i}", event_id)
        # A is gone; C starts later and knows everything from Redis alone.
        with sseserver_running(tmp_path, *server_args(redis), name="c") as c:
            client, reader = await subscribe(c.port, "topic0", last_event_id="earliest")
            async with client:
                want = [ids[i] for i in range(0, 30, 3)]
                got = [e.last_event_id for e in await read_until_id(reader, want[-1])]
                assert got == want, logs(c)
            client, reader = await subscribe(c.port, "topic1", last_event_id="h13")
            async with client:
                want = [ids[i] for i in range(16, 30, 3)]
                got = [e.last_event_id for e in await read_until_id(reader, want[-1])]
                assert got == want
            # A reused id is accepted on C as on A (draft-08: a Last-Event-ID naming it
            # resolves to the earliest).
            resp = await publish(c.port, "topic0", "again", "h0")
            assert resp.status == 200


async def test_generation_started_on_a_resumes_on_b(tmp_path: Path) -> None:
    tokens = 150  # ~3 s at 20 ms a token: still running long after the move to B
    grace = "2"
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis, "--resume-grace-s", grace), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis, "--resume-grace-s", grace), name="b") as b,
    ):
        # EventSource waits its retry time (2 s by default) before it reconnects; a
        # fraction of that lets A's updates reach B through Redis, as they would have.
        first, rest = await move_mid_generation(a, b, tokens, pause_s=0.3)
        assert_resumed(first, rest, tokens)


async def test_immediate_reconnect_to_b_resumes_instead_of_starting_anew(
    tmp_path: Path,
) -> None:
    """A reader may reconnect to B before A has forwarded the event it just read: B waits
    (bounded) for it instead of taking the generation for an unknown one and paying for
    a new one. Mid-stream: replay then live; past the end: 204."""
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        client, resp, reader = await open_stream(a.port, "/v1/stream?tokens=20&interval_ms=50")
        async with client:
            await reader.until(lambda r: any(e.type == "message" for e in r.parser.events))
            first = list(reader.parser.events)
        gen_id = json.loads(first[0].data)["id"]
        client, resp, reader = await open_stream(
            b.port, "/v1/stream", headers=[("Last-Event-ID", first[-1].last_event_id)]
        )
        async with client:
            assert resp.status == 200
            rest = await reader.rest(within=20)
        assert rest and all(e.last_event_id.startswith(f"{gen_id}:") for e in rest), rest[:3]
        assert rest[-1].data == "[DONE]"
        # Past the end, at once: 204 (EventSource stops).
        client, resp, reader = await open_stream(a.port, "/v1/stream?tokens=3&interval_ms=0")
        async with client:
            done = await reader.rest(within=10)
        past_end = [("Last-Event-ID", done[-1].last_event_id)]
        resp_b = await request(b.port, "GET", "/v1/stream", past_end)
        assert resp_b.status == 204, resp_b.body[:200]


async def test_a_watch_asked_of_b_before_a_has_forwarded_the_start_waits_for_it(
    tmp_path: Path,
) -> None:
    """The generation's id reaches its reader from A before A's write of the start event
    reaches Redis (held here by pausing Redis's writes): a watch opened on B meanwhile
    waits for it, bounded, rather than answering 404 for a generation that exists."""
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        async with aioredis.Redis(port=redis.port) as admin:
            await admin.client_pause(150, all=False)  # WRITE: scripts wait
            own, watched = await watch_from_start(a, b, 20)
        ids = [e.last_event_id for e in own]
        assert [e.last_event_id for e in watched] == ids, (watched[:3], ids[:3])
        missing = await request(b.port, "GET", "/v1/streams/nope")
        assert missing.status == 404


async def test_concurrent_stream_cap_is_shared_across_instances(tmp_path: Path) -> None:
    """--max-streams-per-subject 2 with the Redis hub: two streams of one subject on A
    leave none for it on B; when one ends, B has a slot again (leases in Redis)."""
    cap = ("--max-streams-per-subject", "2")
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis, *cap), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis, *cap), name="b") as b,
    ):
        long_stream = "/v1/stream?tokens=100000&interval_ms=50"
        first = await open_stream(a.port, long_stream)
        second = await open_stream(a.port, long_stream)
        try:
            assert first[1].status == 200 and second[1].status == 200
            refused = await request(b.port, "GET", long_stream)
            assert refused.status == 429, refused.body[:200]
            assert refused.header("retry-after") is not None
            assert json.loads(refused.body)["error"]["code"] == "too_many_streams"
            await first[0].close()  # one slot comes back, wherever it was taken
            third = None
            for _ in range(100):  # bounded: the slot returns once A has seen the close
                attempt = await open_stream(b.port, long_stream)
                if attempt[1].status == 200:
                    third = attempt
                    break
                await attempt[0].close()
                await asyncio.sleep(0.02)
            assert third is not None, "the freed slot never became available on B"
            await third[0].close()
        finally:
            await first[0].close()
            await second[0].close()


async def test_cancel_asked_of_b_stops_the_generation_on_a(tmp_path: Path) -> None:
    """The Stop button's request may land on another instance than the generation."""
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        client, resp, reader = await open_stream(a.port, "/v1/stream?tokens=100000&interval_ms=20")
        async with client:
            assert resp.status == 200
            await reader.until(lambda r: len(r.parser.events) >= 3)
            gen_id = json.loads(reader.parser.events[0].data)["id"]
            # B knows the generation once its first events have come through Redis.
            for _ in range(200):
                answer = await request(b.port, "POST", f"/v1/streams/{gen_id}/cancel")
                if answer.status != 404:
                    break
                await asyncio.sleep(0.02)
            assert answer.status == 200, answer.body
            assert json.loads(answer.body) == {"id": gen_id, "cancelled": True}
            rest = await reader.rest(within=10)
        errors = [json.loads(e.data) for e in rest if e.type == "error"]
        assert [e["code"] for e in errors] == ["cancelled"]
        assert rest[-1].data == "[DONE]"
        # An id nobody runs is still a 404.
        missing = await request(b.port, "POST", "/v1/streams/nope/cancel")
        assert missing.status == 404


async def test_cancel_while_redis_is_down_is_503_then_works_once_it_is_back(
    tmp_path: Path,
) -> None:
    """A cancel that cannot reach the instance running the generation says so (503), never
    a false 200; once Redis is back both instances' cancel channels reconnect and the
    same request stops the generation."""
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        client, reader, gen_id = await start_generation(
            a.port, "/v1/stream?tokens=100000&interval_ms=20"
        )
        async with client:
            await reader.until(lambda r: len(r.parser.events) >= 3)
            target = f"/v1/streams/{gen_id}/cancel"
            for _ in range(200):  # B knows it once its first events came through Redis
                watcher, watched, _ = await open_stream(b.port, f"/v1/streams/{gen_id}")
                await watcher.close()
                if watched.status == 200:
                    break
                await asyncio.sleep(0.02)
            assert watched.status == 200, watched.status

            redis.kill()
            await await_status(b.port, "/readyz", 503, 10)
            down = await request(b.port, "POST", target)
            assert down.status == 503, down.body
            assert json.loads(down.body)["error"]["code"] == "hub_unavailable"
            # The generation went on meanwhile on A (its reader saw no error).
            count = len(reader.parser.events)
            await reader.until(lambda r: len(r.parser.events) > count + 2)
            assert all(e.type != "error" for e in reader.parser.events)

            redis.start()
            await all_ready(a, b, within=15)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # until both cancel channels are back
                answer = await request(b.port, "POST", target)
                if answer.status == 200 or reader.parser.events[-1].data == "[DONE]":
                    break
                await asyncio.sleep(0.1)
            await reader.rest(within=15)
        events = reader.parser.events  # every event the body carried
        errors = [json.loads(e.data) for e in events if e.type == "error"]
        assert [e["code"] for e in errors] == ["cancelled"], logs(a, b)
        assert events[-1].data == "[DONE]"


async def test_a_generation_stays_its_owners_across_instances(tmp_path: Path) -> None:
    """SPEC §9 with two instances: the owner travels with the generation's first event
    through Redis, so B answers bob as for an unknown id and alice as her own."""
    secret = "redis-ownership-secret-long-enough-for-hs256!"
    alice = [("Authorization", "Bearer " + jwt.encode({"sub": "alice"}, secret, "HS256"))]
    bob = [("Authorization", "Bearer " + jwt.encode({"sub": "bob"}, secret, "HS256"))]
    auth = ("--jwt-secret", secret)
    with (
        redis_running(tmp_path / "redis") as redis,
        sseserver_running(tmp_path, *server_args(redis, *auth), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis, *auth), name="b") as b,
    ):
        long_stream = "/v1/stream?tokens=100000&interval_ms=20"
        client, resp, reader = await open_stream(a.port, long_stream, headers=alice)
        async with client:
            assert resp.status == 200
            await reader.until(lambda r: len(r.parser.events) >= 3)
            gen_id = json.loads(reader.parser.events[0].data)["id"]
            for _ in range(200):  # bounded: B knows it once its events came through Redis
                watch = await open_stream(b.port, f"/v1/streams/{gen_id}", headers=alice)
                await watch[0].close()
                if watch[1].status == 200:
                    break
                await asyncio.sleep(0.02)
            assert watch[1].status == 200
            unknown = await request(b.port, "GET", "/v1/streams/nope", bob)
            for method, target in (
                ("GET", f"/v1/streams/{gen_id}"),
                ("POST", f"/v1/streams/{gen_id}/cancel"),
            ):
                answer = await request(b.port, method, target, bob)
                assert answer.status == 404, (method, answer.body)
                assert json.loads(answer.body) == json.loads(unknown.body)
            # bob's reconnect naming alice's generation: a new one of his own, on B.
            other, resp, other_reader = await open_stream(
                b.port,
                "/v1/stream?tokens=2&interval_ms=0",
                headers=[*bob, ("Last-Event-ID", f"{gen_id}:2")],
            )
            async with other:
                events = await other_reader.rest(within=10)
            assert events[0].type == "start" and json.loads(events[0].data)["id"] != gen_id
            # alice may stop it from B.
            answer = await request(b.port, "POST", f"/v1/streams/{gen_id}/cancel", alice)
            assert answer.status == 200, answer.body
            rest = await reader.rest(within=10)
        assert [json.loads(e.data)["code"] for e in rest if e.type == "error"] == ["cancelled"]


# -- Redis going away under load ---------------------------------------------------------


def more_than(n: int) -> Callable[[SSEReader], bool]:
    return lambda r: len(r.parser.events) > n


class ResumingSubscriber:
    """A subscriber that reconnects (with Last-Event-ID) whenever its stream ends or its
    connection drops, as EventSource does; keeps every event it received."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.events: list[Event] = []
        self.connects = 0
        self.stop = asyncio.Event()

    @property
    def last_id(self) -> str | None:
        return self.events[-1].last_event_id if self.events else None

    async def run(self) -> None:
        for _ in range(100):  # bounded number of reconnects
            if self.stop.is_set():
                return
            try:
                client, reader = await subscribe(self.port, self.topic, self.last_id)
            except (OSError, AssertionError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            self.connects += 1
            async with client:
                seen = 0
                while not self.stop.is_set():
                    try:
                        await reader.until(more_than(seen), within=0.2)
                    except TimeoutError:
                        continue
                    except (AssertionError, OSError):
                        break  # the stream ended or the connection closed: reconnect
                    finally:
                        self.events.extend(reader.parser.events[seen:])
                        seen = len(reader.parser.events)
            await asyncio.sleep(0.1)
        raise AssertionError("too many reconnects")


async def test_redis_restart_under_load_loses_nothing_acknowledged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        redis_running(tmp_path / "redis", appendonly=True) as redis,
        sseserver_running(tmp_path, *server_args(redis), name="a") as a,
        sseserver_running(tmp_path, *server_args(redis), name="b") as b,
    ):
        await all_ready(a, b, within=10)
        subscriber = ResumingSubscriber(b.port, "load")
        sub_task = asyncio.create_task(subscriber.run())
        await asyncio.sleep(0.3)
        results: list[tuple[str, int | str]] = []
        stop_publishing = asyncio.Event()

        async def publisher() -> None:
            for n in range(2000):  # bounded in count; stopped by the test in time
                if stop_publishing.is_set():
                    return
                event_id = f"r{n}"
                try:
                    resp = await publish(a.port, "load", f"payload {n}", event_id, within=10)
                    results.append((event_id, resp.status))
                except (OSError, TimeoutError, AssertionError) as exc:
                    results.append((event_id, repr(exc)))
                await asyncio.sleep(0.02)

        pub_task = asyncio.create_task(publisher())
        try:
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            redis.kill()
            not_ready_a = await await_status(a.port, "/readyz", 503, 10)
            not_ready_b = await await_status(b.port, "/readyz", 503, 10)
            await asyncio.sleep(1.5)
            redis.start()
            restarted_at = time.monotonic()
            ready_a = await await_status(a.port, "/readyz", 200, 15)
            ready_b = await await_status(b.port, "/readyz", 200, 15)
            await asyncio.sleep(1.0)
        finally:
            stop_publishing.set()
            await asyncio.wait_for(pub_task, 30)
        try:
            # A last update, retried until acknowledged, marks the end.
            for attempt in range(50):
                resp = await publish(a.port, "load", "the end", f"end-{attempt}")
                if resp.status == 200:
                    sentinel = f"end-{attempt}"
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("could not publish after Redis came back\n" + logs(a, b))
            deadline = time.monotonic() + 20
            while subscriber.last_id != sentinel and time.monotonic() < deadline:
                assert not sub_task.done() or sub_task.exception() is None
                await asyncio.sleep(0.05)
        finally:
            subscriber.stop.set()
            await asyncio.wait_for(sub_task, 10)

        statuses = [s for _i, s in results]
        ok = [i for i, s in results if s == 200]
        refused = [i for i, s in results if s == 503]
        other = [(i, s) for i, s in results if s not in (200, 503)]
        received = [e.last_event_id for e in subscriber.events]
        order = {event_id: n for n, (event_id, _s) in enumerate(results)}
        with capsys.disabled():
            print(
                f"\n[redis restart] {len(results)} publishes: {len(ok)} x 200, "
                f"{len(refused)} x 503, {len(other)} other; subscriber connects: "
                f"{subscriber.connects}; readyz 503 after {not_ready_a:.2f}s (A) / "
                f"{not_ready_b:.2f}s (B) of the kill; 200 again {ready_a:.2f}s (A) / "
                f"{ready_b:.2f}s (B) after the restart; outage "
                f"{restarted_at - killed_at:.2f}s"
            )
        assert other == [], f"publishes must answer 200 or 503: {other[:5]}\n" + logs(a, b)
        assert refused, "nothing was refused while Redis was down"
        assert received[-1] == sentinel, logs(a, b)
        assert len(received) == len(set(received)), "duplicates"
        body = received[:-1]
        assert all(i in order for i in body), "received an update never published"
        assert [order[i] for i in body] == sorted(order[i] for i in body), "out of order"
        missing = [i for i in ok if i not in set(body)]
        assert missing == [], (
            f"{len(missing)} acknowledged updates never reached the subscriber: "
            f"{missing[:10]}\n{logs(a, b)}"
        )
        assert set(statuses) <= {200, 503}
