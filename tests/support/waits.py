"""Waiting on a condition, the one way tests do it: poll the condition itself (bounded),
never a sleep that stands in for it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.002


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    within: float = 5.0,
    what: str = "condition",
) -> float:
    """Wait until ``predicate()`` (a plain or an async function) holds; the seconds it
    took. Fails with ``what`` after ``within`` seconds."""
    start = time.monotonic()
    deadline = start + within
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {within}s")
        await asyncio.sleep(POLL_S)
