"""OpenAI, and every OpenAI-compatible API (Groq, OpenRouter, vLLM, Ollama, ...), through
the official ``openai`` SDK (SPEC §7).

Deliberate choices:
- We own the ``httpx.AsyncClient`` the SDK sends through: one pool for the provider's
  life, closed by ``aclose()``. A stream we stop early is closed with ``AsyncStream.close()``
  in ``finally``; httpcore then closes the TCP connection rather than pooling it, because
  an HTTP/1.1 response that was not read to its end cannot carry another request
  (tests/protocol/test_providers_wire.py measures this at the upstream's socket).
- The SDK's own retries are off (``max_retries=0``). A retry before the first token hides
  seconds of latency and a ``Retry-After`` the caller should see; our errors say
  ``retryable`` and the caller decides.
- ``timeout_s`` bounds connect, each write, and each read: the wait for the first byte of
  the answer and every gap between chunks.
- With no key given and no ``OPENAI_API_KEY``, the key is ``PLACEHOLDER_API_KEY``: local
  OpenAI-compatible servers (vLLM, Ollama, llama.cpp) ignore it, the SDK just needs one.
- Error messages never carry the upstream's text (OpenAI's 401 echoes part of the key);
  the SDK's exception is chained as ``__cause__`` for the server log.
- A stream that ends without a ``finish_reason`` is a truncated answer (a proxy or the
  upstream closed it cleanly mid-answer) and is reported as a dropped connection.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

import httpx
import openai
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice

from sseserver.providers.base import (
    BadRequest,
    Delta,
    GenerationRequest,
    ProviderError,
    UpstreamConnectionError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    Usage,
)

PLACEHOLDER_API_KEY = "sk-no-key-required"

# Upstream connections are bounded by the server's own stream limits (one per generation);
# a pool limit here would only turn load into pool timeouts reported as upstream timeouts.
MAX_CONNECTIONS: int | None = None
# Idle connections kept for reuse: enough for bursts, few enough to hold little memory.
MAX_KEEPALIVE_CONNECTIONS = 100

# Advertised to the demo page when talking to api.openai.com. Behind another base URL
# (vLLM, Ollama, ...) the model names are the operator's, so only the default is offered.
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")
ROLES = frozenset({"system", "user", "assistant"})
MAX_TEMPERATURE = 2.0  # the Chat Completions API's range is [0, 2]

# Statuses worth retrying later (the SDK's own retry list): timeout, conflict, overload.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


class OpenAIProvider:
    """Streams chat completions; one instance (and one connection pool) per server."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        default_model: str = "gpt-4o-mini",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the SDK client and its connection pool, once.

        ``base_url`` defaults to ``OPENAI_BASE_URL``, then api.openai.com (the SDK's
        rule); ``transport`` replaces the network (``httpx.MockTransport`` in unit tests).
        """
        self.default_model = default_model
        compatible = (base_url or os.environ.get("OPENAI_BASE_URL")) is not None
        self.models: tuple[str, ...] = (
            (default_model,)
            if compatible
            else tuple(dict.fromkeys((default_model, *OPENAI_MODELS)))
        )
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            ),
            follow_redirects=True,
        )
        self._client = openai.AsyncOpenAI(
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            # openai 3.x annotates httpx2 clients only, but accepts httpx ones (its
            # is_legacy_httpx_async_client); openai 1.x knows only httpx. httpx is what this
            # project depends on, so it works with both.
            http_client=cast(Any, self._http),
        )

    def validate(self, request: GenerationRequest) -> None:
        """Refuse what the API would refuse, before anything is sent.

        Raises:
            BadRequest: naming the field.
        """
        for message in request.messages:
            if message.role not in ROLES:
                raise BadRequest(f"openai has no message role {message.role!r}")
        if request.temperature is not None and not 0 <= request.temperature <= MAX_TEMPERATURE:
            raise BadRequest(f"temperature must be between 0 and {MAX_TEMPERATURE:g}")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")

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
            finish_reason: str | None = None
            usage: Usage | None = None
            while True:
                try:
                    chunk = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except openai.APIError as exc:
                    raise self._error(exc, started=True) from exc
                except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
                    raise UpstreamProtocolError("upstream sent a chunk that is not JSON") from exc
                text, reason, chunk_usage = _read_chunk(chunk)
                finish_reason = reason or finish_reason
                usage = chunk_usage or usage
                if text:
                    yield Delta(text=text)
            if finish_reason is None:
                raise UpstreamConnectionError("upstream ended the stream before finishing")
            yield Delta(finish_reason=finish_reason, usage=usage)
        finally:
            # Runs on cancellation and aclose() too: closes the response, and with it the
            # connection, unless the body was read to its end.
            if upstream is not None:
                await upstream.close()

    async def aclose(self) -> None:
        """Close the connection pool (idle and in-use connections)."""
        await self._client.close()
        await self._http.aclose()

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.extend({"role": m.role, "content": m.content} for m in request.messages)
        arguments: dict[str, Any] = {
            "model": request.model or self.default_model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            arguments["temperature"] = request.temperature
        if request.max_tokens is not None:
            # ``max_tokens``, not ``max_completion_tokens``: every OpenAI-compatible server
            # knows the older name.
            arguments["max_tokens"] = request.max_tokens
        return arguments

    def _error(self, exc: openai.APIError, *, started: bool) -> ProviderError:
        if isinstance(exc, openai.APIStatusError):
            return status_error(exc.status_code, exc.response.headers, exc.code)
        if isinstance(exc, openai.APITimeoutError):
            return UpstreamTimeout(f"no data from upstream for {self.timeout_s:g} s")
        if isinstance(exc, openai.APIConnectionError):
            what = "dropped mid-stream" if started else "failed"
            return UpstreamConnectionError(f"upstream connection {what}")
        # An ``{"error": ...}`` event inside the stream: the upstream gave up mid-answer.
        return ProviderError("upstream reported an error mid-stream", retryable=True)


def status_error(
    status: int, headers: Mapping[str, str], upstream_code: str | None = None
) -> UpstreamHTTPError:
    """An ``UpstreamHTTPError`` for an HTTP error status, with ``Retry-After`` if given."""
    detail = f" ({upstream_code})" if upstream_code else ""
    return UpstreamHTTPError(
        f"upstream answered HTTP {status}{detail}",
        code="rate_limited" if status == 429 else f"upstream_{status}",
        retryable=status >= 500 or status in RETRYABLE_STATUSES,
        status=status,
        retry_after_s=retry_after(headers),
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return None


def _read_chunk(chunk: ChatCompletionChunk) -> tuple[str, str | None, Usage | None]:
    """(text, finish_reason, usage) of one chunk.

    The SDK builds chunks without validating them, so the shape is checked here.

    Raises:
        UpstreamProtocolError: the chunk does not look like a ``chat.completion.chunk``.
    """
    # ``choices`` is empty on the usage chunk, and null on some compatible servers' (vLLM).
    choices: Any = chunk.choices or []
    if not isinstance(choices, list):
        raise UpstreamProtocolError("upstream chunk has no list of choices")
    text = ""
    reason: str | None = None
    for choice in choices:
        if not isinstance(choice, Choice):
            raise UpstreamProtocolError("upstream chunk has a malformed choice")
        if choice.index != 0:
            continue  # we ask for one choice (n=1)
        content = getattr(choice.delta, "content", None)
        finish = choice.finish_reason
        if not isinstance(content, str | None) or not isinstance(finish, str | None):
            raise UpstreamProtocolError("upstream chunk has a malformed choice")
        text += content or ""
        reason = finish or reason
    return text, reason, _usage(getattr(chunk, "usage", None))


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    counts = [getattr(raw, f, None) for f in ("prompt_tokens", "completion_tokens", "total_tokens")]
    if not all(c is None or isinstance(c, int) for c in counts):
        raise UpstreamProtocolError("upstream usage is malformed")
    return Usage(prompt_tokens=counts[0], completion_tokens=counts[1], total_tokens=counts[2])
