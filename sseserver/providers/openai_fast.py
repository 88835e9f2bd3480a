"""The ``openai`` provider without the SDK (``--openai-client fast``): the same request, the
same deltas and the same errors as ``openai.py``, for a fraction of the work per chunk.

The SDK builds a pydantic model for every ``chat.completion.chunk`` and decodes SSE one
line at a time through layers of generators; at thousands of proxied streams per process
that is where the CPU goes. Here one ``httpx.AsyncClient`` per provider (``openai_wire``
creates it) streams ``POST {base_url}/chat/completions``, each network read is split into
SSE lines in one pass, and each event's data goes through ``json.loads`` into plain dicts
that ``openai_wire.ChunkReader`` reads, as it reads the SDK's models.

What the SDK does that this module does as well, on purpose (so the two stay exchangeable;
tests/unit/test_providers_openai_fast.py replays the same bytes to both):
- SSE as ``openai._streaming.SSEDecoder`` reads it: lines end at CR, LF or CRLF; each line
  must be UTF-8; ``data`` lines join with LF; an ``id`` once seen makes every later blank
  line an event; data starting ``[DONE]`` ends the answer; ``event: thread.*`` events are
  Assistants events that carry no chat chunk.
- After ``[DONE]`` the rest of the body (the chunked terminator) is read for at most 100 ms,
  so that the connection can go back to the pool (the SDK's ``drain_response_async``).
- ``{"error": ...}`` with a truthy error is an upstream failure; error answers are read to
  their end, and their ``error.code`` named in the message.
- Headers that matter upstream: ``Authorization: Bearer``, JSON ``Accept``/``Content-Type``,
  and ``OpenAI-Organization``/``OpenAI-Project`` from ``OPENAI_ORG_ID``/``OPENAI_PROJECT_ID``.

Deliberate divergences: the SDK's telemetry headers (``User-Agent: AsyncOpenAI/Python``,
``X-Stainless-*``) are not sent, and neither are ``OPENAI_CUSTOM_HEADERS`` (openai 3.x).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from .base import Delta, GenerationRequest, retry_after, status_error
from .openai_wire import (
    TRANSPORT_ERRORS,
    ChatEvents,
    OpenAIBase,
    error_detail,
    not_json,
)

# The SDK's bound on reading what follows [DONE] before it closes the connection instead.
DRAIN_TIMEOUT_S = 0.100


class FastOpenAIProvider(OpenAIBase):
    """Streams chat completions over plain httpx; one instance (and pool) per server."""

    def _http_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "headers": self.api_headers()}

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Text deltas in order, then one ``Delta`` with ``finish_reason`` and ``usage``.

        Raises:
            BadRequest: see ``validate``.
            ProviderError: a subclass telling what failed upstream.
        """
        self.validate(request)
        body = json.dumps(self._arguments(request), separators=(",", ":"), ensure_ascii=False)
        http_request = self._http.build_request("POST", "chat/completions", content=body)
        response: httpx.Response | None = None
        try:
            try:
                response = await self._http.send(http_request, stream=True)
                if not response.is_success:
                    await response.aread()
            except TRANSPORT_ERRORS as exc:
                raise self._transport_error(exc, started=False) from exc
            if not response.is_success:
                code, message = error_detail(response.text)
                said = f"Error code: {response.status_code}" + (f" - {message}" if message else "")
                cause = httpx.HTTPStatusError(said, request=http_request, response=response)
                raise status_error(
                    response.status_code, retry_after(response.headers), code
                ) from cause

            events = ChatEvents()
            chunks = response.aiter_bytes()
            try:
                async for data in chunks:
                    for text in events.feed(data):
                        yield Delta(text=text)
                    if events.done:
                        if response.http_version == "HTTP/1.1":
                            await _drain(chunks)
                        break
                else:
                    events.close()
            except TRANSPORT_ERRORS as exc:
                raise self._transport_error(exc, started=True) from exc
            except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
                raise not_json() from exc
            yield events.last()
        finally:
            # Runs on cancellation and aclose() too: closes the response, and with it the
            # connection, unless the body was read to its end.
            if response is not None:
                await response.aclose()


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the rest of a finished answer for ``DRAIN_TIMEOUT_S`` at most: read to its end,
    its connection goes back to the pool; cut short, it is closed."""
    with contextlib.suppress(TimeoutError, *TRANSPORT_ERRORS):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in chunks:
                pass
