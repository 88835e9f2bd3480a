"""Rate limits per subject (JWT ``sub``) or client IP (SPEC §9): requests per window and
concurrent streams. With the Redis hub both are shared by all instances: request windows
as counters (one INCR per request), open streams as leases in a sorted set per subject,
renewed by the instance holding them, so a crashed instance's streams stop counting."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from ..config import Rate
from ..http.request import Request

MAX_TRACKED_KEYS = 100_000  # bound the table against a flood of distinct addresses
LEASE_S = 30.0  # a shared stream slot outlives its instance by at most this long

log = logging.getLogger("sseserver")

# What a Redis call can fail with: the client's errors and the socket's. Anything else is
# a bug and is not swallowed.
REDIS_ERRORS = (RedisError, ConnectionError, OSError, TimeoutError)

# Drop expired leases, then take one if fewer than the limit are held (atomically).
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


def _networks(trusted: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t, strict=False) for t in trusted]


class ClientAddress:
    """The client's IP: the peer, unless the peer is a trusted proxy, in which case the
    right-most address in ``X-Forwarded-For`` that is not itself a trusted proxy (or
    ``X-Real-IP``)."""

    def __init__(self, trusted: Sequence[str]) -> None:
        self._trusted = _networks(trusted)

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip())
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def of(self, request: Request) -> str:
        peer = request.client[0] if request.client else "unknown"
        if not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded = [
            a.strip()
            for v in request.header_values("x-forwarded-for")
            for a in v.split(",")
            if a.strip()
        ]
        for addr in reversed(forwarded):
            if not self._is_trusted(addr):
                return addr[:64]
        real = request.header("x-real-ip")
        return real.strip()[:64] if real else peer


class WindowLimiter:
    """``rate.count`` requests per ``rate.window_s``, as a sliding window estimated from
    two fixed windows (the current one, and the previous one weighted by overlap)."""

    def __init__(
        self,
        rate: Rate,
        redis: Any = None,
        prefix: str = "sseserver:rl:",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rate = rate
        self._redis = redis
        self._prefix = prefix
        self._clock = clock  # wall time: windows are shared by instances on other hosts
        self._windows: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self.fallbacks = 0  # requests counted here because Redis could not be asked
        self._falling_back = False

    async def hit(self, key: str) -> float:
        """Count one request; 0 when allowed, else the seconds to wait (Retry-After).
        While Redis cannot be asked, each instance counts its own (logged once per
        outage, counted in ``fallbacks``)."""
        window = self.rate.window_s
        now = self._clock()
        index = int(now // window)
        elapsed = (now % window) / window
        if self._redis is not None:
            try:
                wait = await self._hit_redis(key, index, elapsed, now)
            except REDIS_ERRORS as exc:
                self.fallbacks += 1
                if not self._falling_back:
                    self._falling_back = True
                    log.warning("rate limit: redis unavailable, counting locally: %s", exc)
            else:
                self._falling_back = False
                return wait
        current, previous = self._local(key, index)
        estimate = previous * (1 - elapsed) + current
        if estimate >= self.rate.count:
            return self._wait(index, now)
        self._windows[key] = (index, current + 1, previous)
        return 0.0

    def _local(self, key: str, index: int) -> tuple[int, int]:
        entry = self._windows.pop(key, None)
        if entry is None:
            current, previous = 0, 0
        elif entry[0] == index:
            current, previous = entry[1], entry[2]
        elif entry[0] == index - 1:
            current, previous = 0, entry[1]
        else:
            current, previous = 0, 0
        self._windows[key] = (index, current, previous)
        while len(self._windows) > MAX_TRACKED_KEYS:
            self._windows.popitem(last=False)
        return current, previous

    async def _hit_redis(self, key: str, index: int, elapsed: float, now: float) -> float:
        window = self.rate.window_s
        # One hash tag: both windows in one Redis Cluster slot, as a transaction needs.
        cur_key = f"{self._prefix}{{{key}}}:{index}"
        prev_key = f"{self._prefix}{{{key}}}:{index - 1}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(cur_key)
            pipe.expire(cur_key, math.ceil(window * 2) + 1)
            pipe.get(prev_key)
            current, _, previous = await pipe.execute()
        estimate = int(previous or 0) * (1 - elapsed) + int(current) - 1
        if estimate >= self.rate.count:
            return self._wait(index, now)
        return 0.0

    def _wait(self, index: int, now: float) -> float:
        return max(1.0, math.ceil((index + 1) * self.rate.window_s - now))


class ConcurrencyLimiter:
    """At most ``limit`` open streams per key: on this instance, or on all instances that
    share ``redis``. Without Redis (or while it is unreachable) each instance counts its
    own, so a Redis outage never refuses streams it cannot count."""

    def __init__(
        self,
        limit: int,
        redis: Any = None,
        *,
        lease_s: float = LEASE_S,
        prefix: str = "sseserver:streams:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self.fallbacks = 0  # streams counted here because Redis could not be asked
        self._redis = redis
        self.lease_s = lease_s
        self._prefix = prefix
        self._open: dict[str, int] = {}
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:12]
        self._leases: dict[str, str] = {}  # lease member -> its Redis key
        self._acquire_script: Any = redis.register_script(_ACQUIRE) if redis else None
        self._renewer: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    async def acquire(self, key: str) -> str | None:
        """A lease on one of ``key``'s slots, or None when all are taken."""
        if self._redis is not None:
            member = f"{self._instance}:{next(self._ids)}"
            redis_key = self._prefix + key
            now = self._clock()
            try:
                taken = await self._acquire_script(
                    keys=[redis_key],
                    args=[now, self.limit, now + self.lease_s, member, int(self.lease_s * 2000)],
                )
            except REDIS_ERRORS as exc:  # Redis away: count locally
                self.fallbacks += 1
                log.warning("stream limit: redis unavailable, counting locally: %s", exc)
            else:
                if not taken:
                    return None
                self._leases[member] = redis_key
                self._start_renewing()
                return member
        count = self._open.get(key, 0)
        if count >= self.limit:
            return None
        self._open[key] = count + 1
        return "local:" + key

    def release(self, lease: str) -> None:
        if lease.startswith("local:"):
            key = lease[6:]
            count = self._open.get(key, 0) - 1
            if count <= 0:
                self._open.pop(key, None)
            else:
                self._open[key] = count
            return
        redis_key = self._leases.pop(lease, None)
        if redis_key is not None and self._redis is not None:
            task = asyncio.get_running_loop().create_task(self._give_back(redis_key, lease))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _give_back(self, redis_key: str, member: str) -> None:
        try:
            await self._redis.zrem(redis_key, member)
        except REDIS_ERRORS:  # the lease runs out by itself
            pass

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_forever(), name="stream-leases")

    async def _renew_forever(self) -> None:
        """One task renews every lease this instance holds (not one timer per stream)."""
        while self._leases:
            await asyncio.sleep(self.lease_s / 3)
            expiry = self._clock() + self.lease_s
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member, redis_key in list(self._leases.items()):
                        pipe.zadd(redis_key, {member: expiry}, xx=True)
                        pipe.pexpire(redis_key, int(self.lease_s * 2000))
                    await pipe.execute()
            except REDIS_ERRORS as exc:  # retried at the next round
                log.warning("stream limit: cannot renew leases: %s", exc)

    async def aclose(self) -> None:
        tasks = [t for t in (self._renewer, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
