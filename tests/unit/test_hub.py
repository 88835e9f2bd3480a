"""The in-memory hub without sockets (SPEC §8): Mercure topic selectors, bounded history
(count and age), replay after a Last-Event-ID, private updates, and fan-out that writes
ONE shared frame to every subscriber and survives a subscriber that is gone.

Subscribers are ``FakeStream``s: they record the very ``Frame`` objects the hub hands
them, so identity (``is``) shows that an update is encoded and framed once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sseserver.http.stream import EventStream
from sseserver.hub import memory
from sseserver.hub.base import EARLIEST, Subscription, Update, selector_matches
from sseserver.hub.memory import MemoryHub
from sseserver.wire.chunked import Frame

pytestmark = pytest.mark.timeout(30)

BOOKS = "https://example.com/books/{id}"


class FakeStream:
    """What the hub needs of an ``EventStream``: ``write_frame``, ``on_close``,
    ``finish`` and ``close``. ``accept=False`` plays a stream that is already closed;
    ``drop_on_write`` plays a slow reader cut by ``EventStream.drop_slow`` (its close
    callbacks run from inside the hub's ``write_frame`` call, as the real one's do)."""

    def __init__(self, *, accept: bool = True, drop_on_write: bool = False) -> None:
        self.frames: list[Frame] = []
        self.accept = accept
        self.drop_on_write = drop_on_write
        self.callbacks: list[Callable[[Any], None]] = []
        self.ended: str | None = None

    def write_frame(self, f: Frame) -> bool:
        if self.drop_on_write:
            self.drop_on_write = False
            self.accept = False
            self._run_callbacks("slow_client")
            return False
        if not self.accept or self.ended is not None:
            return False
        self.frames.append(f)
        return True

    def on_close(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def finish(self, reason: str = "complete") -> None:
        self._run_callbacks(reason)

    def close(self, reason: str = "complete") -> None:
        self._run_callbacks(reason)

    def _run_callbacks(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb(self)

    @property
    def ids(self) -> list[str]:
        return [_id_of(f) for f in self.frames]


def _id_of(f: Frame) -> str:
    for line in bytes(f.raw).decode().split("\n"):
        if line.startswith("id: "):
            return line[4:]
    raise AssertionError(f"frame without id: {f.raw!r}")


def sub(
    stream: FakeStream, *selectors: str, private: tuple[str, ...] | None = None
) -> Subscription:
    return Subscription(cast(EventStream, stream), tuple(selectors), private)


async def attach(
    hub: MemoryHub,
    *selectors: str,
    private: tuple[str, ...] | None = None,
    last_event_id: str | None = None,
) -> tuple[FakeStream, list[Update], bool]:
    stream = FakeStream()
    updates, found = await hub.subscribe(sub(stream, *selectors, private=private), last_event_id)
    return stream, updates, found


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the hub module's ``time`` (not the global one: asyncio needs it)."""
    fake = FakeClock()
    monkeypatch.setattr(memory, "time", fake)
    return fake


# -- selectors ---------------------------------------------------------------------------

SELECTOR_CASES = [
    # (selector, topic, matches)
    ("https://example.com/books/1", "https://example.com/books/1", True),
    ("https://example.com/books/1", "https://example.com/books/2", False),
    ("https://example.com/books/1", "https://example.com/books/10", False),
    ("https://example.com/books/1", "https://example.com/books/", False),
    ("a", "A", False),
    ("*", "https://example.com/books/1", True),
    ("*", "anything at all", True),
    (BOOKS, "https://example.com/books/1", True),
    (BOOKS, "https://example.com/books/abc-def", True),
    (BOOKS, "https://example.com/books/1/reviews", False),  # {id} is one segment
    (BOOKS, "https://example.com/authors/1", False),
    (BOOKS, "https://example.com/books/1?x=y", False),
    (BOOKS, "https://example.com/books/1#frag", False),
    (BOOKS, "xhttps://example.com/books/1", False),  # anchored at the start
    (BOOKS, "https://example.com/books/1x/y", False),  # and at the end
    ("https://example.com/{+path}", "https://example.com/a/b/c", True),
    ("https://example.com/{+path}", "https://example.com/", True),
    ("https://example.com/{+path}", "https://other.com/a", False),
    ("https://example.com/books/{id}.json", "https://example.com/books/7.json", True),
    # The dot of the template is literal, not a regex wildcard.
    ("https://example.com/books/{id}.json", "https://example.com/books/7xjson", False),
    ("https://example.com/{a}/{b}", "https://example.com/x/y", True),
    ("https://example.com/{a}/{b}", "https://example.com/x", False),
    # Regex metacharacters in a plain selector are literal.
    ("https://example.com/a+b", "https://example.com/aab", False),
    ("https://example.com/a.b", "https://example.com/axb", False),
]


