"""An upstream inside ``httpx.MockTransport`` for the providers' unit tests: recorded wire
chunks replayed to the real SDKs, no socket opened (socket tests: tests/protocol, which
share ``ask``, the one-message request).

``no_sockets`` is an autouse fixture: a test module turns it on by importing it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
import pytest

from sseserver.providers.base import Delta, GenerationRequest, Message, Provider


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests must not open sockets: any connect fails loudly."""

    def refuse(*args: object) -> None:
        raise AssertionError("unit tests must not open sockets")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


class Body(httpx.AsyncByteStream):
    """A response body from a list of chunks; an exception in the list is raised there.
    Records ``aclose()``: that is how the provider's closing of the upstream shows here."""

    def __init__(self, chunks: Iterable[bytes | Exception], gate: asyncio.Event | None = None):
        self.chunks = list(chunks)
        self.gate = gate  # when set, the body waits for it after the first chunks
        self.closed = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, Exception):
                raise chunk
            if self.gate is not None and self.sent >= 2:
                await self.gate.wait()
            self.sent += 1
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """A MockTransport handler that answers every request with one prepared response."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return self.respond(request)

    def body(self) -> Any:
        return json.loads(self.requests[-1].content)


def sse_response(body: Body, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(
        status, headers={"content-type": "text/event-stream"}, stream=body
    )


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


def ask(text: str = "hi", **kw: Any) -> GenerationRequest:
    return GenerationRequest(model=None, messages=(Message("user", text),), **kw)


async def run(provider: Provider, request: GenerationRequest | None = None) -> list[Delta]:
    try:
        return [d async for d in provider.stream(request or ask())]
    finally:
        await provider.aclose()
