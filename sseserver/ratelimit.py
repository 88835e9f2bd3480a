"""Rate limits per subject (JWT ``sub``) or client IP (SPEC §9): requests per window and
concurrent streams. With the Redis hub the request windows are shared by all instances
(fixed windows, one INCR per request); concurrent streams are counted per instance."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .config import Rate
from .stream import Request

MAX_TRACKED_KEYS = 100_000  # bound the table against a flood of distinct addresses


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

    def __init__(self, rate: Rate, redis: Any = None, prefix: str = "sseserver:rl:") -> None:
        self.rate = rate
        self._redis = redis
        self._prefix = prefix
        self._windows: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    async def hit(self, key: str) -> float:
        """Count one request; 0 when allowed, else the seconds to wait (Retry-After)."""
        window = self.rate.window_s
        now = time.time()
        index = int(now // window)
        elapsed = (now % window) / window
        if self._redis is not None:
            try:
                return await self._hit_redis(key, index, elapsed, now)
            except Exception:
                pass
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
        cur_key = f"{self._prefix}{key}:{index}"
        prev_key = f"{self._prefix}{key}:{index - 1}"
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
    """At most ``limit`` open streams per key on this instance."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count <= 0:
            self._open.pop(key, None)
        else:
            self._open[key] = count
