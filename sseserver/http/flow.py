"""Write flow control: the transport's pause/resume_writing become one awaitable flag.

A producer calls ``await flow.drain()`` before each write; it returns at once unless the
client is behind, so the common case costs one attribute check. When the connection is
lost, waiters fail with ``ClientGone`` (as aiohttp does) rather than resuming into a dead
socket (as uvicorn does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..wire.errors import ClientGone


class FlowControl:
    __slots__ = ("_exc", "_loop", "_waiter", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark.

        Raises:
            ClientGone: the connection is (or becomes) lost.
        """
        if self._exc is not None:
            raise self._exc
        if not self.paused:
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = self._loop.create_future()
        await asyncio.shield(self._waiter)
        if self._exc is not None:
            raise self._exc

    def when_drained(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` from the loop once the client has caught up or left: how
        a pushed generation resumes its upstream without a task waiting on ``drain``."""
        if self._exc is not None or not self.paused:
            self._loop.call_soon(callback)
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = self._loop.create_future()
        self._waiter.add_done_callback(lambda _: callback())

    def release(self, exc: BaseException | None = None) -> None:
        """Called on connection loss: every current and future waiter fails."""
        self._exc = exc if exc is not None else ClientGone("client disconnected")
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._exc)
            waiter.exception()  # mark retrieved: a waiter may already be cancelled
