"""Viewers of a generation on other instances, and cancels sent to them, over Redis.

A generation runs on the instance that started it; a reader whose reconnect lands on
another instance follows it there through the hub's mirror. Without a word between the
two, the producing instance sees its last local viewer leave and abandons the upstream
call while that reader still watches. So an instance that has such followers keeps a
short-lived key per generation alive (one shared refresh task, not one per reader), and
the producing instance looks for it before abandoning. A cancel asked of an instance
that does not run the generation is published on a channel every instance listens to,
and left as a short-lived key too: an instance whose listener was reconnecting when the
message went out (pub/sub keeps nothing) finds it when it subscribes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import RedisError

from .base import stop_tasks

log = logging.getLogger("sseserver.hub")

VIEWERS_KEY = "sseserver:viewers:{}"
CANCEL_CHANNEL = "sseserver:cancel"
CANCEL_KEY = "sseserver:cancel:{}"
CANCEL_KEY_TTL_MS = 60_000  # long enough for any listener to come back
CLOSE_WAIT_S = 1.0
ERRORS = (RedisError, ConnectionError, OSError, TimeoutError)


class RedisPresence:
    """Presence keys and cancel messages for generations followed across instances."""

    def __init__(self, client: Callable[[], Any], ttl_s: float) -> None:
        self._client = client  # the hub's current Redis client (it may be replaced)
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._followed: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[Any]] = set()
        self.on_cancel: Callable[[str], None] | None = None
        # The generations this instance runs (asked after the listener reconnects).
        self.running: Callable[[], Iterable[str]] = tuple

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._refresh_forever(), name="presence-refresh"),
            loop.create_task(self._listen_forever(), name="presence-cancels"),
        ]

    async def aclose(self) -> None:
        if await stop_tasks([*self._tasks, *self._pending], CLOSE_WAIT_S):
            log.warning("presence: background tasks did not stop in time")

    # -- the following side ------------------------------------------------------------

    def follow(self, generation_id: str) -> None:
        """A local reader now follows ``generation_id`` produced elsewhere."""
        self._followed[generation_id] += 1
        if self._followed[generation_id] == 1:
            self._spawn(self._mark(generation_id))

    def unfollow(self, generation_id: str) -> None:
        self._followed[generation_id] -= 1
        if self._followed[generation_id] <= 0:
            del self._followed[generation_id]

    async def _mark(self, *generation_ids: str) -> None:
        client = self._client()
        if client is None or not generation_ids:
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                for gen_id in generation_ids:
                    pipe.set(VIEWERS_KEY.format(gen_id), 1, px=self.ttl_ms)
                await pipe.execute()
        except ERRORS as exc:
            log.warning("presence: cannot mark viewers: %s", exc)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self._mark(*self._followed)

    # -- the producing side ------------------------------------------------------------

    async def watched_elsewhere(self, generation_id: str) -> bool:
        """Whether another instance has readers of ``generation_id`` (False when Redis
        cannot say: an upstream call nobody can be shown to watch is not kept)."""
        client = self._client()
        if client is None:
            return False
        try:
            return bool(await client.exists(VIEWERS_KEY.format(generation_id)))
        except ERRORS:
            return False

    # -- cancels -----------------------------------------------------------------------

    async def send_cancel(self, generation_id: str) -> None:
        client = self._client()
        if client is None:
            raise ConnectionError("redis is not connected")
        # Two calls, not a pipeline: a cluster client refuses PUBLISH in one (and a
        # cancel is rare); the key first, so a listener that misses the message finds it.
        await client.set(CANCEL_KEY.format(generation_id), 1, px=CANCEL_KEY_TTL_MS)
        await client.publish(CANCEL_CHANNEL, generation_id)

    async def _cancels_missed(self, client: Any) -> None:
        """Cancels sent while this listener was away: their keys, for what runs here."""
        running = list(self.running())
        if not running or self.on_cancel is None:
            return
        keys = [CANCEL_KEY.format(gen_id) for gen_id in running]
        # Keys of many slots: a cluster client splits them per shard (no atomic MGET).
        split = getattr(client, "mget_nonatomic", None)
        marks = await (split(keys) if split is not None else client.mget(keys))
        for gen_id, mark in zip(running, marks, strict=True):
            if mark is not None and self.on_cancel is not None:
                self.on_cancel(gen_id)

    async def _listen_forever(self) -> None:
        while True:
            client = self._client()
            try:
                if client is None:
                    raise ConnectionError("redis is not connected")
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    await self._cancels_missed(client)
                    async for message in pubsub.listen():
                        if message.get("type") == "message" and self.on_cancel is not None:
                            data = message["data"]
                            self.on_cancel(data.decode() if isinstance(data, bytes) else data)
            except ERRORS as exc:
                log.warning("presence: cancel channel lost: %s", exc)
                await asyncio.sleep(1.0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
