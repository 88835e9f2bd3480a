"""OpenAI, and every OpenAI-compatible API (Groq, OpenRouter, vLLM, Ollama, ...), through
the official ``openai`` SDK (SPEC §7; ``--openai-client sdk``). The default client is
``openai_lean.py``; what the two share (options, request body, chunk reading, errors) is
``openai_wire.py``.

Deliberate choices (and those of ``openai_wire``):
- We own the ``httpx.AsyncClient`` the SDK sends through. A stream we stop early is closed
  with ``AsyncStream.close()`` in ``finally``; httpcore then closes the TCP connection rather
  than pooling it, because an HTTP/1.1 response that was not read to its end cannot carry
  another request (tests/protocol/test_providers_wire.py measures this at the upstream's
  socket).
- The SDK retries before the first byte as the lean client does (``max_retries`` is the
  lean client's ``MAX_RETRIES``, 2): connection failures, 408/409/429/5xx and
  ``x-should-retry: true``, waiting what ``retry-after-ms``/``Retry-After`` says, else
  0.5 s doubling. Where the SDK differs: it also retries a wait for the answer's head that
  timed out (the lean client does not, so that a hung upstream costs one timeout, not
  three), a certificate that does not verify and a proxy's 407; and it honours a
  ``Retry-After`` of up to 120 s (openai 3.x; the lean client 60 s) and gives up at once
  on a longer one.
- A transport failure while the SDK reads an error answer's body escapes it unwrapped; it is
  told like any other failed request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

import openai
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk

from .base import Delta, GenerationRequest, ProviderError, retry_after, status_error
from .openai_wire import (
    PLACEHOLDER_API_KEY,
    TRANSPORT_ERRORS,
    ChunkReader,
    OpenAIBase,
    error_event,
    not_json,
)
from .upstream.client import MAX_RETRIES

__all__ = ["PLACEHOLDER_API_KEY", "OpenAIProvider", "retry_after", "status_error"]


class OpenAIProvider(OpenAIBase):
    """Streams chat completions; one instance (and one connection pool) per server."""

    def __init__(self, **options: Any) -> None:
        """Create the SDK client over ``OpenAIBase``'s connection pool, once (same options)."""
        super().__init__(**options)
        self._client = openai.AsyncOpenAI(
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=MAX_RETRIES,
            # openai 3.x annotates httpx2 clients only, but accepts httpx ones (its
            # is_legacy_httpx_async_client); openai 1.x knows only httpx. httpx is what this
            # project depends on, so it works with both.
            http_client=cast(Any, self._http),
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Text deltas in order, then one ``Delta`` with ``finish_reason`` and ``usage``.

        Raises:
            BadRequest: see ``validate``.
            ProviderError: a subclass telling what failed upstream.
        """
        self.validate(request)
        upstream: AsyncStream[ChatCompletionChunk] | None = None
        try:
            try:
                upstream = await self._client.chat.completions.create(**self._arguments(request))
            except openai.APIError as exc:
                raise self._error(exc, started=False) from exc
            except TRANSPORT_ERRORS as exc:
                raise self._transport_error(exc, started=False) from exc
            reader = ChunkReader(_model_fields)
            while True:
                try:
                    chunk = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except openai.APIError as exc:
                    raise self._error(exc, started=True) from exc
                except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
                    raise not_json() from exc
                text = reader.read(chunk)
                if text:
                    yield Delta(text=text)
            yield reader.last()
        finally:
            # Runs on cancellation and aclose() too: closes the response, and with it the
            # connection, unless the body was read to its end.
            if upstream is not None:
                await upstream.close()

    async def aclose(self) -> None:
        """Close the SDK client and the connection pool (idle and in-use connections)."""
        await self._client.close()
        await super().aclose()

    def _error(self, exc: openai.APIError, *, started: bool) -> ProviderError:
        if isinstance(exc, openai.APIStatusError):
            return status_error(exc.status_code, retry_after(exc.response.headers), exc.code)
        if isinstance(exc, openai.APIConnectionError):
            timed_out = isinstance(exc, openai.APITimeoutError)
            return self._connection_error(timed_out=timed_out, started=started)
        return error_event()


def _model_fields(value: Any) -> Mapping[str, Any] | None:
    """A chunk's fields. The SDK builds its models without validation, so any JSON object
    becomes a model (missing fields None) and any other value stays as it was."""
    return value.__dict__ if isinstance(value, openai.BaseModel) else None
