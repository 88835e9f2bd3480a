"""A recording ``DeltaSink`` for pushed generations (``providers.base.Pushes``): what
was pushed, when (``loop.time()``), how it ended, and futures to wait on instead of
sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sseserver.providers.base import ProviderError

END_WITHIN_S = 10.0  # generous: the machine may be busy


class Recorder:
    """Records ``(loop.time(), text)`` per delta and every end (``on_end`` must be called
    once: ``ends`` shows it if not). ``hook(n)`` runs inside ``on_delta`` after the
    ``n``-th delta (0-based) is recorded: how a test acts from the provider's callback."""

    def __init__(self, hook: Callable[[int], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.deltas: list[tuple[float, str]] = []
        self.ends: list[ProviderError | None] = []
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self.hook = hook
        self._waits: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.deltas]

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.deltas]

    @property
    def error(self) -> ProviderError:
        """The one error it ended with (fails the test otherwise)."""
        assert len(self.ends) == 1, self.ends
        error = self.ends[0]
        assert isinstance(error, ProviderError), error
        return error

    def on_delta(self, text: str) -> None:
        assert text, "a delta is never empty"
        self.deltas.append((self.loop.time(), text))
        n = len(self.deltas)
        for count, future in self._waits:
            if n >= count and not future.done():
                future.set_result(None)
        if self.hook is not None:
            self.hook(n - 1)

    def on_end(self, error: ProviderError | None) -> None:
        self.ends.append(error)
        if not self.ended.done():
            self.ended.set_result(None)

    def reached(self, count: int) -> asyncio.Future[None]:
        """A future set once ``count`` deltas have been recorded."""
        future: asyncio.Future[None] = self.loop.create_future()
        if len(self.deltas) >= count:
            future.set_result(None)
        else:
            self._waits.append((count, future))
        return future

    async def wait_for(self, count: int, within: float = END_WITHIN_S) -> None:
        """Until ``count`` deltas have come (fails after ``within`` seconds)."""
        async with asyncio.timeout(within):
            await self.reached(count)


async def ended(*recorders: Recorder, within: float = END_WITHIN_S) -> None:
    """Until every recorder has heard its end (fails after ``within`` seconds)."""
    async with asyncio.timeout(within):
        await asyncio.gather(*(r.ended for r in recorders))


async def loop_turns(n: int = 3) -> None:
    """Let the loop run ``n`` iterations (callbacks already due run meanwhile)."""
    for _ in range(n):
        await asyncio.sleep(0)
