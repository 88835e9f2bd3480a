"""The Redis hub: each topic a Redis stream (its history) and a sharded channel (its live
updates), so that an instance pays for the topics it serves and nothing else, and the
cluster's capacity grows with instances and Redis shards (SPEC §8).

Every instance keeps a local mirror (an in-memory hub it has, not one it is) of the
topics it follows: those its subscribers read, and those a resume asks for. Following a
topic subscribes to its channel, then loads its stream; live messages that arrive
meanwhile wait, and every message carries its stream id, so history and live updates
join without a gap or a repeat. Replay and attach stay synchronous on the mirror (no
update can slip between them). A topic nobody here reads any more is let go after a
while. Subscribers whose selectors are patterns (``*``, URI templates) follow the
firehose, which carries every update published through Mercure; the tokens of
generations are in their own topics only (there are thousands a second of them).

An update published here is written to Redis first (503 when Redis cannot have it) and
then delivered here; generation tokens (``dispatch``) are delivered here at once and
forwarded by the outbox, one pipelined write per loop iteration. When Redis goes away,
local subscribers stay connected and each topic catches up from its last stream id once
Redis is back: nothing that Redis still holds is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..wire.chunked import Frame
from ..wire.errors import error_event_data
from ..wire.sse import encode_event
from .base import Subscription, Update, stop_tasks
from .memory import MemoryHub, MiB
from .redis_outbox import CONNECTION_ERRORS, ENTRY_OVERHEAD, LIMIT_BYTES, Outbox, Shape
from .redis_wire import (
    Entry,
    channel_of,
    decode_entry,
    id_after,
    split_message,
    stream_key,
)

__all__ = ["ENTRY_OVERHEAD", "RedisHub"]

log = logging.getLogger("sseserver.hub")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
READ_TIMEOUT_S = 1.0  # one wait for a channel message; then health and sweeps
READ_COUNT = 1000  # stream entries per XRANGE page
FETCH_WAIT_S = 2.0  # how long a subscriber waits for a topic's history at most
LINGER_S = 10.0  # a topic nobody here reads is followed this much longer (reconnects)
SWEEP_S = 5.0
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)  # then every 1 s
CLOSE_WAIT_S = 1.0
FIREHOSE_LEN = 10_000  # entries the firehose keeps (pattern subscribers' replay)
REMEMBERED_TOPICS = 65_536  # topics let go whose last stream id is kept (~100 B each)

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


class RedisHub:
    """A hub shared through Redis; local delivery and history go through its memory hub
    (``local``), under the same budget."""

    def __init__(
        self,
        url: str,
        history: int = 1000,
        history_age_s: float = 3600.0,
        *,
        history_bytes: int = 256 * MiB,
        resume_window_s: float = 300.0,
        outbox_bytes: int = LIMIT_BYTES,
    ) -> None:
        local = self.local = MemoryHub(
            history, history_age_s, history_bytes=history_bytes, resume_window_s=resume_window_s
        )
        # The Hub interface's reads and local writes are the mirror's own methods, bound
        # here rather than wrapped one by one; what Redis changes is defined below.
        self.make_update = local.make_update
        self.update_of = local.update_of
        self.replay = local.replay
        self.held = local.held
        self.get = local.get
        self.last_id = local.last_id
        self.owner = local.owner
        self.is_closed = local.is_closed
        self.close_topic = local.close_topic
        self.close_all = local.close_all
        self.subscriber_count = local.subscriber_count
        self.url = url
        scheme, _, rest = url.partition("://")
        self.cluster = scheme in CLUSTER_SCHEMES
        options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_keepalive": True}
        self._redis: Any
        self._subscriber: Any  # the client whose pub/sub connections read the channels
        if self.cluster:
            # A cluster client closes all its connections on a failed command: the
            # channels are read through a client of their own, untouched by that.
            plain = scheme.removesuffix("+cluster") + "://" + rest
            self._redis = RedisCluster.from_url(plain, **options)
            self._subscriber = RedisCluster.from_url(plain, **options)
        else:
            self._redis = aioredis.from_url(url, health_check_interval=10, **options)
            self._subscriber = self._redis
        self.age_ms = int(max(history_age_s, resume_window_s, 1.0) * 1000)
        self.instance = uuid.uuid4().hex
        self.outbox = Outbox(
            lambda: self._redis,
            self.instance,
            Shape(
                max(history, 10),
                max(FIREHOSE_LEN, history),
                self.age_ms,
                int(max(resume_window_s, 1.0) * 1000),
            ),
            limit=outbox_bytes,
        )
        self._follows: dict[str, _Follow] = {}  # by channel
        self._last_ids: dict[str, str] = {}  # channels let go: the last stream id taken
        self._pubsub: Any = None
        self._hooked: set[int] = set()  # subscriber connections told to call _on_reconnect
        self._readers: dict[str, asyncio.Task[None]] = {}  # one per subscriber connection
        self._stuck: set[_Follow] = set()  # follows to open again (Redis was away)
        self._wild = 0  # local subscribers whose selectors are patterns
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._arrivals: list[asyncio.Future[None]] = []  # knows() waiting for news
        self._connected = False
        self.taken = 0  # entries taken from Redis (live and history), for tests and bench

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        history: int,
        history_age_s: float,
        history_bytes: int,
        resume_window_s: float,
    ) -> RedisHub:
        """The registry's constructor."""
        return cls(
            url,
            history,
            history_age_s,
            history_bytes=history_bytes,
            resume_window_s=resume_window_s,
        )

    @property
    def ready(self) -> bool:
        return self._connected

    # -- the mirror's state, as the Hub interface names it -------------------------------

    @property
    def held_bytes(self) -> int:
        return self.local.held_bytes

    @property
    def closed_topic_bytes(self) -> int:
        return self.local.closed_topic_bytes

    @closed_topic_bytes.setter
    def closed_topic_bytes(self, value: int) -> None:
        self.local.closed_topic_bytes = value

    @property
    def on_forget(self) -> Callable[[str], None] | None:
        return self.local.on_forget

    @on_forget.setter
    def on_forget(self, callback: Callable[[str], None] | None) -> None:
        self.local.on_forget = callback

    @property
    def deliveries(self) -> int:
        return self.local.deliveries

    @property
    def evicted(self) -> int:
        return self.local.evicted

    @property
    def dropped(self) -> int:
        """Updates that never reached Redis (the outbox overflowed during an outage)."""
        return self.outbox.dropped

    @property
    def redis(self) -> Any:
        """The client, shared with the rate limiter and presence across instances."""
        return self._redis

    @property
    def followed(self) -> list[str | None]:
        """The topics read from Redis now (None: the firehose)."""
        return [f.topic for f in self._follows.values()]

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.local.start()
        self._connected = await self._ping()
        if not self._connected:
            log.warning("redis hub: %s unreachable at start; retrying", self.url)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_forever(), name="redis-hub-watch"),
            loop.create_task(self.outbox.write_forever(), name="redis-hub-writer"),
            loop.create_task(self._sweep_forever(), name="redis-hub-sweeper"),
        ]

    async def aclose(self) -> None:
        self.outbox.fail_waiting()
        tasks = [*self._tasks, *self._pending, *self._readers.values()]
        if await stop_tasks(tasks, CLOSE_WAIT_S):
            log.warning("redis hub: background tasks did not stop in time")
        await self.local.aclose()
        clients = (
            (self._redis,) if self._subscriber is self._redis else (self._redis, self._subscriber)
        )
        for closing in (self._pubsub, *clients):
            if closing is None:
                continue
            try:
                await asyncio.wait_for(closing.aclose(), CLOSE_WAIT_S)
            except (TimeoutError, *CONNECTION_ERRORS):
                pass

    async def _ping(self) -> bool:
        try:
            if self.cluster:
                await self._redis.initialize()  # learns the slots; a no-op once done
            await self._redis.ping()
            return True
        except CONNECTION_ERRORS:
            return False

    # -- publishing ----------------------------------------------------------------------

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
        """Store in Redis, then deliver here. Raises ConnectionError when Redis is down."""
        update = self.make_update(topics, data, id=id, event=event, retry=retry, private=private)
        if not self._connected:
            raise ConnectionError("redis unavailable")
        await self.outbox.put_acked(update)
        self.local.dispatch_soon(update)
        await asyncio.sleep(0)  # the flush runs first: written when this returns
        return update.id

    def dispatch(self, update: Update) -> None:
        """Deliver here at once (no round trip on the token path), forward in order."""
        self.local.dispatch(update)
        self.outbox.put(update)

    # -- subscribing ---------------------------------------------------------------------

    async def fetch(self, topics: tuple[str, ...] | None) -> None:
        """Follow ``topics`` (None: the firehose) and wait, up to FETCH_WAIT_S, for their
        history. Redis being away does not fail it: the topics catch up once it is back."""
        follows = [self._follow(t) for t in ((None,) if topics is None else topics)]
        waits = [f.loaded.wait() for f in follows if not f.loaded.is_set()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), FETCH_WAIT_S)
            except TimeoutError:
                pass

    async def subscribe(
        self, subscription: Subscription, last_event_id: str | None
    ) -> tuple[list[Update], bool]:
        await self.fetch(subscription.selectors if subscription.exact else None)
        return await self.local.subscribe(subscription, last_event_id)

    def attach(self, subscription: Subscription) -> None:
        """Attach without following: for readers of what this instance produces (a
        generation's viewers where it runs). Readers of other instances' topics come
        through ``subscribe``, which follows them."""
        if not subscription.exact:
            self._wild += 1
        self.local.attach(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        if not subscription.exact:
            self._wild -= 1
        self.local.unsubscribe(subscription)

    async def knows(self, event_id: str, within_s: float) -> bool:
        """A reader's last event may have been written to it by another instance a few
        milliseconds before that instance forwarded it to Redis, and its reconnect may
        land here first: wait (bounded) for it rather than take a known generation for
        an unknown one. The caller has fetched the topic."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self.get(event_id) is None:
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._connected:
                return False
            arrival: asyncio.Future[None] = loop.create_future()
            self._arrivals.append(arrival)
            try:
                await asyncio.wait_for(arrival, remaining)
            except TimeoutError:
                return self.get(event_id) is not None
        return True

    # -- following topics ----------------------------------------------------------------

    def _follow(self, topic: str | None) -> _Follow:
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

    def _retry_stuck(self) -> None:
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
        missed = follow.loaded.is_set()
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
        self._wake_knows()

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
        if entry.origin == self.instance or self._delivered_elsewhere(follow, entry):
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

    def _delivered_elsewhere(self, follow: _Follow, entry: Entry) -> bool:
        if follow.topic is None:
            return False
        follows = self._follows
        if entry.firehose:
            firehose = follows.get(channel_of(None))
            if firehose is not None and not firehose.loading:
                return True
        if len(entry.topics) == 1:
            return False
        for topic in entry.topics:  # the first topic followed here delivers it
            if topic == follow.topic:
                return False
            other = follows.get(channel_of(topic))
            if other is not None and not other.loading:
                return True
        return False

    def _tell_gap(self, entry: Entry) -> None:
        """Another instance lost updates of these topics on their way to Redis: its
        readers here hear of it (they got everything else in order)."""
        data = error_event_data(
            "missed_events",
            f"{entry.gap} events of this topic were lost while Redis was unreachable",
            retryable=False,
        )
        self.local.announce(entry.topics, Frame.of(encode_event(data, event="error")))

    def _wake_knows(self) -> None:
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
                    if self._connected:
                        log.warning("redis hub: lost %s: %s", self.url, exc)
                    self._connected = False
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

    async def _watch_forever(self) -> None:
        """Whether Redis answers (``ready``, and publishes refused while it does not),
        once a read's time; follows that could not be opened are opened again."""
        while True:
            await asyncio.sleep(READ_TIMEOUT_S)
            was = self._connected
            self._connected = await self._ping()
            if was != self._connected:
                log.log(
                    logging.INFO if self._connected else logging.WARNING,
                    "redis hub: %s %s",
                    self.url,
                    "reachable" if self._connected else "unreachable",
                )
            if self._connected and self._stuck:
                self._retry_stuck()

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
            self._wake_knows()

    # -- letting go ----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            await self._let_go(time.monotonic() - LINGER_S)

    async def _let_go(self, before: float) -> None:
        """Stop following topics nobody here has read since ``before``."""
        idle = [
            f
            for f in self._follows.values()
            if f.touched < before
            and not f.loading
            and (self._wild == 0 if f.topic is None else not self.subscriber_count(f.topic))
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
