"""Updates on their way to Redis: one pipelined write per loop iteration, bounded in bytes.

Generation tokens are delivered locally at once and queued here for the other instances;
a Mercure publish is queued with a future and answered when Redis has it. One writer task
takes whatever the iteration queued and sends it as one pipeline (one round trip), so a
burst of tokens costs a round trip, not one per token. On one redis-server the pipeline
holds one script call per ``per_call`` entries; on a cluster, where a script's keys share
a slot, one per entry.

While Redis is away, tokens keep arriving: the queue is bounded in bytes (``limit``) and
past it the oldest are dropped and counted per topic; once Redis is back a gap entry goes
out in their place, which other instances tell their readers as ``missed_events``.
Publishes are never queued across an outage: they fail at once (503) instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from .base import Update
from .redis_wire import (
    APPEND_SCRIPT,
    channel_of,
    encode_entry,
    encode_gap,
    stream_key,
)

log = logging.getLogger("sseserver.hub")

MiB = 1024 * 1024
LIMIT_BYTES = 64 * MiB  # updates waiting for Redis, beyond the batch being written
BATCH_BYTES = 1 * MiB  # one pipelined write at most (so in flight is bounded too)
BATCH_UPDATES = 1000
PER_CALL = 128  # entries per script call on one redis-server (Redis busy ~1 ms a call)
# Between the starts of two writes: at most 500 round trips a second, each carrying
# what the loop iterations meanwhile queued (a round trip costs ~100 µs of CPU here; an
# update in a batch ~20 µs). Other instances see an update at most this much later.
MIN_GAP_S = 0.002
ENTRY_OVERHEAD = 200  # a queued update's own weight besides its frame, measured roughly
RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)  # then every 1 s
CONNECTION_ERRORS = (RedisError, ConnectionError, OSError, TimeoutError)


@dataclass(slots=True)
class Shape:
    """What the streams keep: entries per topic and for the firehose, and how long an
    idle topic's stream lives."""

    topic_len: int
    firehose_len: int
    idle_ms: int
    ended_ms: int  # a topic's last update (a generation's end): kept for the resume window


@dataclass(slots=True)
class _Item:
    update: Update
    acked: asyncio.Future[None] | None  # a publish waiting for Redis; None for a token
    firehose: bool


def _refused(result: Any, size: int) -> list[Exception | None]:
    """Each entry's error in one APPEND_SCRIPT call of ``size`` entries, from its
    answer: an error for the whole call (its connection, or Redis's), or the refused
    entries' positions (from 1) and messages in pairs."""
    if isinstance(result, Exception):
        return [result] * size
    errors: list[Exception | None] = [None] * size
    if not isinstance(result, list) or len(result) % 2:
        return [RedisError(f"unexpected reply {result!r:.80}")] * size
    for position, message in zip(result[::2], result[1::2], strict=True):
        if not isinstance(position, int) or not 1 <= position <= size:
            return [RedisError(f"unexpected reply {result!r:.80}")] * size
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        errors[position - 1] = ResponseError(text)
    return errors


