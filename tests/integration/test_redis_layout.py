"""What the Redis hub leaves in Redis (SPEC §8), read back from a real redis-server:

- each topic is a stream of its own, trimmed to about ``--history`` entries, living
  ``--history-age-s`` past its last update (and only the resume window past a
  generation's end); nothing else grows per update;
- a stream and its channel share one hash tag (one Redis Cluster slot);
- an instance follows exactly the topics its readers need, and lets them go after;
- history older than ``--history-age-s`` is not loaded by another instance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sseserver.hub.base import Subscription
from sseserver.hub.redis_wire import channel_of, encode_entry, stream_key
from sseserver.wire.chunked import Frame
from tests.support.hubs import Reader, started_hubs
from tests.support.redis_server import redis_running
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_a_stream_and_its_channel_share_a_slot() -> None:
    for topic in ("streams/abc", "https://example.com/books/1", "{x}", None):
        key, channel = stream_key(topic), channel_of(topic)
        assert key.split("{", 1)[1].split("}", 1)[0] == channel.split("{", 1)[1].split("}", 1)[0]
    assert stream_key("a") != stream_key("b")


async def test_streams_are_trimmed_and_expire(tmp_path: Path) -> None:
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(
            redis.url, 1, history=20, history_age_s=600, resume_window_s=30
        ) as (hub,):
            client = hub.redis
            for n in range(500):
                hub.dispatch(hub.make_update(("news",), f"d{n}", id=f"n{n}"))
            hub.dispatch(hub.make_update(("streams/g",), "t", id="g:1"))
            hub.dispatch(hub.make_update(("streams/g",), "[DONE]", id="g:2", final=True))

            async def written() -> bool:
                return bool(await client.xlen(stream_key("streams/g")) == 2)

            await eventually(written, 10, "the updates written")
            # About --history entries (MAXLEN ~ trims whole nodes of 100 entries).
            assert 20 <= await client.xlen(stream_key("news")) <= 150
            idle = await client.pttl(stream_key("news"))
            assert 590_000 < idle <= 600_000, idle
            ended = await client.pttl(stream_key("streams/g"))
            assert 20_000 < ended <= 30_000, ended
            # One stream per topic, nothing else per update.
            keys = sorted(k.decode() for k in await client.keys("sseserver:*"))
            assert keys == sorted([stream_key("news"), stream_key("streams/g")])


async def test_an_instance_follows_what_its_readers_need_and_lets_go(tmp_path: Path) -> None:
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2) as (a, b):
            assert b.followed == []
            reader = Reader()
            await b.subscribe(Subscription(reader, ("one",)), None)  # type: ignore[arg-type]
            wild = Reader()
            await b.subscribe(Subscription(wild, ("*",)), None)  # type: ignore[arg-type]
            assert sorted(b.followed, key=str) == [None, "one"]
            a.dispatch(a.make_update(("two",), "not for b", id="t1"))
            await a.publish(("one",), "for b", id="o1")
            await eventually(lambda: len(reader.events()) == 1, 5, "o1 at B")
            # The pattern reader has it once (from the firehose), the exact one once.
            await eventually(lambda: len(wild.events()) == 1, 5, "o1 at B's * reader")
            assert b.get("t1") is None
            reader.close()
            wild.close()
            await b.follower.let_go(float("inf"))  # as the sweeper does, LINGER_S after
            assert b.followed == []
            # Followed again: only what came after is loaded, nothing twice.
            await a.publish(("one",), "later", id="o2")
            again = Reader()
            await b.subscribe(Subscription(again, ("one",)), "earliest")  # type: ignore[arg-type]
            assert [e.last_event_id for e in again.events()] == ["o1", "o2"]


async def test_history_past_its_age_is_not_loaded(tmp_path: Path) -> None:
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 1, history_age_s=60, resume_window_s=60) as (b,):
            client = b.redis
            key = stream_key("old")
            entry = encode_entry("elsewhere", 1, ("old",), "ancient", b"id: ancient\ndata: x\n\n")
            await client.xadd(key, {"m": entry}, id="1000-0")  # 1970: far past the age
            fresh = encode_entry("elsewhere", 2, ("old",), "fresh", b"id: fresh\ndata: y\n\n")
            await client.xadd(key, {"m": fresh})
            reader = Reader()
            await b.subscribe(Subscription(reader, ("old",)), "earliest")  # type: ignore[arg-type]
            assert [e.last_event_id for e in reader.events()] == ["fresh"]


async def test_a_generations_owner_outlives_the_trimming_of_its_first_entry(
    tmp_path: Path,
) -> None:
    """Every entry of a topic carries its owner: an instance that loads a long
    generation's stream after its first entry was trimmed still knows whose it is."""
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2, history=10) as (a, b):
            topic = ("streams/long",)
            a.dispatch(a.make_update(topic, "start", id="long:1", owner="alice"))
            for n in range(2, 400):
                a.dispatch(a.update_of(topic, f"long:{n}", Frame.of(f"data: {n}\n\n".encode())))
            client = a.redis

            async def trimmed() -> bool:
                first = await client.xrange(stream_key(topic[0]), count=1)
                return bool(first) and b"long:1" not in first[0][1][b"m"]

            await eventually(trimmed, 10, "the first entry trimmed away")
            await b.fetch(topic)
            assert b.owner(topic[0]) == "alice"


async def test_an_entry_brought_by_two_follows_is_taken_once(tmp_path: Path) -> None:
    """A Mercure update is in its topic's stream and in the firehose: a pattern reader
    arriving after the topic was loaded does not add its copies to history again."""
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2) as (a, b):
            for n in range(5):
                await a.publish(("one",), f"d{n}", id=f"e{n}")
            first = Reader()
            await b.subscribe(Subscription(first, ("one",)), "earliest")  # type: ignore[arg-type]
            wild = Reader()
            await b.subscribe(Subscription(wild, ("*",)), "earliest")  # type: ignore[arg-type]
            await a.publish(("one",), "live", id="e5")
            want = [f"e{n}" for n in range(6)]
            await eventually(lambda: len(first.events()) == 6, 5, "e5 at the exact reader")
            await eventually(lambda: len(wild.events()) == 6, 5, "e5 at the pattern reader")
            assert [e.last_event_id for e in first.events()] == want
            assert [e.last_event_id for e in wild.events()] == want
            again = Reader()
            await b.subscribe(Subscription(again, ("one",)), "earliest")  # type: ignore[arg-type]
            assert [e.last_event_id for e in again.events()] == want
