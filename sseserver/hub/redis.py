"""The Redis hub: Redis Streams carry updates between processes and machines, and keep
the history that a new instance loads at start.

Every instance keeps a local mirror of the history (an in-memory hub it has, not one it
is), filled from the stream at start and by one reader task afterwards, so replay and
attach stay synchronous (no update can slip between them). An update published here is
written to Redis first and then delivered locally; the reader skips updates that came
from this instance.

When Redis goes away, publishing answers 503, local subscribers stay connected, and the
reader resumes from the last entry it saw once Redis is back: nothing that Redis still
holds is lost. Generation tokens (``dispatch``) keep flowing to local readers meanwhile;
their copies for the other instances wait in an outbox bounded in bytes
(``outbox_bytes``). Past it the oldest waiting are dropped, counted per topic, and once
Redis is back a gap entry goes out in their place: other instances tell their readers of
those topics ``event: error`` ``missed_events`` — a gap is never silent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from ..wire.chunked import Frame
from ..wire.errors import error_event_data
from ..wire.sse import encode_event
from .base import Update, stop_tasks
from .memory import MemoryHub, MiB

log = logging.getLogger("sseserver.hub")

STREAM_KEY = "sseserver:updates"
READ_BLOCK_MS = 1000
READ_COUNT = 1000
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)  # then every 1 s
CLOSE_WAIT_S = 1.0
CONNECTION_ERRORS = (RedisError, ConnectionError, OSError, TimeoutError)
OUTBOX_BYTES = 64 * MiB  # updates waiting for Redis, beyond the batch being written
BATCH_BYTES = 1 * MiB  # one pipelined write at most (so in flight is bounded too)
ENTRY_OVERHEAD = 200  # an outbox entry's own weight besides its frame, measured roughly

# What XRANGE/XREAD give this client (RESP2, no decode_responses, legacy shapes): bytes
# ids, keys and values. redis-py's stubs also allow str, None and RESP3's dict.
_Entry = tuple[bytes, dict[bytes, bytes]]
_ReadReply = list[tuple[bytes, list[_Entry]]]  # [[stream key, entries], ...]


class RedisHub:
    """A hub shared through Redis Streams; local delivery and history go through its
    memory hub (``local``), under the same budget."""

    def __init__(
        self,
        url: str,
        history: int = 1000,
        history_age_s: float = 3600.0,
        *,
        history_bytes: int = 256 * MiB,
        resume_window_s: float = 300.0,
        stream_key: str = STREAM_KEY,
        max_len: int | None = None,
        outbox_bytes: int = OUTBOX_BYTES,
    ) -> None:
        local = self.local = MemoryHub(
            history, history_age_s, history_bytes=history_bytes, resume_window_s=resume_window_s
        )
        # The Hub interface's reads and local writes are the mirror's own methods, bound
        # here rather than wrapped one by one; what Redis changes is defined below.
        self.make_update = local.make_update
        self.update_of = local.update_of
        self.subscribe = local.subscribe
        self.replay = local.replay
        self.attach = local.attach
        self.unsubscribe = local.unsubscribe
        self.held = local.held
        self.get = local.get
        self.last_id = local.last_id
        self.owner = local.owner
        self.is_closed = local.is_closed
        self.close_topic = local.close_topic
        self.close_all = local.close_all
        self.subscriber_count = local.subscriber_count
        self.url = url
        self._redis: aioredis.Redis | None = aioredis.from_url(
            url, socket_connect_timeout=2, socket_keepalive=True, health_check_interval=10
        )
        self.stream_key = stream_key
        self.max_len = max_len or max(10_000, history * 10)
        self.instance = uuid.uuid4().hex
        self._last_entry = "0-0"
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: deque[Update] = deque()
        self.outbox_bytes = outbox_bytes
        self.outbox_held = 0  # bytes of the updates in the outbox
        self._outbox_ready = asyncio.Event()
        self._gaps: Counter[tuple[str, ...]] = Counter()  # dropped, per topics, not told yet
        self.dropped = 0  # updates that never reached Redis (the outbox overflowed)
        self._overflowing = False  # dropping since the last write that went through
        self._arrived = asyncio.Event()  # set, and replaced, after each batch read
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

    # -- the mirror's state and reads, as the Hub interface names them -------------------

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
    def redis(self) -> aioredis.Redis | None:
        """The client, shared with the rate limiter so limits hold across instances."""
        return self._redis

    async def start(self) -> None:
        await self.local.start()
        # The client made in __init__ is the one the rate limiters were given: keep it.
        try:
            await self._load_history()
            self._connected = True
        except CONNECTION_ERRORS as exc:
            log.warning("redis hub: cannot load history from %s: %s", self.url, exc)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_forever(), name="redis-hub-reader")
        self._writer = loop.create_task(self._write_forever(), name="redis-hub-writer")

    async def aclose(self) -> None:
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        if await stop_tasks(tasks, CLOSE_WAIT_S):
            log.warning("redis hub: background tasks did not stop in time")
        await self.local.aclose()
        if self._redis is not None:
            try:
                await asyncio.wait_for(self._redis.aclose(), CLOSE_WAIT_S)
            except (TimeoutError, *CONNECTION_ERRORS):
                pass

    async def knows(self, event_id: str, within_s: float) -> bool:
        """A reader's last event may have been written to it by another instance a few
        milliseconds before that instance forwarded it to Redis, and its reconnect may
        land here first: wait (bounded) for the mirror to catch up rather than take a
        known generation for an unknown one."""
        deadline = asyncio.get_running_loop().time() + within_s
        while self.get(event_id) is None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not self._connected:
                return False
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return self.get(event_id) is not None
        return True

    # -- encoding ----------------------------------------------------------------------

    def _fields(self, update: Update) -> dict[FieldT, EncodableT]:
        """An entry carries the event as encoded once (its SSE bytes), so instances
        that read it neither encode it again nor keep another copy of its text."""
        fields: dict[FieldT, EncodableT] = {
            "origin": self.instance,
            "id": update.id,
            "topics": json.dumps(update.topics),
            "sse": bytes(update.frame.raw),
        }
        if update.private:
            fields["private"] = "1"
        if update.final:
            fields["final"] = "1"
        if update.owner is not None:
            fields["owner"] = update.owner
        return fields

    def _tell_gap(self, raw: dict[bytes, bytes]) -> None:
        """Another instance lost updates of these topics on their way to Redis: its
        readers here hear of it (they got everything else in order)."""
        try:
            topics = tuple(json.loads(raw[b"gap"]))
            missed = int(raw[b"missed"])
            if not topics or not all(isinstance(t, str) and t for t in topics):
                raise ValueError("bad topics")
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            log.warning("redis hub: skipping a malformed gap entry: %s", exc)
            return
        data = error_event_data(
            "missed_events",
            f"{missed} events of this topic were lost while Redis was unreachable",
            retryable=False,
        )
        self.local.announce(topics, Frame.of(encode_event(data, event="error")))

    def _decode(self, raw: dict[bytes, bytes]) -> Update | None:
        try:
            event_id = raw[b"id"].decode()
            topics = tuple(json.loads(raw[b"topics"]))
            sse = raw[b"sse"]
            if not topics or not all(isinstance(t, str) and t for t in topics):
                raise ValueError("bad topics")
            if self.local.get(event_id) is not None:
                return None  # already here (read twice across a reconnect)
            owner = raw.get(b"owner")
            return self.local.update_of(
                topics,
                event_id,
                Frame.of(sse),
                private=raw.get(b"private") == b"1",
                final=raw.get(b"final") == b"1",
                owner=owner.decode() if owner is not None else None,
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            log.debug("redis hub: skipping entry: %s", exc)
            return None

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
        assert self._redis is not None
        try:
            await self._redis.xadd(
                self.stream_key, self._fields(update), maxlen=self.max_len, approximate=True
            )
        except CONNECTION_ERRORS as exc:
            raise ConnectionError(f"redis unavailable: {exc}") from exc
        self.local.dispatch_soon(update)
        await asyncio.sleep(0)  # the flush runs first: written when this returns
        return update.id

    def dispatch(self, update: Update) -> None:
        """Deliver here at once (no round trip on the token path), forward in order."""
        self.local.dispatch(update)
        self._outbox.append(update)
        self.outbox_held += update.frame.size + ENTRY_OVERHEAD
        if self.outbox_held > self.outbox_bytes:
            self._overflow()
        self._outbox_ready.set()

    def _overflow(self) -> None:
        """Drop the oldest waiting updates until the outbox fits its bound again; what
        each topic lost is told to the other instances once Redis is back."""
        outbox = self._outbox
        first = not self._overflowing
        self._overflowing = True
        while self.outbox_held > self.outbox_bytes and len(outbox) > 1:
            lost = outbox.popleft()
            self.outbox_held -= lost.frame.size + ENTRY_OVERHEAD
            self._gaps[lost.topics] += 1
            self.dropped += 1
        if first:
            log.warning(
                "redis hub: outbox over %d bytes while Redis is away: dropping the oldest "
                "updates for other instances (their readers will be told)",
                self.outbox_bytes,
            )

    def _next_batch(self) -> list[Update]:
        outbox = self._outbox
        batch: list[Update] = []
        size = 0
        while outbox and len(batch) < READ_COUNT and size < BATCH_BYTES:
            update = outbox.popleft()
            weight = update.frame.size + ENTRY_OVERHEAD
            self.outbox_held -= weight
            size += weight
            batch.append(update)
        return batch

    def _gap_fields(self, topics: tuple[str, ...], missed: int) -> dict[FieldT, EncodableT]:
        return {"origin": self.instance, "gap": json.dumps(topics), "missed": missed}

    async def _write_forever(self) -> None:
        delay = 0
        while True:
            if not self._outbox and not self._gaps:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            # Updates dropped so far are older than every update still waiting: their gap
            # entries go first, in the same pipelined write.
            gaps, self._gaps = self._gaps, Counter()
            batch = self._next_batch()
            while True:
                try:
                    assert self._redis is not None
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for topics, missed in gaps.items():
                            pipe.xadd(
                                self.stream_key,
                                self._gap_fields(topics, missed),
                                maxlen=self.max_len,
                                approximate=True,
                            )
                        for item in batch:
                            pipe.xadd(
                                self.stream_key,
                                self._fields(item),
                                maxlen=self.max_len,
                                approximate=True,
                            )
                        await pipe.execute()
                    delay = 0
                    self._overflowing = False
                    break
                except CONNECTION_ERRORS as exc:
                    log.warning("redis hub: forwarding failed (%s), retrying", exc)
                    await asyncio.sleep(RECONNECT_DELAYS[min(delay, len(RECONNECT_DELAYS) - 1)])
                    delay += 1

    # -- reading -------------------------------------------------------------------------

    async def _load_history(self) -> None:
        """Mirror what Redis holds, oldest first, so that resume works on any instance."""
        assert self._redis is not None
        start = "-"
        while True:
            entries = cast(
                list[_Entry],  # see _Entry: the stubs' str | None cannot happen here
                await self._redis.xrange(self.stream_key, min=start, count=READ_COUNT),
            )
            for entry_id, raw in entries:
                self._last_entry = entry_id.decode()
                update = self._decode(raw)
                if update is not None:
                    self.local.dispatch(update)
            if len(entries) < READ_COUNT:
                return
            start = "(" + self._last_entry

    async def _read_forever(self) -> None:
        failures = 0
        while True:
            try:
                assert self._redis is not None
                result = cast(
                    _ReadReply,  # see _Entry: the stubs' RESP3 dict cannot happen here
                    await self._redis.xread(
                        {self.stream_key: self._last_entry}, block=READ_BLOCK_MS, count=READ_COUNT
                    ),
                )
                if not self._connected:
                    log.info("redis hub: connected to %s", self.url)
                self._connected = True
                failures = 0
            except CONNECTION_ERRORS as exc:
                if self._connected:
                    log.warning("redis hub: lost %s: %s", self.url, exc)
                self._connected = False
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            for _key, entries in result or ():
                for entry_id, raw in entries:
                    self._last_entry = entry_id.decode()
                    if raw.get(b"origin", b"").decode() == self.instance:
                        continue
                    if b"gap" in raw:
                        self._tell_gap(raw)
                        continue
                    update = self._decode(raw)
                    if update is not None:
                        self.local.dispatch_soon(update)  # a batch read goes out joined
            if result:
                arrived, self._arrived = self._arrived, asyncio.Event()
                arrived.set()
