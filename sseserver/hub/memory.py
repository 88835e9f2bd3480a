"""The in-memory hub: per-topic bounded history and synchronous fan-out.

Everything here runs without an ``await`` between reading history and attaching a
subscriber, so a subscriber never misses nor doubles an update published meanwhile.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable

from ..chunked import Frame
from .base import EARLIEST, Subscription, Update, build_frame

EXPIRE_EVERY = 63  # look for aged history once per 64 updates (a bit mask)


class MemoryHub:
    """Topics live while they have history younger than ``history_age_s`` or subscribers."""

    def __init__(self, history: int = 1000, history_age_s: float = 3600.0) -> None:
        self.history = history
        self.history_age_s = history_age_s
        # Per topic, oldest first. A list, not a deque: most topics (generations) hold a few
        # updates, and an empty deque alone costs a 64-slot block (~600 bytes).
        self._topics: OrderedDict[str, list[Update]] = OrderedDict()
        self._by_id: dict[str, Update] = {}
        self._exact: dict[str, set[Subscription]] = {}
        self._wild: set[Subscription] = set()
        self._closed: dict[str, float] = {}  # topic -> when it was closed (generations)
        self._seq = 0
        self._pending: list[Update] = []  # published, not yet written (dispatch_soon)
        self.deliveries = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
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
    ) -> Update:
        """Encode and frame once. Raises ValueError for an invalid id, event or topic."""
        if not topics or not all(topics):
            raise ValueError("an update needs at least one non-empty topic")
        event_id = id if id is not None else f"urn:uuid:{uuid.uuid4()}"
        if event_id == EARLIEST:
            raise ValueError(f"{EARLIEST!r} is a reserved id")
        if event_id in self._by_id:
            raise ValueError(f"duplicate event id {event_id!r}")
        frame = build_frame(data, id=event_id, event=event, retry=retry)
        self._seq += 1
        return Update(
            topics, event_id, frame, private, self._seq, time.monotonic(), final, data, event, retry
        )

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
        joined = Frame(
            b"".join(u.frame.raw for u in run), b"".join(u.frame.chunked for u in run)
        )
        self._deliver(run[-1], joined, len(run))

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

    def _remember(self, update: Update) -> None:
        if self.history <= 0:
            return
        topics = self._topics
        by_id = self._by_id
        key = update.topics[0]
        held = topics.get(key)
        if held is None:
            held = topics[key] = []
        else:
            topics.move_to_end(key)
        if len(held) >= self.history:
            by_id.pop(held.pop(0).id, None)  # a memmove of ``history`` pointers
        held.append(update)
        by_id[update.id] = update
        if not update.seq & EXPIRE_EVERY:  # amortised: the age limit is not that exact
            self._expire(update.at)

    def _expire(self, now: float) -> None:
        """Drop history older than the age limit, oldest topics first (amortised O(1))."""
        horizon = now - self.history_age_s
        topics = self._topics
        while topics:
            key, held = next(iter(topics.items()))
            self._trim(held, horizon)
            if held:
                break
            del topics[key]
        closed = self._closed  # in closing order, so the old ones are at the front
        while closed:
            topic, at = next(iter(closed.items()))
            if at >= horizon:
                break
            del closed[topic]

    def _trim(self, held: list[Update], horizon: float) -> None:
        """Drop one topic's updates older than the age limit (any topic, not just the
        one least recently published to, which is all ``_expire`` looks at)."""
        if not held or held[0].at >= horizon:
            return
        cut = 0
        while cut < len(held) and held[cut].at < horizon:
            self._by_id.pop(held[cut].id, None)
            cut += 1
        del held[:cut]

    # -- subscribing -------------------------------------------------------------------

    def replay(self, sub: Subscription, last_event_id: str | None) -> tuple[list[Update], bool]:
        """Updates after ``last_event_id`` that ``sub`` may see, oldest first, and whether
        that id was found (``earliest`` always is)."""
        if last_event_id is None:
            return [], True
        if self._pending:
            self.flush()
        now = time.monotonic()
        self._expire(now)
        horizon = now - self.history_age_s
        if sub.exact:
            held_lists = [self._topics[t] for t in sub.selectors if t in self._topics]
        else:
            held_lists = list(self._topics.values())
        for held in held_lists:
            self._trim(held, horizon)
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
                if update.seq not in found and sub.wants(update):
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

    def subscriber_count(self, topic: str | None = None) -> int:
        if topic is None:
            return sum(len(s) for s in self._exact.values()) + len(self._wild)
        return len(self._exact.get(topic, ()))

    # -- lookups and closing ------------------------------------------------------------

    async def knows(self, event_id: str, within_s: float) -> bool:
        """Whether ``event_id`` is held. Here that is known at once; a hub fed by other
        instances waits up to ``within_s`` for an update still on its way."""
        return self.get(event_id) is not None

    def get(self, event_id: str) -> Update | None:
        update = self._by_id.get(event_id)
        if update is not None and update.at < time.monotonic() - self.history_age_s:
            return None  # aged out, not yet swept (sweeps are amortised)
        return update

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
        held = self._topics.get(topic)
        if held is None:
            return []
        self._trim(held, time.monotonic() - self.history_age_s)
        return held

    def is_closed(self, topic: str) -> bool:
        if self._pending:
            self.flush()  # a final update held for the flush closes its topic
        return topic in self._closed

    def close_topic(self, topic: str, reason: str = "complete") -> None:
        """End the streams of everyone subscribed to exactly ``topic`` (a finished
        generation); they may keep their connections for another request."""
        if self._pending:
            self.flush()
        self._closed.pop(topic, None)
        self._closed[topic] = time.monotonic()
        for sub in tuple(self._exact.get(topic, ())):
            if sub.selectors == (topic,):
                sub.stream.finish(reason)

    def close_all(self, reason: str = "shutdown") -> None:
        self.flush()
        subs = [s for group in self._exact.values() for s in group]
        subs.extend(self._wild)
        for sub in subs:
            sub.stream.close(reason)
