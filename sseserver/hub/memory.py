"""The in-memory hub: bounded history and synchronous fan-out.

Everything here runs without an ``await`` between reading history and attaching a
subscriber, so a subscriber never misses nor doubles an update published meanwhile.

Memory (SPEC §8): history is bounded per topic (``history`` updates, ``history_age_s``)
and for all topics together (``history_bytes``, counted from what each update really
holds: its frame, its id and the objects around them); past the budget the oldest
updates go first, whatever their topic. A closed topic (an ended generation) is
forgotten whole ``resume_window_s`` after it closed. One timer sweeps both, so a server
that stops getting traffic gives its memory back too.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable

from ..wire.chunked import Frame
from .base import EARLIEST, Subscription, Update, build_frame

SWEEP_EVERY = 63  # also sweep once per 64 updates (a bit mask), between timer ticks
SWEEP_S = 1.0  # the timer's period: ended topics and aged history go within a second
MiB = 1024 * 1024
# Counted as the allocator gives it: CPython's small-object allocator serves sizes in
# steps of 16 bytes (a 98-byte bytes object takes 112), which is ~10 % of an update.
SMALL_OBJECT_STEP = 16
SMALL_OBJECT_MAX = 512


def allocated(size: int) -> int:
    """What an object of ``size`` bytes takes from the allocator."""
    if size > SMALL_OBJECT_MAX:
        return size
    return -(-size // SMALL_OBJECT_STEP) * SMALL_OBJECT_STEP


# A large table's entry: 24 bytes of hash, key and value, its index, and the room a
# dict keeps free (a third at least; after deletions it rebuilds at three times its live
# count): ~65 bytes measured at 600k entries. Counted twice, because that rebuild holds
# the old table and the new one at once, and the budget must hold at that moment too.
BY_ID_ENTRY = 2 * 64
# What one held update costs beyond its frame's and id's bytes: the Update, the Frame,
# the bytes and str headers, its time and sequence number (objects of their own), and a
# slot in each index (by id, per topic, by age).
_SAMPLE = Update(("t",), "", Frame(b"", 0), False, 2**40, 0.5)
UPDATE_OVERHEAD = (
    allocated(sys.getsizeof(_SAMPLE))
    + allocated(sys.getsizeof(_SAMPLE.frame))
    + allocated(sys.getsizeof(_SAMPLE.at))
    + allocated(sys.getsizeof(_SAMPLE.seq))
    + BY_ID_ENTRY
    + 2 * 8  # a pointer in the topic's list and one in the age deque
)
BYTES_HEAD = sys.getsizeof(b"")
STR_HEAD = sys.getsizeof("")
# And one topic: its name, its list, its table entry.
TOPIC_OVERHEAD = allocated(sys.getsizeof([])) + STR_HEAD + BY_ID_ENTRY
# And one closed topic remembered for the resume window: its entry and time here, plus
# what a listener keeps alongside (``Generations`` adds its record's size).
CLOSED_OVERHEAD = BY_ID_ENTRY + allocated(sys.getsizeof(0.5))
# A deque keeps entries of updates dropped for other reasons until they reach its front;
# past this many (and half of it) it is rebuilt, so they never hold memory for long.
COMPACT_AFTER = 1024


# The frame's bytes object and the id's str, rounded up to the allocator's step (for
# the rare ones past SMALL_OBJECT_MAX, a few bytes too many).
_BYTES_ROUNDING = BYTES_HEAD + SMALL_OBJECT_STEP - 1
_STR_ROUNDING = STR_HEAD + SMALL_OBJECT_STEP - 1
_STEP_MASK = ~(SMALL_OBJECT_STEP - 1)


def update_cost(update: Update) -> int:
    return (
        UPDATE_OVERHEAD
        + ((_BYTES_ROUNDING + len(update.frame.chunked)) & _STEP_MASK)
        + ((_STR_ROUNDING + len(update.id)) & _STEP_MASK)
    )


class MemoryHub:
    """Topics live while they have history (or subscribers, who need none)."""

    def __init__(
        self,
        history: int = 1000,
        history_age_s: float = 3600.0,
        *,
        history_bytes: int = 256 * MiB,
        resume_window_s: float = 300.0,
    ) -> None:
        self.history = history
        self.history_age_s = history_age_s
        self.history_bytes = history_bytes
        self.resume_window_s = resume_window_s
        # Per topic, oldest first. A list, not a deque: most topics (generations) hold a few
        # updates, and an empty deque alone costs a 64-slot block (~600 bytes).
        self._topics: dict[str, list[Update]] = {}
        self._by_age: deque[Update] = deque()  # every held update, oldest first
        self._stale = 0  # entries of _by_age no longer held (dropped by count or topic)
        # By id, the earliest held update with that id (a reused id resolves to it, as
        # draft-08 §6 says); keys in the order of their latest use, so the last key is the
        # newest update's id. ``_reused``: the later updates holding each reused id, in
        # order (one of them becomes the earliest when the earliest leaves: O(1), not a
        # scan of all history).
        self._by_id: dict[str, Update] = {}
        self._reused: dict[str, deque[Update]] = {}
        # Per topic, the held updates whose first topic is another (oldest first): a
        # resume on any of an update's topics finds it.
        self._also: dict[str, list[Update]] = {}
        self._owners: dict[str, str] = {}  # generation topic -> its owner's subject
        self._exact: dict[str, set[Subscription]] = {}
        self._wild: set[Subscription] = set()
        self._closed: dict[str, float] = {}  # topic -> when it was closed, in that order
        self._seq = 0
        self._pending: list[Update] = []  # published, not yet written (dispatch_soon)
        self._sweeper: asyncio.TimerHandle | None = None
        self.held_bytes = 0  # what history holds now, by ``update_cost``, and closed topics
        self.closed_topic_bytes = CLOSED_OVERHEAD  # what remembering one closed topic costs
        self.evicted = 0  # updates dropped to stay within ``history_bytes``
        self.deliveries = 0
        # Called with each closed topic forgotten after the resume window.
        self.on_forget: Callable[[str], None] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        history: int,
        history_age_s: float,
        history_bytes: int,
        resume_window_s: float,
    ) -> MemoryHub:
        """The registry's constructor (``memory`` takes nothing from its URL)."""
        return cls(
            history, history_age_s, history_bytes=history_bytes, resume_window_s=resume_window_s
        )

    async def start(self) -> None:
        self._schedule_sweep()

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.close_all()

    @property
    def ready(self) -> bool:
        return True

    # -- publishing --------------------------------------------------------------------

    def make_update(
        self,
        topics: tuple[str, ...],
        data: str | None,
        *,
        id: str | None = None,
        event: str | None = None,
        retry: int | None = None,
        private: bool = False,
        final: bool = False,
        owner: str | None = None,
    ) -> Update:
        """Encode and frame once. Raises ValueError for an invalid id, event or topic."""
        if not topics or not all(topics):
            raise ValueError("an update needs at least one non-empty topic")
        event_id = id if id is not None else f"urn:uuid:{uuid.uuid4()}"
        if event_id == EARLIEST:
            raise ValueError(f"{EARLIEST!r} is a reserved id")
        frame = build_frame(data, id=event_id, event=event, retry=retry)
        return self.update_of(topics, event_id, frame, private=private, final=final, owner=owner)

    def update_of(
        self,
        topics: tuple[str, ...],
        event_id: str,
        frame: Frame,
        *,
        private: bool = False,
        final: bool = False,
        owner: str | None = None,
    ) -> Update:
        """An update around an already encoded frame (one forwarded by another instance)."""
        self._seq += 1
        return Update(topics, event_id, frame, private, self._seq, time.monotonic(), final, owner)

    async def publish(
        self,
        topics: tuple[str, ...],
        data: str | None,
        *,
        id: str | None = None,
        event: str | None = None,
        retry: int | None = None,
        private: bool = False,
    ) -> str:
        update = self.make_update(topics, data, id=id, event=event, retry=retry, private=private)
        self.dispatch_soon(update)
        await asyncio.sleep(0)  # the flush runs first: written when this returns
        return update.id

    def dispatch(self, update: Update) -> None:
        """Keep ``update`` in history and write its frame now to every subscriber that
        wants it (the same bytes object to all). The token path: no added latency."""
        if self._pending:
            self.flush()  # what was published before goes out before
        self._remember(update)
        self._deliver(update, update.frame, 1)

    def dispatch_soon(self, update: Update) -> None:
        """Keep ``update`` in history now; write it at the end of this loop iteration,
        with whatever else is published to the same topics meanwhile, as one write per
        subscriber (bursts of publishes cost one syscall per reader, not one per event).
        Every read of history or subscriber set flushes first, so nothing is seen twice
        or missed."""
        self._remember(update)
        self._pending.append(update)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write the updates held by ``dispatch_soon``: consecutive updates for the same
        topics (and privacy) share their readers, so they go out joined."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        run: list[Update] = []
        for update in pending:
            if run and (update.topics != run[0].topics or update.private != run[0].private):
                self._deliver_run(run)
                run = []
            run.append(update)
            if update.final:  # the topic ends here; later updates must not join it
                self._deliver_run(run)
                run = []
        if run:
            self._deliver_run(run)

    def _deliver_run(self, run: list[Update]) -> None:
        if len(run) == 1:
            self._deliver(run[0], run[0].frame, 1)
            return
        self._deliver(run[-1], Frame.joined([u.frame for u in run]), len(run))

    def announce(self, topics: tuple[str, ...], frame: Frame) -> None:
        """Write ``frame`` now to every subscriber of ``topics`` and keep nothing: a
        notice about the topics (it has no id a reader could resume after)."""
        if self._pending:
            self.flush()
        notice = Update(topics, "", frame, False, 0, time.monotonic())
        for target in self._targets(notice):
            target.stream.write_frame(frame)

    def _deliver(self, update: Update, frame: Frame, count: int) -> None:
        for target in self._targets(update):
            if target.stream.write_frame(frame):
                self.deliveries += count
        if update.final:
            self.close_topic(update.topic)

    def _targets(self, update: Update) -> Iterable[Subscription]:
        exact = self._exact
        if len(update.topics) == 1 and not self._wild and not update.private:
            subs = exact.get(update.topics[0])
            return tuple(subs) if subs else ()
        seen: dict[Subscription, None] = {}
        for topic in update.topics:
            for sub in exact.get(topic, ()):
                seen[sub] = None
        for sub in self._wild:
            if sub.wants(update):
                seen[sub] = None
        if update.private:
            return [s for s in seen if s.may_see_private(update)]
        return tuple(seen)

    # -- history and its bounds ----------------------------------------------------------

    def _remember(self, update: Update) -> None:
        if update.owner is not None:
            self._owners[update.topic] = update.owner
        if self.history <= 0:
            return
        key = update.topics[0]
        held = self._topics.get(key)
        if held is None:
            held = self._topics[key] = []
            self.held_bytes += TOPIC_OVERHEAD + len(key)
        elif len(held) >= self.history:
            self._let_go(held.pop(0))  # a memmove of ``history`` pointers
            self._stale += 1
        held.append(update)
        cost = update.cost = update_cost(update)
        if len(update.topics) > 1:  # held under its first topic, found under the others
            for other in update.topics[1:]:
                also = self._also.get(other)
                if also is None:
                    also = self._also[other] = []
                also.append(update)
                if len(also) > self.history:  # as many as a topic holds, no more
                    del also[0]
        first = self._by_id.pop(update.id, None)
        if first is None:
            self._by_id[update.id] = update
        else:
            self._by_id[update.id] = first  # the earliest, its key now the newest
            later = self._reused.get(update.id)
            if later is None:
                later = self._reused[update.id] = deque()
            later.append(update)
        self._by_age.append(update)
        self.held_bytes += cost
        if self.held_bytes > self.history_bytes:
            self._shrink()
        if not update.seq & SWEEP_EVERY:
            self.sweep(update.at)
        elif self._stale > COMPACT_AFTER and self._stale * 2 > len(self._by_age):
            self._compact()

    def _shrink(self) -> None:
        """Drop the oldest history until what is held fits the budget again. Closed
        topics count too: history makes room for them, and only when no history is left
        are the oldest forgotten before their resume window ends (memory stays bounded
        whatever the rate of generations)."""
        while self.held_bytes > self.history_bytes and self._by_age:
            self._drop_oldest()
            self.evicted += 1
        while self.held_bytes > self.history_bytes and self._closed:
            self._forget_oldest_closed()

    def _let_go(self, update: Update) -> None:
        """Account for ``update`` leaving history (its topic's list already let it go)."""
        self.held_bytes -= update.cost
        update.cost = 0
        if len(update.topics) > 1:
            for other in update.topics[1:]:
                also = self._also.get(other)
                while also and not also[0].cost:  # those gone, oldest first
                    del also[0]
                if also is not None and not also:
                    del self._also[other]
        event_id = update.id
        later = self._reused.get(event_id)
        if self._by_id.get(event_id) is not update:
            if later is not None:  # a later holder of a reused id (scans that id's only)
                later.remove(update)
                if not later:
                    del self._reused[event_id]
            return
        if later:
            self._by_id[event_id] = later.popleft()  # the next with its id is the earliest
            if not later:
                del self._reused[event_id]
        else:
            self._reused.pop(event_id, None)
            del self._by_id[event_id]

    def _drop_oldest(self) -> None:
        update = self._by_age.popleft()
        if not update.cost:
            self._stale -= 1
            return
        key = update.topics[0]
        held = self._topics[key]
        if held[0] is update:  # always, as every older update of its topic went first
            del held[0]
        else:
            held.remove(update)
        self._let_go(update)
        if not held:
            self._forget_topic_entry(key)

    def _forget_topic_entry(self, key: str) -> None:
        del self._topics[key]
        self.held_bytes -= TOPIC_OVERHEAD + len(key)
        self._owners.pop(key, None)

    def _drop_topic(self, key: str) -> None:
        """Forget all of one topic's history at once (an ended generation)."""
        held = self._topics.get(key)
        if held is None:
            self._owners.pop(key, None)
            return
        for update in held:
            self._let_go(update)
        self._stale += len(held)
        self._forget_topic_entry(key)
        if self._stale > COMPACT_AFTER and self._stale * 2 > len(self._by_age):
            self._compact()

    def _compact(self) -> None:
        self._by_age = deque(u for u in self._by_age if u.cost)
        self._stale = 0

    def sweep(self, now: float | None = None) -> None:
        """Forget ended topics past the resume window, then history past the age limit."""
        if now is None:
            now = time.monotonic()
        closed = self._closed
        horizon = now - self.resume_window_s
        while closed and next(iter(closed.values())) <= horizon:
            self._forget_oldest_closed()
        self._expire(now)

    def _forget_oldest_closed(self) -> None:
        topic = next(iter(self._closed))
        del self._closed[topic]
        self.held_bytes -= self.closed_topic_bytes
        self._drop_topic(topic)
        if self.on_forget is not None:
            self.on_forget(topic)

    def _expire(self, now: float) -> None:
        horizon = now - self.history_age_s
        by_age = self._by_age
        while by_age and by_age[0].at < horizon:
            self._drop_oldest()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(SWEEP_S, self._sweep_tick)

    def _sweep_tick(self) -> None:
        self.sweep()
        self._schedule_sweep()

    # -- subscribing -------------------------------------------------------------------

    def replay(self, sub: Subscription, last_event_id: str | None) -> tuple[list[Update], bool]:
        """Updates after ``last_event_id`` that ``sub`` may see, oldest first, and whether
        that id was found (``earliest`` always is)."""
        if last_event_id is None:
            return [], True
        if self._pending:
            self.flush()
        self._expire(time.monotonic())
        if sub.exact:
            held_lists = [self._topics[t] for t in sub.selectors if t in self._topics]
            held_lists += [self._also[t] for t in sub.selectors if t in self._also]
        else:
            held_lists = list(self._topics.values())
        if last_event_id == EARLIEST:
            after = 0
        else:
            anchor = self.get(last_event_id)
            if anchor is None:
                return [], False
            after = anchor.seq
        found: dict[int, Update] = {}
        for held in held_lists:
            for update in reversed(held):
                if update.seq <= after:
                    break
                if update.cost and update.seq not in found and sub.wants(update):
                    found[update.seq] = update
        return [found[k] for k in sorted(found)], True

    def attach(self, sub: Subscription) -> None:
        if self._pending:
            self.flush()  # updates published before this subscriber are not its own
        if sub.exact:
            for topic in sub.selectors:
                self._exact.setdefault(topic, set()).add(sub)
        else:
            self._wild.add(sub)
        sub.stream.on_close(lambda _stream: self.unsubscribe(sub))

    async def subscribe(
        self, sub: Subscription, last_event_id: str | None
    ) -> tuple[list[Update], bool]:
        """Replay what ``sub`` missed and attach it, with no await in between."""
        updates, found = self.replay(sub, last_event_id)
        for update in updates:
            sub.stream.write_frame(update.frame)
        self.attach(sub)
        return updates, found

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.exact:
            for topic in sub.selectors:
                subs = self._exact.get(topic)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._exact[topic]
        else:
            self._wild.discard(sub)

    @property
    def pattern_count(self) -> int:
        """Subscribers whose selectors are patterns (``*``, templates, URL patterns)."""
        return len(self._wild)

    def subscriber_count(self, topic: str | None = None) -> int:
        if topic is None:
            return sum(len(s) for s in self._exact.values()) + len(self._wild)
        return len(self._exact.get(topic, ()))

    # -- lookups and closing ------------------------------------------------------------

    async def fetch(self, topics: tuple[str, ...] | None) -> None:
        """Everything published here is held here: nothing to bring in."""

    def keep(self, update: Update) -> None:
        """Hold ``update`` in history without writing it to anyone: an event from before
        the readers here arrived (a shared hub loading a topic's past)."""
        if self._pending:
            self.flush()
        self._remember(update)

    async def knows(self, event_id: str, within_s: float) -> bool:
        """Whether ``event_id`` is held. Here that is known at once; a hub fed by other
        instances waits up to ``within_s`` for an update still on its way."""
        return self.get(event_id) is not None

    def get(self, event_id: str) -> Update | None:
        self._expire(time.monotonic())
        return self._by_id.get(event_id)

    def owner(self, topic: str) -> str | None:
        """The subject that started the generation of ``topic``, while it is held."""
        return self._owners.get(topic)

    def last_id(self, topic: str | None = None) -> str | None:
        if topic is None:
            if not self._by_id:
                return None
            return next(reversed(self._by_id))
        held = self._young(topic)
        return held[-1].id if held else None

    def held(self, topic: str) -> list[Update]:
        return list(self._young(topic))

    def _young(self, topic: str) -> list[Update]:
        self._expire(time.monotonic())
        return self._topics.get(topic) or []

    def is_closed(self, topic: str) -> bool:
        if self._pending:
            self.flush()  # a final update held for the flush closes its topic
        return topic in self._closed

    def close_topic(self, topic: str, reason: str = "complete") -> None:
        """End the streams of everyone subscribed to exactly ``topic`` (a finished
        generation); they may keep their connections for another request."""
        if self._pending:
            self.flush()
        if self._closed.pop(topic, None) is None:
            self.held_bytes += self.closed_topic_bytes
        self._closed[topic] = time.monotonic()
        self._shrink()
        for sub in tuple(self._exact.get(topic, ())):
            if sub.selectors == (topic,):
                sub.stream.finish(reason)

    def close_all(self, reason: str = "shutdown") -> None:
        self.flush()
        subs = [s for group in self._exact.values() for s in group]
        subs.extend(self._wild)
        for sub in subs:
            sub.stream.close(reason)