@pytest.mark.parametrize(("selector", "topic", "expected"), SELECTOR_CASES)
def test_selector_matches(selector: str, topic: str, expected: bool) -> None:
    assert selector_matches(selector, topic) is expected


# -- fan-out -----------------------------------------------------------------------------


async def test_one_frame_object_shared_by_every_subscriber() -> None:
    hub = MemoryHub()
    exact = [(await attach(hub, "https://example.com/books/1"))[0] for _ in range(5)]
    wild, _, _ = await attach(hub, "*")
    template, _, _ = await attach(hub, BOOKS)
    plus, _, _ = await attach(hub, "https://example.com/{+rest}")
    other, _, _ = await attach(hub, "https://example.com/books/2")
    streams = [*exact, wild, template, plus]

    event_id = await hub.publish(("https://example.com/books/1",), "hello", id="u1")

    assert event_id == "u1"
    assert other.frames == []
    first = streams[0].frames[0]
    for stream in streams:
        assert len(stream.frames) == 1
        assert stream.frames[0] is first, "every subscriber must get the same Frame object"
        assert stream.frames[0].chunked is first.chunked
        assert stream.frames[0].raw == first.raw  # a view into that chunk, not a copy
    assert first.raw == b"id: u1\ndata: hello\n\n"
    assert first.chunked == b"%x\r\n" % len(first.raw) + first.raw + b"\r\n"
    assert hub.deliveries == len(streams)
    # The frame kept in history for replay is that same object too.
    (held,) = hub.held("https://example.com/books/1")
    assert held.frame is first


async def test_a_subscriber_that_is_gone_does_not_break_the_others() -> None:
    hub = MemoryHub()
    before, _, _ = await attach(hub, "t")
    dead = FakeStream(accept=False)
    await hub.subscribe(sub(dead, "t"), None)
    dropped = FakeStream(drop_on_write=True)  # unsubscribes itself mid-fan-out
    await hub.subscribe(sub(dropped, "t"), None)
    wild_dead = FakeStream(accept=False)
    await hub.subscribe(sub(wild_dead, "*"), None)
    after, _, _ = await attach(hub, "t")

    for i in range(10):
        await hub.publish(("t",), f"d{i}", id=f"e{i}")

    expected = [f"e{i}" for i in range(10)]
    assert before.ids == expected
    assert after.ids == expected
    assert dead.frames == [] and dropped.frames == [] and wild_dead.frames == []
    # 2 live subscribers x 10 updates; the failed writes are not counted as deliveries.
    assert hub.deliveries == 20
    # The dropped stream's close callback unsubscribed it (during the fan-out itself).
    assert hub.subscriber_count("t") == 3  # before, dead, after


async def test_update_to_several_topics_is_delivered_once_per_subscriber() -> None:
    hub = MemoryHub()
    both, _, _ = await attach(hub, "a", "b")
    wild, _, _ = await attach(hub, "*", "a")
    only_b, _, _ = await attach(hub, "b")
    await hub.publish(("a", "b"), "x", id="ab")
    await hub.publish(("c",), "y", id="c")
    assert both.ids == ["ab"]
    assert wild.ids == ["ab", "c"]
    assert only_b.ids == ["ab"]


async def test_unsubscribe_on_close_stops_delivery() -> None:
    hub = MemoryHub()
    stream, _, _ = await attach(hub, "t")
    wild, _, _ = await attach(hub, "{+all}")
    await hub.publish(("t",), "1", id="1")
    stream.close()
    wild.close()
    await hub.publish(("t",), "2", id="2")
    assert stream.ids == ["1"] and wild.ids == ["1"]
    assert hub.subscriber_count() == 0