class Outbox:
    """The queue and its writer task."""

    def __init__(
        self,
        client: Callable[[], Any],
        origin: str,
        shape: Shape,
        *,
        limit: int = LIMIT_BYTES,
        owner_of: Callable[[str], str | None] = lambda _topic: None,
        per_call: int = 1,
    ) -> None:
        self._client = client
        self.per_call = per_call
        self._owner_of = owner_of
        self.origin = origin
        self.shape = shape
        self.limit = limit
        self.held = 0  # bytes of the queued updates
        self.dropped = 0  # updates that never reached Redis (the queue overflowed)
        self.writes = 0  # pipelines sent
        self.refused = 0  # updates Redis refused (dropped: a retry would fail again)
        self.sequence = 0  # entries written by this instance: readers take each once
        self._queue: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._gaps: Counter[tuple[str, ...]] = Counter()  # dropped, per topics, untold
        self._overflowing = False  # dropping since the last write that went through

    # -- queueing ------------------------------------------------------------------------

    def put(self, update: Update) -> None:
        """Queue a token for the other instances (local readers already have it)."""
        self._queue.append(_Item(update, None, False))
        self.held += update.frame.size + ENTRY_OVERHEAD
        if self.held > self.limit:
            self._overflow()
        self._ready.set()

    def put_acked(self, update: Update) -> asyncio.Future[None]:
        """Queue a publish; the future is done when Redis holds it, failed when it could
        not be written (the caller answers 503)."""
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(update, acked, True))
        self.held += update.frame.size + ENTRY_OVERHEAD
        self._ready.set()
        return acked

    def _overflow(self) -> None:
        """Drop the oldest waiting tokens until the queue fits its bound again; what each
        topic lost is told to the other instances once Redis is back."""
        queue = self._queue
        first = not self._overflowing
        self._overflowing = True
        while self.held > self.limit and len(queue) > 1:
            lost = queue.popleft()
            self.held -= lost.update.frame.size + ENTRY_OVERHEAD
            if lost.acked is not None:
                if not lost.acked.done():
                    lost.acked.set_exception(ConnectionError("redis unavailable"))
                continue
            self._gaps[lost.update.topics] += 1
            self.dropped += 1
        if first:
            log.warning(
                "redis hub: outbox over %d bytes while Redis is away: dropping the oldest "
                "updates for other instances (their readers will be told)",
                self.limit,
            )

    def _next_batch(self) -> list[_Item]:
        queue = self._queue
        batch: list[_Item] = []
        size = 0
        while queue and len(batch) < BATCH_UPDATES and size < BATCH_BYTES:
            item = queue.popleft()
            weight = item.update.frame.size + ENTRY_OVERHEAD
            self.held -= weight
            size += weight
            batch.append(item)
        return batch

    # -- writing -------------------------------------------------------------------------

    def _calls(self, batch: list[_Item], gaps: Counter[tuple[str, ...]]) -> list[tuple[Any, ...]]:
        """The script calls for a batch: (stream key, max length, entry, channel, how long
        the stream lives on idle, the index of its item in ``batch`` or -1 for a gap)
        each. Gaps go first: the updates they stand for are older than any still queued.
        Every entry carries this instance's sequence number (readers take each once,
        whichever topic or the firehose brings it) and its topic's owner (a reader may
        load a generation's stream after its first entry was trimmed)."""
        calls: list[tuple[Any, ...]] = []
        shape = self.shape
        idle = shape.idle_ms
        for topics, missed in gaps.items():
            self.sequence += 1
            raw = encode_gap(self.origin, self.sequence, topics, missed)
            for topic in topics:
                calls.append((stream_key(topic), shape.topic_len, raw, channel_of(topic), idle, -1))
        owner_of = self._owner_of
        for index, item in enumerate(batch):
            update = item.update
            self.sequence += 1
            raw = encode_entry(
                self.origin,
                self.sequence,
                update.topics,
                update.id,
                bytes(update.frame.raw),
                private=update.private,
                final=update.final,
                owner=update.owner if update.owner is not None else owner_of(update.topic),
                firehose=item.firehose,
            )
            lives = shape.ended_ms if update.final else idle
            for topic in update.topics:
                key, channel = stream_key(topic), channel_of(topic)
                calls.append((key, shape.topic_len, raw, channel, lives, index))
            if item.firehose:
                key, channel = stream_key(None), channel_of(None)
                calls.append((key, shape.firehose_len, raw, channel, idle, index))
        return calls

    async def _send(self, calls: list[tuple[Any, ...]]) -> list[Exception | None]:
        """One pipeline of script calls; each call's error (None: written). Raises when
        the pipeline as a whole fails (the connection). EVAL with the script's text, not
        EVALSHA: Redis compiles it once and keeps it, a restarted server or a new shard
        needs no loading first, and cluster pipelines take it."""
        client = self._client()
        if client is None:
            raise ConnectionError("redis is not connected")
        per_call = self.per_call
        async with client.pipeline(transaction=False) as pipe:
            for start in range(0, len(calls), per_call):
                group = calls[start : start + per_call]
                args = [arg for call in group for arg in call[1:5]]
                pipe.eval(APPEND_SCRIPT, len(group), *(c[0] for c in group), *args)
            results = await pipe.execute(raise_on_error=False)
        errors: list[Exception | None] = []
        for start, result in zip(range(0, len(calls), per_call), results, strict=True):
            errors.extend(_refused(result, min(per_call, len(calls) - start)))
        return errors

    async def write_forever(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        last_write = 0.0
        while True:
            if not self._queue and not self._gaps:
                self._ready.clear()
                await self._ready.wait()
            # A round trip costs far more than the updates it carries: under load, let
            # what the next iterations queue join this write (at most MIN_GAP_S late);
            # an update after a quiet spell goes at once.
            wait = last_write + MIN_GAP_S - loop.time()
            if wait > 0 and len(self._queue) < BATCH_UPDATES:
                await asyncio.sleep(wait)
            last_write = loop.time()
            gaps, self._gaps = self._gaps, Counter()
            batch = self._next_batch()
            calls = self._calls(batch, gaps)
            try:
                errors = await self._send(calls)
            except CONNECTION_ERRORS as exc:
                self._failed(batch, gaps, exc)
                await asyncio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
                continue
            again = self._sort_errors(batch, calls, errors)
            if again:  # some calls lost their connection: those items (only) again
                self._failed(again, Counter(), ConnectionError("part of a write failed"))
                await asyncio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
            else:
                failures = 0
                self._overflowing = False
            self.writes += 1
            for item in batch:
                if item.acked is not None and not item.acked.done():
                    item.acked.set_result(None)

    def _sort_errors(
        self, batch: list[_Item], calls: list[tuple[Any, ...]], errors: list[Exception | None]
    ) -> list[_Item]:
        """Items whose calls Redis refused (out of memory, a key of another type) are
        dropped and counted: writing them again would fail again and hold up the queue.
        Items whose calls lost their connection are returned, to be written again; the
        calls of theirs that went through may then be written twice (readers take an
        entry once by its sequence number)."""
        again: dict[int, _Item] = {}
        for call, error in zip(calls, errors, strict=True):
            index = call[-1]
            if error is None or index < 0:
                continue
            item = batch[index]
            if isinstance(error, (ConnectionError, OSError, TimeoutError)) or (
                isinstance(error, RedisError) and "connection" in str(error).lower()
            ):
                again[index] = item
                continue
            self.refused += 1
            if item.acked is not None and not item.acked.done():
                item.acked.set_exception(ConnectionError(f"redis refused it: {error}"))
            log.warning("redis hub: Redis refused an update (%s); dropped", error)
        return [again[i] for i in sorted(again)]

    def _failed(
        self, batch: list[_Item], gaps: Counter[tuple[str, ...]], exc: BaseException
    ) -> None:
        """Publishes in the batch fail (their callers answer 503: nothing was promised);
        tokens go back to the front of the queue, in order, to be written once Redis is
        back (the bound applies to them again)."""
        if not self._overflowing:
            log.warning("redis hub: forwarding failed (%s), retrying", exc)
        self._gaps.update(gaps)
        for item in reversed(batch):
            if item.acked is not None:
                if not item.acked.done():
                    item.acked.set_exception(ConnectionError(f"redis unavailable: {exc}"))
                continue
            self._queue.appendleft(item)
            self.held += item.update.frame.size + ENTRY_OVERHEAD
        if self.held > self.limit:
            self._overflow()

    def fail_waiting(self) -> None:
        """At shutdown: publishes still queued will not be written."""
        for item in self._queue:
            if item.acked is not None and not item.acked.done():
                item.acked.set_exception(ConnectionError("hub closing"))
