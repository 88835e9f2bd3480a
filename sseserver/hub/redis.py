"""The Redis hub: each topic a Redis stream (its history) and a sharded channel (its live
updates), so that an instance pays for the topics it serves and nothing else, and the
cluster's capacity grows with instances and Redis shards (SPEC §8).

Every instance keeps a local mirror (an in-memory hub it has, not one it is) of the
topics it follows (``redis_follow``): those its subscribers read, and those a resume,
a watch or a cancel asks for. Replay and attach stay synchronous on the mirror (no
update can slip between them). Subscribers whose selectors are patterns (``*``, URI
templates, URL patterns) follow the firehose, which carries every update published
through Mercure; the tokens of generations are in their own topics only (there are
thousands a second of them).

An update published here is written to Redis first (503 when Redis cannot have it) and
then delivered here; generation tokens (``dispatch``) are delivered here at once and
forwarded in pipelined writes (``redis_outbox``). When Redis goes away, local
subscribers stay connected and each topic catches up from its last stream id once Redis
is back: nothing that Redis still holds is lost. The layout in Redis: ``redis_wire``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from .base import Subscription, Update, stop_tasks
from .memory import MemoryHub, MiB
from .redis_follow import Follower
from .redis_outbox import CONNECTION_ERRORS, ENTRY_OVERHEAD, LIMIT_BYTES, PER_CALL, Outbox, Shape

__all__ = ["ENTRY_OVERHEAD", "RedisHub"]

log = logging.getLogger("sseserver.hub")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
WATCH_S = 1.0  # how often Redis is asked whether it answers
CLOSE_WAIT_S = 1.0
FIREHOSE_LEN = 10_000  # entries the firehose keeps (pattern subscribers' replay)


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
        self.unsubscribe = local.unsubscribe
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
            owner_of=local.owner,
            per_call=1 if self.cluster else PER_CALL,
        )
        self.follower = Follower(
            self._redis,
            self._subscriber,
            local,
            self.instance,
            cluster=self.cluster,
            age_ms=self.age_ms,
            lost=self._lost,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False

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
        return self.follower.followed

    @property
    def taken(self) -> int:
        """Entries read from Redis so far (other instances' updates)."""
        return self.follower.taken

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
            loop.create_task(self.follower.sweep_forever(), name="redis-hub-sweeper"),
        ]

    async def aclose(self) -> None:
        self.outbox.fail_waiting()
        await self.follower.aclose()
        if await stop_tasks(self._tasks, CLOSE_WAIT_S):
            log.warning("redis hub: background tasks did not stop in time")
        await self.local.aclose()
        clients = (
            (self._redis,) if self._subscriber is self._redis else (self._redis, self._subscriber)
        )
        for client in clients:
            try:
                await asyncio.wait_for(client.aclose(), CLOSE_WAIT_S)
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
        """Follow ``topics`` (None: the firehose) and wait, bounded, for their history."""
        await self.follower.fetch(topics)

    async def subscribe(
        self, subscription: Subscription, last_event_id: str | None
    ) -> tuple[list[Update], bool]:
        await self.follower.fetch(subscription.selectors if subscription.exact else None)
        return await self.local.subscribe(subscription, last_event_id)

    def attach(self, subscription: Subscription) -> None:
        """Attach without following: for readers of what this instance produces (a
        generation's viewers where it runs). Readers of other instances' topics come
        through ``subscribe``, which follows them."""
        self.local.attach(subscription)

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
            news = self.follower.news()
            try:
                await asyncio.wait_for(news, remaining)
            except TimeoutError:
                return self.get(event_id) is not None
        return True

    # -- health --------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        """Whether Redis answers (``ready``, and publishes refused while it does not),
        once a read's time; follows that could not be opened are opened again."""
        while True:
            await asyncio.sleep(WATCH_S)
            was = self._connected
            self._connected = await self._ping()
            if was != self._connected:
                log.log(
                    logging.INFO if self._connected else logging.WARNING,
                    "redis hub: %s %s",
                    self.url,
                    "reachable" if self._connected else "unreachable",
                )
            if self._connected and self.follower.stuck:
                self.follower.retry_stuck()

    def _lost(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("redis hub: lost %s: %s", self.url, exc)
        self._connected = False
