"""Google Gemini through the official ``google-genai`` SDK (SPEC §7).

Deliberate choices:
- Closing on cancel. The SDK's async stream is a chain of nested async generators around
  the httpx response and exposes neither; closing the outer generator leaves the inner
  ones, and the response, open until garbage collection (googleapis/python-genai#2425,
  reproduced with google-genai 3.4: the upstream connection stayed open after the consumer
  was cancelled or called ``aclose()``). So we own the ``httpx.AsyncClient`` the SDK uses
  (``HttpOptions.httpx_async_client``); its response hook hands every response to the
  generation that is reading at that moment (a ``ContextVar`` set only around our calls
  into the SDK), and our ``finally`` closes them. A response not read to its end closes
  its connection rather than going back to the pool.
- Retries before the first byte as the lean client makes them (``HttpRetryOptions``: the
  lean client's ``MAX_RETRIES``, 2, for 408/409/429/5xx and refused connections, backing
  off from 0.5 s doubling up to 8 s). Where google-genai differs: it waits its backoff,
  never what ``Retry-After`` says; it also retries a wait for the answer's head that timed
  out (the lean client does not, so that a hung upstream costs one timeout, not three)
  and a certificate that does not verify; and it does not retry a connection closed
  before the answer's head. Once an answer has begun nothing is retried, and automatic
  continuation (new requests after a dropped stream) is turned off.
- ``timeout_s`` bounds connect, each write and each read (first byte, and every gap).
- The key is ``api_key``, else ``GEMINI_API_KEY``, else ``GOOGLE_API_KEY`` (SPEC §10
  names the first), else ``PLACEHOLDER_API_KEY`` so that local fakes and proxies that
  ignore keys work. ``vertexai=False`` is explicit so that ``GOOGLE_GENAI_USE_VERTEXAI`` in
  the environment cannot switch the backend.
- Roles: ``assistant`` is Gemini's ``model``; ``system`` messages join ``system``
  in ``system_instruction`` (Gemini has no system turn).
- Finish reasons are told in OpenAI's words where one exists (``STOP`` -> ``stop``,
  ``MAX_TOKENS`` -> ``length``, safety blocks -> ``content_filter``), else lower-cased.
  ``completion_tokens`` counts thinking tokens too, as OpenAI's does for reasoning.
- Error messages never carry the upstream's text; the SDK's exception is the ``__cause__``.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import contextmanager

import httpx
from google import genai
from google.genai import errors, types

from .base import (
    Delta,
    GenerationRequest,
    ProviderError,
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamTimeout,
    Usage,
    status_error,
)
from .gemini_wire import (
    FINISH_REASONS,
    GEMINI_MODELS,
    PLACEHOLDER_API_KEY,
    ROLES,
    retry_after,
    validate,
)
from .pool import upstream_pool
from .upstream.client import (
    INITIAL_RETRY_DELAY_S,
    MAX_RETRIES,
    MAX_RETRY_DELAY_S,
    RETRY_STATUSES,
)

# The statuses google-genai retries: the lean client's (every 5xx spelled out: the SDK
# takes a list). Its jitter adds up to this much to each wait (the lean client takes up to
# a quarter off instead).
RETRIED_STATUSES = sorted({*RETRY_STATUSES, *range(500, 600)})
RETRY_JITTER_S = 0.125

# The responses opened by the generation currently calling into the SDK (see the module
# docstring). None outside our calls, so other users of the client are left alone.
_OPENED: contextvars.ContextVar[list[httpx.Response] | None] = contextvars.ContextVar(
    "sseserver_gemini_opened", default=None
)


async def _on_response(response: httpx.Response) -> None:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(response)


@contextmanager
def _collecting(opened: list[httpx.Response]) -> Iterator[None]:
    # Set and reset within one step of our generator, never across a ``yield``, so the
    # consumer's context is left as it was.
    token = _OPENED.set(opened)
    try:
        yield
    finally:
        _OPENED.reset(token)


class GeminiProvider:
    """Streams ``generate_content_stream``; one instance (and one pool) per server."""

    name = "gemini"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        default_model: str = "gemini-2.5-flash",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the SDK client and its connection pool, once.

        ``base_url`` defaults to the SDK's (generativelanguage.googleapis.com);
        ``transport`` replaces the network (``httpx.MockTransport`` in unit tests).
        """
        self.default_model = default_model
        self.models: tuple[str, ...] = tuple(dict.fromkeys((default_model, *GEMINI_MODELS)))
        self.timeout_s = timeout_s
        self._http = upstream_pool(timeout_s, transport, event_hooks={"response": [_on_response]})
        # Never used for requests; given so the SDK does not build a pool of its own.
        self._sync_http = httpx.Client(timeout=httpx.Timeout(timeout_s))
        key = (
            api_key
            or os.environ.get("GEMINI_API_KEY")
            or os.environ.get("GOOGLE_API_KEY")
            or PLACEHOLDER_API_KEY
        )
        self._client = genai.Client(
            vertexai=False,
            api_key=key,
            http_options=types.HttpOptions(
                base_url=base_url,
                timeout=max(1, round(timeout_s * 1000)),  # milliseconds
                httpx_async_client=self._http,
                httpx_client=self._sync_http,
                retry_options=types.HttpRetryOptions(
                    attempts=1 + MAX_RETRIES,
                    initial_delay=INITIAL_RETRY_DELAY_S,
                    max_delay=MAX_RETRY_DELAY_S,
                    exp_base=2,
                    jitter=RETRY_JITTER_S,
                    http_status_codes=RETRIED_STATUSES,
                ),
            ),
        )

    def validate(self, request: GenerationRequest) -> None:
        """Refuse what the API would refuse, before anything is sent.

        Raises:
            BadRequest: naming the field.
        """
        validate(request)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Text deltas in order, then one ``Delta`` with ``finish_reason`` and ``usage``.

        Raises:
            BadRequest: see ``validate``.
            ProviderError: a subclass telling what failed upstream.
        """
        self.validate(request)
        contents, config = self._arguments(request)
        opened: list[httpx.Response] = []
        chunks: AsyncIterator[types.GenerateContentResponse] | None = None
        started = False
        try:
            finish_reason: str | None = None
            usage: Usage | None = None
            while True:
                with _collecting(opened):
                    try:
                        if chunks is None:
                            chunks = await self._client.aio.models.generate_content_stream(
                                model=request.model or self.default_model,
                                contents=contents,
                                config=config,
                            )
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        raise self._error(exc, started=started) from exc
                started = True
                text, reason, chunk_usage = _read_chunk(chunk)
                finish_reason = reason or finish_reason
                usage = chunk_usage or usage
                if text:
                    yield Delta(text=text)
            if finish_reason is None:
                raise UpstreamConnectionError("upstream ended the stream before finishing")
            yield Delta(finish_reason=finish_reason, usage=usage)
        finally:
            # Runs on cancellation and aclose() too. Closing the response closes its
            # connection at once (it was not read to its end); the SDK's generators,
            # closed after, then find it closed.
            for response in opened:
                await response.aclose()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        """Close the connection pool (idle and in-use connections)."""
        await self._client.aio.aclose()
        await self._http.aclose()
        self._sync_http.close()

    def _arguments(
        self, request: GenerationRequest
    ) -> tuple[list[types.Content], types.GenerateContentConfig]:
        system = [request.system] if request.system else []
        contents: list[types.Content] = []
        for message in request.messages:
            if message.role == "system":
                system.append(message.content)
                continue
            role = ROLES[message.role]  # checked by validate()
            contents.append(types.Content(role=role, parts=[types.Part(text=message.content)]))
        config = types.GenerateContentConfig(
            system_instruction="\n\n".join(system) if system else None,
            temperature=request.temperature,
            max_output_tokens=request.max_tokens,
            automatic_continuation=False,
        )
        return contents, config

    def _error(self, exc: Exception, *, started: bool) -> ProviderError:
        if isinstance(exc, errors.APIError):
            if isinstance(exc.code, int) and 400 <= exc.code < 600:
                detail = exc.status if isinstance(exc.status, str) else None
                return status_error(exc.code, retry_after(_headers(exc), exc.details), detail)
            return ProviderError("upstream reported an error", retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeout(f"no data from upstream for {self.timeout_s:g} s")
        if isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects):
            return UpstreamProtocolError("upstream answer could not be decoded")
        if isinstance(exc, httpx.RequestError):
            what = "dropped mid-stream" if started else "failed"
            return UpstreamConnectionError(f"upstream connection {what}")
        # errors.UnknownApiResponseError, json.JSONDecodeError and pydantic's
        # ValidationError are ValueErrors; the SDK's converters raise the others on
        # JSON of an unexpected shape.
        if isinstance(exc, ValueError | TypeError | KeyError | AttributeError):
            return UpstreamProtocolError("upstream sent a malformed chunk")
        return ProviderError("upstream call failed")


def _headers(exc: errors.APIError) -> Mapping[str, str]:
    headers = getattr(exc.response, "headers", None)
    return headers if headers is not None else {}


def _read_chunk(chunk: types.GenerateContentResponse) -> tuple[str, str | None, Usage | None]:
    """(text, finish_reason, usage) of one response chunk; thought parts are left out."""
    text = ""
    reason: str | None = None
    if chunk.candidates:
        candidate = chunk.candidates[0]
        parts = candidate.content.parts if candidate.content is not None else None
        for part in parts or []:
            if part.text and not part.thought:
                text += part.text
        if candidate.finish_reason is not None:
            name = str(getattr(candidate.finish_reason, "value", candidate.finish_reason))
            reason = FINISH_REASONS.get(name, name.lower())
    elif chunk.prompt_feedback is not None and chunk.prompt_feedback.block_reason is not None:
        reason = "content_filter"  # the prompt itself was blocked: no candidates at all
    return text, reason, _usage(chunk.usage_metadata)


def _usage(meta: types.GenerateContentResponseUsageMetadata | None) -> Usage | None:
    if meta is None:
        return None
    completion = meta.candidates_token_count
    if meta.thoughts_token_count:
        completion = (completion or 0) + meta.thoughts_token_count
    return Usage(
        prompt_tokens=meta.prompt_token_count,
        completion_tokens=completion,
        total_tokens=meta.total_token_count,
    )