# -- private updates ---------------------------------------------------------------------


async def test_private_updates_only_to_matching_private_selectors() -> None:
    hub = MemoryHub()
    topic = "https://example.com/books/1"
    no_rights, _, _ = await attach(hub, topic)
    exact_right, _, _ = await attach(hub, topic, private=(topic,))
    template_right, _, _ = await attach(hub, BOOKS, private=(BOOKS,))
    star_right, _, _ = await attach(hub, "*", private=("*",))
    wrong_right, _, _ = await attach(hub, topic, private=("https://example.com/books/2",))
    wild_no_rights, _, _ = await attach(hub, "*")
    empty_rights, _, _ = await attach(hub, topic, private=())

    await hub.publish((topic,), "secret", id="p1", private=True)
    await hub.publish((topic,), "public", id="u1")

    for allowed in (exact_right, template_right, star_right):
        assert allowed.ids == ["p1", "u1"]
    for denied in (no_rights, wrong_right, wild_no_rights, empty_rights):
        assert denied.ids == ["u1"]


async def test_private_update_with_several_topics_needs_one_matching_right() -> None:
    hub = MemoryHub()
    right_on_second, _, _ = await attach(hub, "a", private=("b",))
    right_on_neither, _, _ = await attach(hub, "a", private=("c",))
    await hub.publish(("a", "b"), "s", id="p", private=True)
    assert right_on_second.ids == ["p"]
    assert right_on_neither.ids == []


async def test_replay_hides_private_updates_without_rights() -> None:
    hub = MemoryHub()
    await hub.publish(("t",), "1", id="e1")
    await hub.publish(("t",), "2", id="e2", private=True)
    await hub.publish(("t",), "3", id="e3")
    plain, updates, found = await attach(hub, "t", last_event_id=EARLIEST)
    assert found and [u.id for u in updates] == ["e1", "e3"] and plain.ids == ["e1", "e3"]
    entitled, updates, _ = await attach(hub, "t", private=("t",), last_event_id=EARLIEST)
    assert entitled.ids == ["e1", "e2", "e3"]


# -- history and replay ------------------------------------------------------------------


async def test_replay_after_an_id_then_live() -> None:
    hub = MemoryHub()
    ids = [await hub.publish(("t",), f"d{i}", id=f"e{i}") for i in range(10)]
    await hub.publish(("other",), "x", id="o1")
    stream, updates, found = await attach(hub, "t", last_event_id="e3")
    assert found
    assert [u.id for u in updates] == ids[4:]
    assert stream.ids == ids[4:]
    await hub.publish(("t",), "live", id="e10")
    assert stream.ids == [*ids[4:], "e10"]


async def test_replay_after_the_last_id_is_empty_but_found() -> None:
    hub = MemoryHub()
    for i in range(3):
        await hub.publish(("t",), "d", id=f"e{i}")
    stream, updates, found = await attach(hub, "t", last_event_id="e2")
    assert found and updates == [] and stream.frames == []


async def test_replay_earliest_gives_everything_held_in_order() -> None:
    hub = MemoryHub()
    for i in range(5):
        await hub.publish(("a",) if i % 2 else ("b",), f"d{i}", id=f"e{i}")
    a, _, found = await attach(hub, "a", last_event_id=EARLIEST)
    assert found and a.ids == ["e1", "e3"]
    everything, _, _ = await attach(hub, "*", last_event_id=EARLIEST)
    assert everything.ids == [f"e{i}" for i in range(5)]
    both, _, _ = await attach(hub, "a", "b", last_event_id="e1")
    assert both.ids == ["e2", "e3", "e4"]


async def test_replay_with_a_wildcard_after_an_id_of_another_topic() -> None:
    hub = MemoryHub()
    for i in range(6):
        await hub.publish((f"t{i % 3}",), "d", id=f"e{i}")
    templ, _, found = await attach(hub, "t{n}", last_event_id="e2")
    assert found and templ.ids == ["e3", "e4", "e5"]


