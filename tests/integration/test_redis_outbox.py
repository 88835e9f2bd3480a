"""The Redis hub's outbox during an outage (SPEC §8): generation tokens keep reaching the
local readers, their copies for other instances wait in a queue bounded in bytes, the
oldest are dropped past the bound, and once Redis is back the readers on other instances
are told of the gap (``event: error`` ``missed_events``) between what arrived before and
what arrives after — never a silent gap, never unbounded memory.

Also: malformed stream entries (and gap entries) are skipped and reading goes on; a hub
whose Redis is unreachable at start-up starts anyway (not ready, publishes refused, tokens
delivered locally and kept) and connects and forwards once Redis is there.

``RedisHub``s in this process on a real redis-server, killed and started again on the
same port.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sseserver.hub.base import Subscription
from sseserver.hub.redis import RedisHub
from sseserver.hub.redis_outbox import ENTRY_OVERHEAD, PER_CALL
from sseserver.hub.redis_wire import channel_of, encode_entry, encode_gap, stream_key
from tests.support.hubs import Reader, started_hubs
from tests.support.procs import free_port
from tests.support.redis_server import redis_running
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOPIC = ("streams/outbox",)
PAYLOAD = "x" * 100
OUTBOX_BYTES = 8 * 1024  # ~25 updates of this size


def publish(hub: RedisHub, n: int) -> None:
    hub.dispatch(hub.make_update(TOPIC, f"{n} {PAYLOAD}", id=f"u{n}"))


async def test_outbox_is_bounded_and_other_instances_hear_of_the_gap(tmp_path: Path) -> None:
    with redis_running(tmp_path / "redis") as redis:
        a = RedisHub(redis.url, outbox_bytes=OUTBOX_BYTES)
        b = RedisHub(redis.url)
        await a.start()
        await b.start()
        try:
            here, there = Reader(), Reader()
            a.attach(Subscription(here, TOPIC))  # type: ignore[arg-type]
            await b.subscribe(Subscription(there, TOPIC), None)  # type: ignore[arg-type]
            publish(a, 0)
            await eventually(lambda: len(there.events()) == 1, 5, "u0 reached B")

            redis.kill()
            await eventually(lambda: not b.ready, 5, "B saw Redis go")
            total = 400
            most = 0
            for n in range(1, total + 1):
                publish(a, n)
                most = max(most, a.outbox.held)
            # The bound holds (one update of slack: the newest is always kept).
            assert most <= OUTBOX_BYTES + len(PAYLOAD) + 40 + ENTRY_OVERHEAD, most
            assert a.dropped > 0
            # A's own reader missed nothing.
            assert [e.last_event_id for e in here.events()] == [f"u{n}" for n in range(total + 1)]

            redis.start()
            last = f"u{total}"
            await eventually(
                lambda: any(e.last_event_id == last for e in there.events()),
                15,
                "the last update at B",
            )
        finally:
            await a.aclose()
            await b.aclose()

    events = there.events()
    gaps = [i for i, e in enumerate(events) if e.type == "error"]
    assert len(gaps) >= 1, "the gap was silent"
    notice = json.loads(events[gaps[0]].data)
    assert notice["code"] == "missed_events" and notice["retryable"] is False
    told = sum(json.loads(events[i].data)["message"].split()[0].isdigit() for i in gaps)
    assert told == len(gaps)
    missed = sum(int(json.loads(events[i].data)["message"].split()[0]) for i in gaps)
    assert missed == a.dropped
    ids = [e.last_event_id for e in events if e.type != "error"]
    seqs = [int(i[1:]) for i in ids]
    # Everything B got is in order, once; what it lacks is exactly what was dropped, and
    # the notice stands where the lost updates would have been.
    assert seqs == sorted(set(seqs))
    assert len(seqs) + missed == total + 1
    before_gap = [e for e in events[: gaps[0]] if e.type != "error"]
    after_gap = [e for e in events[gaps[-1] + 1 :] if e.type != "error"]
    assert before_gap and after_gap
    assert int(after_gap[0].last_event_id[1:]) - int(before_gap[-1].last_event_id[1:]) - 1 == missed
    print(f"\n[outbox] {total} updates in the outage, {missed} dropped, peak {most} B held")


async def test_malformed_entries_are_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    """Entries this hub did not write, in a topic's stream (read as history) and on its
    channel (read live), are skipped with a warning; good entries around them arrive."""
    good = encode_entry("elsewhere", 1, TOPIC, "h1", b"id: h1\ndata: early\n\n")
    bad = [
        b"no header line",
        b"not json\n" + b"data: x\n\n",
        b"[1]\n",
        json.dumps({"o": "elsewhere", "t": [1], "i": "bad3"}).encode() + b"\nx",
        json.dumps({"o": "elsewhere", "t": list(TOPIC), "i": ""}).encode() + b"\nx",
        json.dumps({"o": "elsewhere", "t": list(TOPIC), "gap": "many"}).encode() + b"\n",
        encode_gap("elsewhere", 2, (), 3),
    ]
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2) as (a, b):
            client = b.redis
            key, channel = stream_key(TOPIC[0]), channel_of(TOPIC[0])
            for raw in [*bad, good]:
                await client.xadd(key, {"m": raw})
            await client.xadd(key, {"other": "field"})
            there = Reader()
            await b.subscribe(Subscription(there, TOPIC), "earliest")  # type: ignore[arg-type]
            assert [e.last_event_id for e in there.events()] == ["h1"]
            for raw in bad:  # as a writer would: in the stream, then on the channel
                entry_id = await client.xadd(key, {"m": raw})
                await client.spublish(channel, entry_id + b" " + raw)
            for message in (b"", b"no-stream-id", b"x-y " + good):
                await client.spublish(channel, message)
            publish(a, 1)

            def arrived() -> bool:
                return any(e.last_event_id == "u1" for e in there.events())

            await eventually(arrived, 5, "the good update after the bad entries")
            assert [e.last_event_id for e in there.events()] == ["h1", "u1"]
            assert b.ready


async def test_redis_unreachable_at_start_then_there(tmp_path: Path) -> None:
    port = free_port()
    hub = RedisHub(f"redis://127.0.0.1:{port}/0")
    await hub.start()  # does not raise: the server starts, not ready
    try:
        assert not hub.ready
        here = Reader()
        hub.attach(Subscription(here, TOPIC))  # type: ignore[arg-type]
        with pytest.raises(ConnectionError):
            await hub.publish(TOPIC, "refused", id="p0")
        publish(hub, 1)  # a generation's token: delivered here, kept for Redis
        assert [e.last_event_id for e in here.events()] == ["u1"]
        with redis_running(tmp_path / "redis", port=port) as redis:
            await eventually(lambda: hub.ready, 10, "the hub connected")
            client = hub.redis
            assert client is not None

            async def forwarded() -> bool:
                return bool(await client.xlen(stream_key(TOPIC[0])))

            await eventually(forwarded, 10, "the kept token forwarded to Redis")
            assert redis.running
    finally:
        await hub.aclose()


async def test_an_update_redis_refuses_is_dropped_and_the_rest_flows(tmp_path: Path) -> None:
    """A call Redis refuses for good (here a key of another type: WRONGTYPE; in life also
    OOM under maxmemory) is dropped and counted, not retried forever at the head of the
    queue; the updates after it reach the other instance."""
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2) as (a, b):
            await a.redis.set(stream_key("blocked"), "not a stream")
            there = Reader()
            await b.subscribe(Subscription(there, TOPIC), None)  # type: ignore[arg-type]
            a.dispatch(a.make_update(("blocked",), "refused", id="x1"))
            publish(a, 1)
            await eventually(lambda: len(there.events()) == 1, 5, "u1 after the refused one")
            assert a.outbox.refused == 1
            with pytest.raises(ConnectionError):
                await a.publish(("blocked",), "refused too", id="x2")
            publish(a, 2)
            await eventually(lambda: len(there.events()) == 2, 5, "u2 after the refused publish")


async def test_a_write_of_many_updates_keeps_their_order_and_drops_only_the_refused(
    tmp_path: Path,
) -> None:
    """On one redis-server a write carries up to PER_CALL entries in each script call: 400
    updates queued in one loop iteration go in one write (several calls), every tenth to a
    key Redis refuses; the others reach the other instance in order, once each, and only
    the refused are dropped and counted."""
    with redis_running(tmp_path / "redis") as redis:
        async with started_hubs(redis.url, 2) as (a, b):
            await a.redis.set(stream_key("blocked"), "not a stream")
            there = Reader()
            await b.subscribe(Subscription(there, TOPIC), None)  # type: ignore[arg-type]
            writes = a.outbox.writes
            expected = []
            for n in range(400):
                if n % 10 == 0:
                    a.dispatch(a.make_update(("blocked",), "refused", id=f"x{n}"))
                else:
                    publish(a, n)
                    expected.append(f"u{n}")
            assert a.outbox.per_call == PER_CALL < 400  # one redis-server: several a call
            await eventually(lambda: len(there.events()) == len(expected), 10, "all accepted")
            assert [e.last_event_id for e in there.events()] == expected
            # B may read the last entry before A has read Redis's answer to its write.
            await eventually(lambda: a.outbox.refused == 40, 5, "the refused counted")
            assert a.outbox.writes - writes == 1
