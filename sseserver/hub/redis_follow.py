"""The topics an instance reads from Redis (SPEC §8): following one subscribes to its
sharded channel, waits until Redis confirms, then loads its stream; live messages that
arrive meanwhile wait, and every message carries its stream id, so history and live
updates join with no gap and no repeat. A topic nobody here reads any more is let go
after LINGER_S. One reader task per subscriber connection (a cluster has one per shard);
redis-py reconnects and subscribes again by itself, and each topic then catches up from
the last stream id it took.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from ..wire.chunked import Frame
from ..wire.errors import error_event_data
from ..wire.sse import encode_event
from .base import stop_tasks
from .memory import MemoryHub
from .redis_outbox import CONNECTION_ERRORS
from .redis_wire import Entry, channel_of, decode_entry, id_after, split_message, stream_key

log = logging.getLogger("sseserver.hub")

READ_TIMEOUT_S = 1.0  # one wait for a channel message
READ_COUNT = 1000  # stream entries per XRANGE page
FETCH_WAIT_S = 2.0  # how long a subscriber waits for a topic's history at most
LINGER_S = 10.0  # a topic nobody here reads is followed this much longer (reconnects)
SWEEP_S = 5.0
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)  # then every 1 s
CLOSE_WAIT_S = 1.0
REMEMBERED_TOPICS = 65_536  # topics let go whose last stream id is kept (~100 B each)
# Entries remembered as taken (~150 B each): more than a topic's history or the firehose
# holds, so a copy of an entry arriving through another topic is known for what it is.
SEEN_ENTRIES = 32_768

# What XRANGE gives this client (RESP2, no decode_responses): bytes ids and fields.
_Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(slots=True, eq=False)
class _Follow:
    """A topic (None: the firehose) this instance reads from Redis."""

    topic: str | None
    channel: str
    key: str
    last_id: str = "0-0"  # the last stream id taken, live or from history
    loading: bool = True  # history being read: live messages wait in ``waiting``
    waiting: list[tuple[str, bytes]] = field(default_factory=list)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)  # channel subscribed
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # history here
    opening: bool = False  # _open running
    touched: float = 0.0


class Follower:
    """The topics read from Redis into the instance's memory hub (``local``)."""

    def __init__(
        self,
        redis: Any,
        subscriber: Any,
        local: MemoryHub,
        instance: str,
        *,
        cluster: bool,
        age_ms: int,
        lost: Callable[[BaseException], None],
    ) -> None:
        self._redis = redis  # for the streams
        self._subscriber = subscriber  # for the channels (its own client on a cluster)
        self.local = local
        self.instance = instance  # this instance's own entries are skipped
        self.cluster = cluster
        self.age_ms = age_ms
        self.lost = lost  # a reader lost its connection
        self.taken = 0  # entries taken from Redis (live and history)
        self._follows: dict[str, _Follow] = {}  # by channel
        self._last_ids: dict[str, str] = {}  # channels let go: the last stream id taken
        self._pubsub: Any = None
        self._hooked: set[int] = set()  # subscriber connections told to call _on_reconnect
        self._readers: dict[str, asyncio.Task[None]] = {}  # one per subscriber connection
        self._stuck: set[_Follow] = set()  # follows to open again (Redis was away)
        self._pending: set[asyncio.Task[None]] = set()
        self._arrivals: list[asyncio.Future[None]] = []  # waiting for news
        self._seen: dict[tuple[str, int], None] = {}  # the latest entries taken, oldest first

    @property
    def followed(self) -> list[str | None]:
        """The topics read from Redis now (None: the firehose)."""
        return [f.topic for f in self._follows.values()]

    @property
    def stuck(self) -> bool:
        return bool(self._stuck)

    async def fetch(self, topics: tuple[str, ...] | None) -> None:
        """Follow ``topics`` (None: the firehose) and wait, up to FETCH_WAIT_S, for their
        history. Redis being away does not fail it: the topics catch up once it is back."""
        follows = [self.follow(t) for t in ((None,) if topics is None else topics)]
        waits = [f.loaded.wait() for f in follows if not f.loaded.is_set()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), FETCH_WAIT_S)
            except TimeoutError:
                pass

    def news(self) -> asyncio.Future[None]:
        """Done when the next entries have been taken."""
        arrival: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A waiter that gave up (cancelled) leaves; a quiet instance does not pile them up.
        self._arrivals = [a for a in self._arrivals if not a.done()]
        self._arrivals.append(arrival)
        return arrival

    async def aclose(self) -> None:
        """Stop the readers (and follows being opened), close the subscriber connection."""
        if await stop_tasks([*self._pending, *self._readers.values()], CLOSE_WAIT_S):
            log.warning("redis hub: readers did not stop in time")
        if self._pubsub is not None:
            try:
                await asyncio.wait_for(self._pubsub.aclose(), CLOSE_WAIT_S)
            except (TimeoutError, *CONNECTION_ERRORS):
                pass

    def follow(self, topic: str | None) -> _Follow:
        channel = channel_of(topic)
        follow = self._follows.get(channel)
        if follow is None:
            follow = self._follows[channel] = _Follow(topic, channel, stream_key(topic))
            # Followed before: what the mirror holds of it is not loaded again.
            follow.last_id = self._last_ids.pop(channel, "0-0")
            self._spawn(self._open(follow))
        follow.touched = time.monotonic()
        return follow

    async def _open(self, follow: _Follow, *, subscribe: bool = True) -> None:
        """Subscribe to the channel, wait until Redis says so, then read the history:
        whatever is published from then on arrives live. A follow that cannot be opened
        now is left to the reader, which tries again."""
        if follow.opening:
            return
        follow.opening = True
        try:
            if subscribe:
                if self._pubsub is None:
                    if self.cluster:
                        await self._subscriber.initialize()
                    self._pubsub = self._subscriber.pubsub()
                await self._pubsub.ssubscribe(follow.channel)
                self._read_new_connections()
            await asyncio.wait_for(follow.confirmed.wait(), FETCH_WAIT_S)
            await self._catch_up(follow)
            self._stuck.discard(follow)
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            log.debug("redis hub: following %s deferred: %s", follow.topic, exc)
            if self._follows.get(follow.channel) is follow:
                self._stuck.add(follow)
        finally:
            follow.opening = False

    async def _on_reconnect(self, _connection: Any) -> None:
        """The subscriber connection is back and redis-py has subscribed its channels
        again: once Redis confirms each, its topic catches up from its last stream id."""
        for follow in self._follows.values():
            follow.loading = True
            follow.confirmed.clear()
            self._spawn(self._open(follow, subscribe=False))

    def retry_stuck(self) -> None:
        for follow in tuple(self._stuck):
            if self._follows.get(follow.channel) is not follow:
                self._stuck.discard(follow)
            elif not follow.opening:
                self._spawn(self._open(follow))

    async def _catch_up(self, follow: _Follow) -> None:
        """Take what the stream holds after the last id taken (within the age bound),
        oldest first, then what arrived live meanwhile, and go live. The first time it
        is the topic's past, kept for replay; after a reconnection it is what readers
        here missed, delivered to them."""
        follow.loading = True
        # Readers already here (attached while Redis was slow to answer) get it too.
        missed = follow.loaded.is_set() or self._read_here(follow)
        floor = f"{int(time.time() * 1000) - self.age_ms}-0"
        start = "(" + follow.last_id if id_after(follow.last_id, floor) else floor
        while True:
            entries = cast(
                list[_Entry],
                await self._redis.xrange(follow.key, min=start, count=READ_COUNT),
            )
            for entry_id, fields in entries:
                raw = fields.get(b"m")
                if raw is not None:
                    self._take(follow, entry_id.decode(), raw, live=missed)
            if len(entries) < READ_COUNT:
                break
            start = "(" + entries[-1][0].decode()
        waiting, follow.waiting = follow.waiting, []
        for waited_id, waited in waiting:
            self._take(follow, waited_id, waited, live=True)
        follow.loading = False
        follow.loaded.set()
        self._wake()

    def _take(self, follow: _Follow, entry_id: str, raw: bytes, *, live: bool) -> None:
        """One entry, once: later than the last taken of its topic, not this instance's
        own, and not one another followed topic (or the firehose) delivers."""
        if not id_after(entry_id, follow.last_id):
            return
        follow.last_id = entry_id
        try:
            entry = decode_entry(raw)
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("redis hub: skipping a malformed entry %s: %s", entry_id, exc)
            return
        if entry.origin == self.instance or not self._first_time(entry):
            return
        self.taken += 1
        if entry.gap:
            if live:
                self._tell_gap(entry)
            return
        update = self.local.update_of(
            entry.topics,
            entry.event_id,
            Frame.of(entry.sse),
            private=entry.private,
            final=entry.final,
            owner=entry.owner,
        )
        if live:
            self.local.dispatch_soon(update)  # a read of many goes out joined
        else:
            ms = int(entry_id.partition("-")[0])
            update.at -= max(0.0, time.time() - ms / 1000)  # its age counts from Redis
            self.local.keep(update)
            if update.final:
                self.local.close_topic(update.topic)

    def _first_time(self, entry: Entry) -> bool:
        """Whether this entry is new here: an update written to several topics, or to a
        topic and the firehose, arrives once per followed copy, and is taken once."""
        if not entry.sequence:
            return True  # unnamed (not written by this hub): nothing to tell it by
        key = (entry.origin, entry.sequence)
        seen = self._seen
        if key in seen:
            return False
        seen[key] = None
        if len(seen) > SEEN_ENTRIES:
            del seen[next(iter(seen))]
        return True

    def _tell_gap(self, entry: Entry) -> None:
        """Another instance lost updates of these topics on their way to Redis: its
        readers here hear of it (they got everything else in order)."""
        data = error_event_data(
            "missed_events",
            f"{entry.gap} events of this topic were lost while Redis was unreachable",
            retryable=False,
        )
        self.local.announce(entry.topics, Frame.of(encode_event(data, event="error")))

    def _wake(self) -> None:
        arrivals, self._arrivals = self._arrivals, []
        for arrival in arrivals:
            if not arrival.done():
                arrival.set_result(None)

    # -- the readers ---------------------------------------------------------------------

    def _read_new_connections(self) -> None:
        """One reader per subscriber connection: a cluster's channels are spread over
        its shards, each with a connection of its own (a single reader would wait on
        one while another has news). redis-py reconnects each and subscribes it again;
        this instance must then catch up on what was published meanwhile."""
        pubsub = self._pubsub
        if self.cluster:
            for name, node_pubsub in tuple(pubsub.node_pubsub_mapping.items()):
                self._hook(node_pubsub.connection)
                if name not in self._readers:
                    node = pubsub.cluster.get_node(node_name=name)
                    read = functools.partial(
                        pubsub.get_sharded_message, target_node=node, timeout=READ_TIMEOUT_S
                    )
                    mapping = pubsub.node_pubsub_mapping
                    self._start_reader(
                        name, read, functools.partial(operator.contains, mapping, name)
                    )
        else:
            self._hook(pubsub.connection)
            if "main" not in self._readers:
                read = functools.partial(pubsub.get_message, timeout=READ_TIMEOUT_S)
                self._start_reader("main", read, lambda: True)

    def _hook(self, connection: Any) -> None:
        if connection is not None and id(connection) not in self._hooked:
            connection.register_connect_callback(self._on_reconnect)
            self._hooked.add(id(connection))

    def _start_reader(self, name: str, read: Callable[[], Any], alive: Callable[[], bool]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._read_forever(name, read, alive), name=f"redis-hub-reader-{name}"
        )
        self._readers[name] = task

    async def _read_forever(
        self, name: str, read: Callable[[], Any], alive: Callable[[], bool]
    ) -> None:
        failures = 0
        try:
            while alive():
                try:
                    message = await read()
                except CONNECTION_ERRORS as exc:
                    self.lost(exc)
                    delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                    await asyncio.sleep(delay)
                    failures += 1
                    continue
                except RuntimeError:
                    return  # the connection holds no channel any more
                failures = 0
                if message is not None:
                    self._on_message(message)
        finally:
            if self._readers.get(name) is asyncio.current_task():
                del self._readers[name]

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        follow = self._follows.get(channel) if isinstance(channel, str) else None
        if follow is None:
            return
        if kind == "ssubscribe":
            follow.confirmed.set()
            return
        if kind != "smessage":
            return
        try:
            entry_id, raw = split_message(message["data"])
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("redis hub: skipping a malformed message: %s", exc)
            return
        if follow.loading:
            follow.waiting.append((entry_id, raw))
            return
        self._take(follow, entry_id, raw, live=True)
        if self._arrivals:
            self._wake()

    # -- letting go ----------------------------------------------------------------------

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self.let_go(time.monotonic() - LINGER_S)

    def _read_here(self, follow: _Follow) -> bool:
        """Whether a reader here wants the topic (a pattern reader, for the firehose)."""
        local = self.local
        topic = follow.topic
        return bool(local.pattern_count if topic is None else local.subscriber_count(topic))

    async def let_go(self, before: float) -> None:
        """Stop following topics nobody here has read since ``before``."""
        idle = [
            f
            for f in self._follows.values()
            if f.touched < before and not f.loading and not self._read_here(f)
        ]
        if not idle:
            return
        for follow in idle:
            del self._follows[follow.channel]
            self._last_ids[follow.channel] = follow.last_id
        while len(self._last_ids) > REMEMBERED_TOPICS:
            del self._last_ids[next(iter(self._last_ids))]
        if self._pubsub is not None:
            try:
                await self._pubsub.sunsubscribe(*(f.channel for f in idle))
            except CONNECTION_ERRORS:
                pass  # the reconnection subscribes only what is still followed

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