async def test_unknown_id_is_not_found_and_replays_nothing() -> None:
    hub = MemoryHub()
    await hub.publish(("t",), "d", id="e1")
    stream, updates, found = await attach(hub, "t", last_event_id="never-published")
    assert not found and updates == [] and stream.frames == []
    # Still attached: live updates arrive.
    await hub.publish(("t",), "d", id="e2")
    assert stream.ids == ["e2"]


async def test_no_last_event_id_replays_nothing() -> None:
    hub = MemoryHub()
    await hub.publish(("t",), "d", id="e1")
    stream, updates, found = await attach(hub, "t")
    assert found and updates == [] and stream.frames == []


async def test_history_bounded_by_count() -> None:
    hub = MemoryHub(history=5)
    ids = [await hub.publish(("t",), f"d{i}", id=f"e{i}") for i in range(12)]
    other = [await hub.publish(("u",), "d", id=f"u{i}") for i in range(3)]
    assert [u.id for u in hub.held("t")] == ids[-5:]
    assert [u.id for u in hub.held("u")] == other
    assert len(hub._by_id) == 8
    assert hub.get("e0") is None and hub.get("e6") is None and hub.get("e7") is not None
    # The oldest held id still resumes; an evicted one is a gap.
    stream, _, found = await attach(hub, "t", last_event_id="e7")
    assert found and stream.ids == ids[8:]
    _, updates, found = await attach(hub, "t", last_event_id="e5")
    assert not found and updates == []
    # A held id may be reused too (draft-08 §6): it still names the earliest holder.
    await hub.publish(("t",), "d", id="e8")
    held = hub.get("e8")
    assert held is not None and held.seq < hub.held("t")[-1].seq


async def test_memory_bounded_after_many_times_the_history() -> None:
    history = 50
    hub = MemoryHub(history=history)
    topics = [f"t{i}" for i in range(4)]
    for i in range(5 * history * len(topics)):
        await hub.publish((topics[i % len(topics)],), "x" * 100)
    for topic in topics:
        assert len(hub._topics[topic]) == history
    assert len(hub._by_id) == history * len(topics)
    assert set(hub._by_id) == {u.id for t in topics for u in hub.held(t)}


async def test_zero_history_keeps_nothing() -> None:
    hub = MemoryHub(history=0)
    live, _, _ = await attach(hub, "t")
    await hub.publish(("t",), "d", id="e1")
    assert live.ids == ["e1"]
    assert hub.held("t") == [] and hub._by_id == {}
    _, _, found = await attach(hub, "t", last_event_id="e1")
    assert not found


async def test_history_bounded_by_age(clock: FakeClock) -> None:
    hub = MemoryHub(history=100, history_age_s=10.0)
    for i in range(3):
        await hub.publish(("t",), "d", id=f"old{i}")
    clock.now += 5
    for i in range(2):
        await hub.publish(("t",), "d", id=f"mid{i}")
    clock.now += 6  # the first three are 11 s old now
    await hub.publish(("t",), "d", id="new")
    assert [u.id for u in hub.held("t")] == ["mid0", "mid1", "new"]
    assert hub.get("old0") is None
    _, _, found = await attach(hub, "t", last_event_id="old2")
    assert not found
    # With no publish at all, a replay still sees only what is young enough.
    clock.now += 5.5  # mid* are 11.5 s old, new is 5.5 s old
    stream, _, found = await attach(hub, "t", last_event_id=EARLIEST)
    assert found and stream.ids == ["new"]
    clock.now += 100
    stream, _, _ = await attach(hub, "t", last_event_id=EARLIEST)
    assert stream.frames == []
    assert hub.held("t") == [] and hub._by_id == {}


async def test_history_age_applies_to_every_topic(clock: FakeClock) -> None:
    """Interleaved topics: an old update of a topic published to recently must age out
    too, whatever the order in which topics were last touched."""
    hub = MemoryHub(history=100, history_age_s=10.0)
    await hub.publish(("a",), "d", id="a-old")  # t=0
    clock.now += 1
    await hub.publish(("b",), "d", id="b-old")  # t=1
    clock.now += 8
    await hub.publish(("a",), "d", id="a-new")  # t=9
    clock.now += 1
    await hub.publish(("b",), "d", id="b-new")  # t=10
    clock.now += 1.5  # t=11.5: a-old (11.5 s) and b-old (10.5 s) are both too old
    a, _, _ = await attach(hub, "a", last_event_id=EARLIEST)
    b, _, _ = await attach(hub, "b", last_event_id=EARLIEST)
    assert a.ids == ["a-new"]
    assert b.ids == ["b-new"], "b-old is older than history_age_s but is still replayed"


