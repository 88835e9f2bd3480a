"""What the OpenAI clients (``openai.py``, the SDK; ``openai_lean.py``, the lean client)
share: options, validation, the request body, the reading of ``chat.completion.chunk``
objects and the mapping of failures to ``ProviderError``s. One place for each, so that
``--openai-client`` changes the cost per chunk and nothing else (tests/protocol/
test_providers_replay.py replays the same bytes to both).

Deliberate choices (both clients):
- One pool per provider, for the provider's life, closed by ``aclose()``. A response
  abandoned before its end closes its connection, never pools it.
- The SDK's retries, before the first byte only (connection errors, 408/409/429/5xx,
  ``Retry-After`` honoured, at most 2); once an answer has begun nothing is retried, and
  our errors say ``retryable`` so the caller decides.
- ``timeout_s`` bounds connect, each write, and each read: the wait for the first byte of
  the answer and every gap between chunks.
- With no key given and no ``OPENAI_API_KEY``, the key is ``PLACEHOLDER_API_KEY``: local
  OpenAI-compatible servers (vLLM, Ollama, llama.cpp) ignore it, the SDK just needs one.
- Error messages never carry the upstream's text (OpenAI's 401 echoes part of the key);
  the underlying exception is chained as ``__cause__`` for the server log.
- A stream that ends without a ``finish_reason`` is a truncated answer (a proxy or the
  upstream closed it cleanly mid-answer) and is reported as a dropped connection.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
import httpx

from ..wire import json_text
from ..wire.sse_decode import EventDecoder
from .base import (
    ROLES,
    BadRequest,
    Delta,
    GenerationRequest,
    ProviderError,
    RawAnswer,
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamTimeout,
    Usage,
)
from .pool import upstream_pool

PLACEHOLDER_API_KEY = "sk-no-key-required"
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the SDK's, when neither flag nor env says

# Advertised to the demo page when talking to api.openai.com. Behind another base URL
# (vLLM, Ollama, ...) the model names are the operator's, so only the default is offered.
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")
MAX_TEMPERATURE = 2.0  # the Chat Completions API's range is [0, 2]

# What the openai SDK counts as a failed request (its ``_httpx2.request_exceptions``): httpx's
# own, and the TLS and end-of-stream errors that anyio's streams raise unmapped.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.RequestError,
    ssl.SSLError,
    anyio.EndOfStream,
)

#: a chunk's fields as a mapping, or None when it is not a JSON object (see ``ChunkReader``)
Fields = Callable[[Any], Mapping[str, Any] | None]


class OpenAIBase:
    """Options, validation and request body of an OpenAI Chat Completions provider.

    Subclasses add ``stream``; ``aclose()`` closes the connection pool.
    """

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
        """``base_url`` defaults to ``OPENAI_BASE_URL``, then api.openai.com (the SDK's
        rule); ``transport`` replaces the network (``httpx.MockTransport`` in unit tests)."""
        self.default_model = default_model
        given = base_url or os.environ.get("OPENAI_BASE_URL")
        self.base_url = given or DEFAULT_BASE_URL
        compatible = given is not None
        self.models: tuple[str, ...] = (
            (default_model,)
            if compatible
            else tuple(dict.fromkeys((default_model, *OPENAI_MODELS)))
        )
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY
        self.timeout_s = timeout_s
        self._open_pool(transport)

    def api_headers(self) -> dict[str, str]:
        """The headers every request to the API carries: the key, JSON both ways, and
        ``OpenAI-Organization``/``OpenAI-Project`` from ``OPENAI_ORG_ID``/``OPENAI_PROJECT_ID``."""
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        for header, env in (
            ("OpenAI-Organization", "OPENAI_ORG_ID"),
            ("OpenAI-Project", "OPENAI_PROJECT_ID"),
        ):
            if (value := os.environ.get(env)) is not None:
                headers[header] = value
        return headers

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    async def relay(self, body: Mapping[str, Any]) -> RawAnswer:
        """``body`` to ``chat/completions`` as it is, over this provider's httpx pool.

        Raises:
            ProviderError: the upstream could not be reached.
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        request = self._http.build_request(
            "POST", self.chat_url, content=payload, headers=self.api_headers()
        )
        try:
            response = await self._http.send(request, stream=True)
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, started=False) from exc
        return HttpxAnswer(response, self)

    def _open_pool(self, transport: httpx.AsyncBaseTransport | None) -> None:
        """The connection pool of this provider's client (httpx for the SDK; the lean
        client brings its own)."""
        self._http = upstream_pool(self.timeout_s, transport, follow_redirects=True)

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

    async def aclose(self) -> None:
        """Close the connection pool (idle and in-use connections)."""
        await self._http.aclose()

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The request body, as ``chat.completions.create`` arguments and as JSON alike."""
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

    def _transport_error(self, exc: Exception, *, started: bool) -> ProviderError:
        """One of ``TRANSPORT_ERRORS``; ``started`` once the answer's head has arrived."""
        return self._connection_error(
            timed_out=isinstance(exc, httpx.TimeoutException), started=started
        )

    def _connection_error(self, *, timed_out: bool, started: bool) -> ProviderError:
        """A failed read or connect; ``started`` once the answer's head has arrived."""
        if timed_out:
            return UpstreamTimeout(f"no data from upstream for {self.timeout_s:g} s")
        what = "dropped mid-stream" if started else "failed"
        return UpstreamConnectionError(f"upstream connection {what}")


