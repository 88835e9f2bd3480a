"""The synthetic provider: a deterministic model answer with no API key.

Token ``i`` is due at ``start + ttft + i * interval`` (absolute deadlines: timer overhead
never accumulates into drift), and its text depends only on ``i`` and ``size``, so a
resumed stream can be checked against an uninterrupted one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .base import BadRequest, Delta, GenerationRequest, Usage

WORDS = (
    "stream",
    "token",
    "event",
    "server",
    "browser",
    "answer",
    "model",
    "socket",
    "proxy",
    "reader",
    "chunk",
    "buffer",
    "latency",
    "resume",
    "signal",
    "topic",
)

# (default, minimum, maximum) of each parameter
LIMITS: Mapping[str, tuple[float, float, float]] = {
    "tokens": (32, 0, 1_000_000_000),
    "interval_ms": (30, 0, 600_000),
    "size": (0, 0, 1_048_576),  # 0: natural word length
    "ttft_ms": (0, 0, 600_000),
}

YIELD_EVERY = 32  # at interval 0, let the loop run other work every this many tokens


def token_text(i: int, size: int = 0) -> str:
    """The deterministic text of token ``i``: a word and a space, cut or padded by
    repetition to ``size`` characters when ``size`` is given."""
    word = WORDS[(i * 7) % len(WORDS)] + " "
    if not size:
        return word
    if len(word) >= size:
        return word[:size]
    return (word * (size // len(word) + 1))[:size]


def parse_params(params: Mapping[str, Any]) -> dict[str, float]:
    """Validated synthetic parameters. Raises BadRequest naming the bad field."""
    out: dict[str, float] = {}
    for name, (default, low, high) in LIMITS.items():
        raw = params.get(name)
        if raw is None or raw == "":
            out[name] = default
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number") from None
        if not low <= value <= high or value != value:
            raise BadRequest(f"{name} must be between {low:g} and {high:g}")
        out[name] = value
    return out


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """``asyncio.sleep`` on an absolute deadline, with the loop passed in: on Python 3.11
    every ``get_running_loop()`` (which ``asyncio.sleep`` calls) is a getpid system call,
    paid here once per token of every stream."""
    future = loop.create_future()
    handle = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        handle.cancel()


class SyntheticProvider:
    name = "synthetic"
    default_model = "synthetic-1"
    models = ("synthetic-1",)

    def __init__(self, **_options: Any) -> None:
        pass

    def validate(self, request: GenerationRequest) -> None:
        parse_params(request.params)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        p = parse_params(request.params)
        tokens = int(p["tokens"])
        size = int(p["size"])
        interval = p["interval_ms"] / 1000
        ttft = p["ttft_ms"] / 1000
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(tokens):
            due = start + ttft + i * interval
            if due > loop.time():
                await _sleep_until(loop, due)
            elif i and i % YIELD_EVERY == 0:  # not before the first: TTFT
                await asyncio.sleep(0)
            yield Delta(token_text(i, size))
        prompt = sum(len(m.content.split()) for m in request.messages)
        yield Delta("", finish_reason="stop", usage=Usage(prompt, tokens, prompt + tokens))

    async def aclose(self) -> None:
        return None