# -- closing -----------------------------------------------------------------------------


async def test_final_update_ends_exact_subscribers_of_that_topic() -> None:
    hub = MemoryHub()
    viewer, _, _ = await attach(hub, "streams/g")
    watcher, _, _ = await attach(hub, "*")
    update = hub.make_update(("streams/g",), "[DONE]", id="g:1", final=True)
    hub.dispatch(update)
    assert viewer.ids == ["g:1"] and viewer.ended == "complete"
    assert watcher.ids == ["g:1"] and watcher.ended is None
    assert hub.is_closed("streams/g")


async def test_close_all_closes_every_subscriber() -> None:
    hub = MemoryHub()
    streams = [(await attach(hub, s))[0] for s in ("a", "b", "*", BOOKS)]
    hub.close_all("shutdown")
    assert [s.ended for s in streams] == ["shutdown"] * 4
    assert hub.subscriber_count() == 0


# -- invalid updates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topics", "kwargs"),
    [
        ((), {}),
        (("",), {}),
        (("t",), {"id": EARLIEST}),
        (("t",), {"id": "a\nb"}),
        (("t",), {"id": "a\0b"}),
        (("t",), {"event": "x\ry"}),
        (("t",), {"retry": -1}),
    ],
)
async def test_invalid_updates_raise_value_error(
    topics: tuple[str, ...], kwargs: dict[str, Any]
) -> None:
    hub = MemoryHub()
    live, _, _ = await attach(hub, "*")
    with pytest.raises(ValueError):
        await hub.publish(topics, "d", **kwargs)
    assert live.frames == [] and hub._by_id == {}


async def test_reused_id_is_delivered_and_resolves_to_the_earliest() -> None:
    """draft-08 §6: a Last-Event-ID naming a reused id resolves to the earliest update
    holding it; everything after it is sent, the later update with the same id too."""
    hub = MemoryHub(history=4)
    live, _, _ = await attach(hub, "t")
    await hub.publish(("t",), "first", id="same")
    await hub.publish(("t",), "between", id="b")
    await hub.publish(("t",), "second", id="same")
    assert live.ids == ["same", "b", "same"]
    assert hub.last_id() == "same"
    resumed, _, found = await attach(hub, "t", last_event_id="same")
    assert found and resumed.ids == ["b", "same"]
    # The earliest leaves history: the id now names the later holder.
    await hub.publish(("t",), "x", id="c")
    await hub.publish(("t",), "y", id="d")
    resumed, _, found = await attach(hub, "t", last_event_id="same")
    assert found and resumed.ids == ["c", "d"]
    await hub.publish(("t",), "z", id="e")
    await hub.publish(("t",), "z", id="f")
    _, updates, found = await attach(hub, "t", last_event_id="same")
    assert not found and updates == [] and hub.get("same") is None
    assert hub._reused == {}


async def test_a_reused_id_across_topics_keeps_only_held_holders() -> None:
    """The earliest holder lives in a quiet topic while later ones churn in a busy one:
    the id still names the earliest, and the holders that left are not kept around."""
    hub = MemoryHub(history=3)
    await hub.publish(("quiet",), "first", id="same")
    for n in range(50):
        await hub.publish(("busy",), f"n{n}", id="same")
    first = hub.get("same")
    assert first is not None and first.topics == ("quiet",)
    assert len(hub._reused["same"]) == 3  # the busy topic's three held copies, no more
    for n in range(3):  # the quiet topic turns over: the next holder takes over at once
        await hub.publish(("quiet",), f"q{n}", id=f"q{n}")
    nxt = hub.get("same")
    assert nxt is not None and nxt.topics == ("busy",) and len(hub._reused["same"]) == 2