def error_event() -> ProviderError:
    """An ``{"error": ...}`` event inside the stream: the upstream gave up mid-answer."""
    return ProviderError("upstream reported an error mid-stream", retryable=True)


def not_json() -> UpstreamProtocolError:
    return UpstreamProtocolError("upstream sent a chunk that is not JSON")


class ChunkReader:
    """Reads the ``chat.completion.chunk`` objects of one answer: the text of each, and
    at the end the finish reason and usage they told.

    The SDK hands over its models built without validation, the lean client plain JSON;
    ``fields`` gives either one's fields as a mapping, so the shape is checked here once.
    """

    __slots__ = ("_fields", "finish_reason", "usage")

    def __init__(self, fields: Fields) -> None:
        self._fields = fields
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def read(self, chunk: Any) -> str:
        """The text of one chunk ("" for none); keeps its finish reason and usage.

        Raises:
            UpstreamProtocolError: the chunk does not look like a ``chat.completion.chunk``.
        """
        fields = self._fields
        top = fields(chunk)
        if top is None:
            raise UpstreamProtocolError("upstream chunk is not a JSON object")
        # ``choices`` is empty on the usage chunk, and null on some compatible servers' (vLLM).
        choices = top.get("choices") or []
        if not isinstance(choices, list):
            raise UpstreamProtocolError("upstream chunk has no list of choices")
        text = ""
        for raw_choice in choices:
            choice = fields(raw_choice)
            if choice is None:
                raise UpstreamProtocolError("upstream chunk has a malformed choice")
            if choice.get("index") != 0:
                continue  # we ask for one choice (n=1)
            delta = fields(choice.get("delta"))
            content = None if delta is None else delta.get("content")
            finish = choice.get("finish_reason")
            if not isinstance(content, str | None) or not isinstance(finish, str | None):
                raise UpstreamProtocolError("upstream chunk has a malformed choice")
            text += content or ""
            self.finish_reason = finish or self.finish_reason
        raw_usage = top.get("usage")
        if raw_usage is not None:
            # Usage that is not an object counts nothing (the SDK's reading of it).
            usage = fields(raw_usage) or {}
            counts = [usage.get(f) for f in ("prompt_tokens", "completion_tokens", "total_tokens")]
            if not all(c is None or isinstance(c, int) for c in counts):
                raise UpstreamProtocolError("upstream usage is malformed")
            self.usage = Usage(*counts)
        return text

    def last(self) -> Delta:
        """The closing delta: finish reason and usage. Called once the body has ended
        cleanly (``[DONE]``, or the chunked terminator): some OpenAI-compatible servers
        never send a finish reason, and their answer is complete all the same. A body cut
        short fails in the HTTP client instead."""
        return Delta(finish_reason=self.finish_reason or "stop", usage=self.usage)


class HttpxAnswer:
    """An httpx streaming response as a ``RawAnswer``: transport failures while reading
    become the provider's errors."""

    def __init__(self, response: httpx.Response, provider: OpenAIBase) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._response.aiter_bytes():
                yield piece
        except TRANSPORT_ERRORS as exc:
            raise self._provider._transport_error(exc, started=True) from exc
        except httpx.DecodingError as exc:
            raise UpstreamProtocolError("upstream answer could not be decoded") from exc

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    async def aclose(self) -> None:
        await self._response.aclose()


class UpstreamEventError(Exception):
    """An ``{"error": ...}`` event: its error object, the ``__cause__`` for the server log."""


def json_fields(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, dict) else None


def error_detail(text: str) -> tuple[str | None, str | None]:
    """(``code``, ``message``) of an error answer's ``{"error": {...}}``, read as the SDK
    reads them (``APIError.code``, ``_make_status_error_from_response``)."""
    try:
        body = json.loads(text.strip())
    except (ValueError, RecursionError):
        return None, None
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (
        None if code is None else str(code),
        message if isinstance(message, str) and message else None,
    )


class ChatEvents:
    """The events of one streamed answer, as the lean client reads them: the text of
    each ``chat.completion.chunk``, ``[DONE]`` (``done``; what follows is never read, as
    in the SDK), ``event: thread.*`` skipped, an ``{"error": ...}`` event raised. Lazy, so
    the text before a bad event is handed on before the bad event fails."""

    __slots__ = ("_decoder", "_reader", "done")

    started = True  # a connection dropped after the head is "dropped mid-stream"

    def __init__(self) -> None:
        self._decoder = EventDecoder()
        self._reader = ChunkReader(json_fields)
        self.done = False

    def feed(self, data: bytes) -> Iterator[str]:
        """The texts ``data`` completes.

        Raises:
            ProviderError: an error event; UpstreamProtocolError: a malformed chunk;
            ValueError: JSON or UTF-8 that does not decode.
        """
        whole = self._decoder.whole(data)
        events = self._decoder.feed(data) if whole is None else ((None, whole),)
        for event, payload in events:
            if payload.startswith("[DONE]"):
                self.done = True
                return
            chunk = json_text.loads(payload)
            if event is not None and event.startswith("thread."):
                continue  # an Assistants event: no chat chunk in it
            if isinstance(chunk, dict) and chunk.get("error"):
                raise error_event() from UpstreamEventError(chunk["error"])
            text = self._reader.read(chunk)
            if text:
                yield text

    def close(self) -> None:
        """The body ended without ``[DONE]``: its last line must still be UTF-8."""
        self._decoder.close()

    def last(self) -> Delta:
        return self._reader.last()