async def test_generated_ids_are_unique_urns() -> None:
    hub = MemoryHub()
    ids = {await hub.publish(("t",), "d") for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("urn:uuid:") for i in ids)


# -- a property: resume = what a live subscriber saw after that point --------------------


@settings(max_examples=60, deadline=None)
@given(
    history=st.integers(min_value=1, max_value=8),
    topics=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=30),
    cut=st.integers(min_value=0, max_value=29),
    selectors=st.sampled_from([("a",), ("a", "b"), ("*",), ("{x}",)]),
)
def test_resume_equals_live_suffix(
    history: int, topics: list[str], cut: int, selectors: tuple[str, ...]
) -> None:
    hub = MemoryHub(history=history)
    live = FakeStream()
    hub.attach(sub(live, *selectors))
    ids = []
    for i, topic in enumerate(topics):
        update = hub.make_update((topic,), "d", id=f"e{i}")
        hub.dispatch(update)
        ids.append(update.id)
    cut = min(cut, len(ids) - 1)
    resume_after = ids[cut]
    resumed = FakeStream()
    updates, found = hub.replay(sub(resumed, *selectors), resume_after)
    held = hub.get(resume_after) is not None
    assert found is held
    if not held:
        assert updates == []
        return
    seen_after = [i for i in live.ids if int(i[1:]) > cut]
    # Everything held after the cut that the subscription wants, in order, with no gaps
    # other than updates evicted from their topic's history.
    got = [u.id for u in updates]
    assert got == sorted(got, key=lambda i: int(i[1:]))
    assert set(got) <= set(seen_after)
    still_held = {u.id for t in ("a", "b", "c") for u in hub.held(t)}
    assert set(got) == set(seen_after) & still_held


async def test_a_burst_of_publishes_goes_out_as_one_write_per_subscriber() -> None:
    """Publishes of one loop iteration to the same topic are joined: one write (one
    syscall) per reader carries them all, in order, counted as separate deliveries."""
    hub = MemoryHub()
    readers = [(await attach(hub, "t"))[0] for _ in range(3)]
    other, _, _ = await attach(hub, "u")
    ids = await asyncio.gather(
        *(hub.publish(("t",), f"d{i}", id=f"b{i}") for i in range(5)),
        hub.publish(("u",), "x", id="u0"),
    )
    assert ids == ["b0", "b1", "b2", "b3", "b4", "u0"]
    for reader in readers:
        (joined,) = reader.frames
        assert joined is readers[0].frames[0]  # the same bytes object for every reader
        frames = [hub.held("t")[i].frame for i in range(5)]
        assert joined.raw == b"".join(f.raw for f in frames)
        assert joined.chunked == b"".join(f.chunked for f in frames)
    assert other.ids == ["u0"]
    assert hub.deliveries == 3 * 5 + 1


async def test_subscriber_arriving_before_the_flush_gets_each_update_once() -> None:
    """An update held for the end of the iteration is already history: a subscriber
    that replays it must not get it a second time from the flush."""
    hub = MemoryHub()
    early, _, _ = await attach(hub, "t")
    update = hub.make_update(("t",), "d", id="held")
    hub.dispatch_soon(update)
    late, _, _ = await attach(hub, "t", last_event_id=EARLIEST)
    await asyncio.sleep(0)  # the scheduled flush runs (and finds nothing left)
    assert early.ids == ["held"]
    assert late.ids == ["held"]


# -- the memory budget and the resume window (SPEC §8) -------------------------------------


def _held_cost(hub: MemoryHub) -> int:
    """What the hub should say it holds, recounted from scratch."""
    total = len(hub._closed) * hub.closed_topic_bytes
    for topic, held in hub._topics.items():
        total += memory.TOPIC_OVERHEAD + len(topic)
        total += sum(memory.update_cost(u) for u in held)
    return total


def _check_indexes(hub: MemoryHub) -> None:
    held = [u for updates in hub._topics.values() for u in updates]
    assert all(u.cost == memory.update_cost(u) > 0 for u in held)
    assert {u.id for u in held} == set(hub._by_id)
    assert [u for u in hub._by_age if u.cost] == sorted(held, key=lambda u: u.seq)
    assert hub.held_bytes == _held_cost(hub)


async def test_history_bytes_counts_what_is_held() -> None:
    hub = MemoryHub()
    await hub.publish(("a",), "x" * 100, id="a1")
    await hub.publish(("b",), "y", id="b1")
    _check_indexes(hub)
    one = memory.update_cost(hub._by_id["a1"])
    # The frame (chunk header, SSE lines, payload) and the objects around it.
    assert one >= 100 + len("a1") + memory.UPDATE_OVERHEAD
    assert hub.held_bytes == _held_cost(hub) > 0


async def test_budget_drops_the_oldest_first_whatever_their_topic() -> None:
    probe = MemoryHub()
    await probe.publish(("t0",), "d" * 50, id="probe")
    per_topic = probe.held_bytes  # one topic holding one such update
    budget = per_topic * 5 + per_topic // 2  # room for five topics of one update
    hub = MemoryHub(history_bytes=budget)
    for i in range(12):
        await hub.publish((f"t{i % 4}",), "d" * 50, id=f"u{i:02d}")
        assert hub.held_bytes <= budget
        _check_indexes(hub)
    kept = sorted(hub._by_id)
    assert kept == [f"u{i:02d}" for i in range(12 - len(kept), 12)], "not oldest first"
    assert hub.evicted == 12 - len(kept)
    # A resume from a dropped id is told so; from a held one it gets the exact suffix.
    _, _, found = await attach(hub, "t0", last_event_id="u00")
    assert not found
    first_kept = kept[0]
    stream, _, found = await attach(hub, "*", last_event_id=first_kept)
    assert found and stream.ids == kept[1:]


async def test_an_update_over_the_whole_budget_is_delivered_but_not_kept() -> None:
    hub = MemoryHub(history_bytes=100)
    live, _, _ = await attach(hub, "t")
    await hub.publish(("t",), "x" * 500, id="big")
    assert live.ids == ["big"]
    assert hub.held("t") == [] and hub.held_bytes == 0
    _check_indexes(hub)


async def test_dropped_entries_never_pile_up() -> None:
    """A hot topic bounded by count leaves its dropped updates behind in the age index
    until they reach its front: the index is rebuilt before they hold much."""
    hub = MemoryHub(history=10)
    for i in range(20_000):
        hub.dispatch(hub.make_update(("hot",), "d", id=f"h{i}"))
    assert len(hub._topics["hot"]) == 10
    assert len(hub._by_age) <= 2 * memory.COMPACT_AFTER + 10
    _check_indexes(hub)


async def test_ended_topic_forgotten_after_the_resume_window(clock: FakeClock) -> None:
    hub = MemoryHub(resume_window_s=300.0)
    forgotten: list[str] = []
    hub.on_forget = forgotten.append
    for i in range(3):
        hub.dispatch(hub.make_update(("streams/g1",), "d", id=f"g1:{i}", final=i == 2))
    hub.dispatch(hub.make_update(("streams/g2",), "d", id="g2:0", owner="alice"))
    assert hub.is_closed("streams/g1") and hub.owner("streams/g2") == "alice"
    clock.now += 299
    hub.sweep()
    assert [u.id for u in hub.held("streams/g1")] == ["g1:0", "g1:1", "g1:2"]
    clock.now += 2
    hub.sweep()
    assert hub.held("streams/g1") == [] and not hub.is_closed("streams/g1")
    assert forgotten == ["streams/g1"]
    assert hub.get("g1:1") is None
    # A running (not closed) topic stays, and so does what it knows of its owner.
    assert [u.id for u in hub.held("streams/g2")] == ["g2:0"]
    assert hub.owner("streams/g2") == "alice"
    _check_indexes(hub)


async def test_the_hub_sweeps_on_its_own_timer() -> None:
    """After the traffic stops, nothing publishes: the hub's one timer still forgets
    ended topics, so memory comes back."""
    hub = MemoryHub(resume_window_s=0.05)
    forgotten = asyncio.Event()
    hub.on_forget = lambda _topic: forgotten.set()
    await hub.start()
    try:
        hub.dispatch(hub.make_update(("streams/g",), "d", id="g:0", final=True))
        assert hub.held_bytes > 0
        await asyncio.wait_for(forgotten.wait(), 5)  # only the sweep timer can set it
        assert hub.held_bytes == 0 and hub.held("streams/g") == []
    finally:
        await hub.aclose()


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["pub", "pub", "pub", "final", "sweep"]),
            st.integers(0, 5),
            st.integers(0, 300),
        ),
        max_size=60,
    ),
    budget=st.integers(500, 6000),
    history=st.integers(1, 6),
)
def test_indexes_stay_consistent(
    ops: list[tuple[str, int, int]], budget: int, history: int
) -> None:
    async def run() -> None:
        hub = MemoryHub(history=history, history_bytes=budget, resume_window_s=0.0)
        for n, (op, topic, size) in enumerate(ops):
            if op == "sweep":
                hub.sweep()
            else:
                name = f"streams/t{topic}" if op == "final" else f"t{topic}"
                update = hub.make_update((name,), "x" * size, id=f"u{n}", final=op == "final")
                hub.dispatch(update)
            assert hub.held_bytes <= budget
            assert all(len(h) <= history for h in hub._topics.values())
            _check_indexes(hub)

    asyncio.run(run())


async def test_closed_topics_count_and_give_way_past_the_budget() -> None:
    """Remembering ended topics costs memory too: it counts against the budget, history
    makes room for it, and at a rate of generations that nothing else could hold, the
    oldest are forgotten before their window ends: memory stays bounded whatever comes."""
    hub = MemoryHub(history_bytes=50 * memory.CLOSED_OVERHEAD, resume_window_s=3600)
    forgotten: list[str] = []
    hub.on_forget = forgotten.append
    for g in range(200):
        hub.dispatch(hub.make_update((f"streams/g{g}",), "d", id=f"g{g}:0", final=True))
        assert hub.held_bytes <= hub.history_bytes
        _check_indexes(hub)
    assert 0 < len(hub._closed) <= 50 and hub.is_closed("streams/g199")
    assert forgotten[:3] == ["streams/g0", "streams/g1", "streams/g2"]  # oldest first


def test_every_hub_scheme_config_accepts_has_a_backend() -> None:
    from sseserver.config import HUB_SCHEMES
    from sseserver.hub import HUBS, load_hub

    assert set(HUBS) == set(HUB_SCHEMES)
    hub = load_hub("memory", history=5, history_age_s=60, history_bytes=1 << 20, resume_window_s=1)
    assert isinstance(hub, MemoryHub) and hub.history == 5 and hub.history_bytes == 1 << 20
    with pytest.raises(ValueError, match="--hub"):
        load_hub("postgres://x", history=5, history_age_s=60, history_bytes=1, resume_window_s=1)


def test_every_backend_is_a_hub() -> None:
    """Checked by mypy (``make test`` runs it over the tests): a backend that drifts
    from the interface the application is typed against fails here."""
    from sseserver.hub.base import Hub
    from sseserver.hub.redis import RedisHub

    def as_hubs(memory_hub: MemoryHub, redis_hub: RedisHub) -> tuple[Hub, Hub]:
        return memory_hub, redis_hub

    hubs = as_hubs(MemoryHub(), RedisHub("redis://127.0.0.1:1/0"))
    assert [h.held_bytes for h in hubs] == [0, 0]


async def test_a_resume_on_any_of_an_updates_topics_replays_it() -> None:
    """An update published to several topics is held once, under its first, and found
    by a resume on each of the others; gone from all when it leaves history."""
    hub = MemoryHub(history=3)
    await hub.publish(("a",), "before", id="x0")
    await hub.publish(("a", "b"), "both", id="x1")
    await hub.publish(("b",), "b only", id="x2")
    on_b, _, found = await attach(hub, "b", last_event_id="earliest")
    assert found and on_b.ids == ["x1", "x2"]
    on_b_after, _, found = await attach(hub, "b", last_event_id="x0")
    assert found and on_b_after.ids == ["x1", "x2"]
    for n in range(3):  # topic a turns over: x1 leaves history
        await hub.publish(("a",), "later", id=f"a{n}")
    gone, _, _ = await attach(hub, "b", last_event_id="earliest")
    assert gone.ids == ["x2"]
    assert "b" not in hub._also
