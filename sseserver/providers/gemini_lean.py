"""The ``gemini`` provider on the lean upstream client (``--gemini-client lean``, the
default): the request google-genai sends (``POST {base}/{version}/models/{model}:
streamGenerateContent?alt=sse``, ``x-goog-api-key``, the same JSON body), read into the
same deltas and errors as ``gemini.py`` reads the SDK's typed responses — without the SDK's
pydantic models, its generator chain or httpx between the socket and the delta.

Like the SDK's client it retries nothing after the answer has begun; before the first
byte ``upstream.UpstreamClient`` retries as the openai SDK does (at most 2 retries).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

from ..wire import json_text
from ..wire.sse import DONE, encode_event
from ..wire.sse_decode import EventDecoder
from .base import (
    Delta,
    DeltaSink,
    GenerationRequest,
    ProviderError,
    RawAnswer,
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamTimeout,
    Usage,
    status_error,
)
from .gemini_compat import ChunkTranslator, to_completion, to_gemini
from .gemini_wire import (
    FINISH_REASONS,
    GEMINI_MODELS,
    PLACEHOLDER_API_KEY,
    ROLES,
    retry_after,
    validate,
)
from .upstream import TRANSPORT_ERRORS, Response, UpstreamClient, UpstreamTimedOut
from .upstream_feed import UpstreamFeed

DONE_EVENT = encode_event(DONE)
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"  # the SDK's
DEFAULT_API_VERSION = "v1"  # google-genai's; GOOGLE_GENAI_API_VERSION=beta -> v1beta


class LeanGeminiProvider:
    """Streams ``streamGenerateContent``; one instance (and one pool) per server."""

    name = "gemini"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        default_model: str = "gemini-2.5-flash",
    ) -> None:
        self.default_model = default_model
        self.models: tuple[str, ...] = tuple(dict.fromkeys((default_model, *GEMINI_MODELS)))
        self.timeout_s = timeout_s
        key = (
            api_key
            or os.environ.get("GEMINI_API_KEY")
            or os.environ.get("GOOGLE_API_KEY")
            or PLACEHOLDER_API_KEY
        ).strip()
        version = os.environ.get("GOOGLE_GENAI_API_VERSION") or DEFAULT_API_VERSION
        version = "v1beta" if version == "beta" else version
        self._prefix = (base_url or DEFAULT_BASE_URL).rstrip("/") + f"/{version}/models/"
        self._headers = {"Content-Type": "application/json", "x-goog-api-key": key}
        self._client = UpstreamClient(timeout_s=timeout_s)

    def validate(self, request: GenerationRequest) -> None:
        """Refuse what the API would refuse, before anything is sent.

        Raises:
            BadRequest: naming the field.
        """
        validate(request)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def relay(self, body: Mapping[str, Any]) -> RawAnswer:
        """An OpenAI chat request, translated (``gemini_compat``), to ``streamGenerateContent``
        or ``generateContent``; the answer translated back to OpenAI's format as it comes.

        Raises:
            BadRequest: a field Gemini cannot honour.
            ProviderError: the upstream could not be reached.
        """
        gemini_body = to_gemini(body)
        model = str(body.get("model") or self.default_model)
        streaming = bool(body.get("stream"))
        method = ":streamGenerateContent?alt=sse" if streaming else ":generateContent"
        url = self._prefix + quote(model, safe="/") + method
        payload = json.dumps(gemini_body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            response = await self._client.request("POST", url, self._headers, payload)
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, started=False) from exc
        except ValueError as exc:
            raise ProviderError(f"cannot reach the upstream: {exc}") from exc
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return TranslatedAnswer(response, self, model, streaming, include_usage)

    def push(self, request: GenerationRequest, sink: DeltaSink) -> UpstreamFeed:
        """The generation fed from the upstream's socket (``upstream_feed``): the same
        deltas and errors as ``stream``, without a task per generation.

        Raises:
            BadRequest: see ``validate``.
        """
        self.validate(request)
        events = GeminiEvents(None)
        return UpstreamFeed(self, sink, events, self._call(request, events))

    async def _call(
        self, request: GenerationRequest, events: GeminiEvents | None = None
    ) -> Response:
        model = request.model or self.default_model
        url = self._prefix + quote(model, safe="/") + ":streamGenerateContent?alt=sse"
        body = json.dumps(_body(request), separators=(",", ":"), ensure_ascii=False).encode()
        response = await self._client.request("POST", url, self._headers, body)
        if events is not None:
            events.headers = response.headers  # an error event's retry hint may be there
        return response

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Text deltas in order, then one ``Delta`` with ``finish_reason`` and ``usage``.

        Raises:
            BadRequest: see ``validate``.
            ProviderError: a subclass telling what failed upstream.
        """
        self.validate(request)
        try:
            response = await self._call(request)
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, started=False) from exc
        except ValueError as exc:
            raise ProviderError(f"cannot reach the upstream: {exc}") from exc
        try:
            if not response.ok:
                raise await self.refusal(response)
            events = GeminiEvents(response.headers)
            try:
                async for data in response:
                    for text in events.feed(data):
                        yield Delta(text=text)
                events.close()
            except TRANSPORT_ERRORS as exc:
                raise self._transport_error(exc, started=events.started) from exc
            except ValueError as exc:  # JSON, UTF-8
                raise self.malformed() from exc
            yield events.last()
        finally:
            response.close()  # closes the connection unless the body was read to its end

    def _transport_error(self, exc: BaseException, *, started: bool) -> ProviderError:
        if isinstance(exc, UpstreamTimedOut | TimeoutError):
            return UpstreamTimeout(f"no data from upstream for {self.timeout_s:g} s")
        what = "dropped mid-stream" if started else "failed"
        return UpstreamConnectionError(f"upstream connection {what}")

    # -- upstream_feed.Answering -----------------------------------------------------------

    transport_error = _transport_error

    def malformed(self) -> ProviderError:
        return UpstreamProtocolError("upstream sent a malformed chunk")

    async def refusal(self, response: Response) -> ProviderError:
        """The SDK's reading of an error answer (or of the connection failing under it)."""
        try:
            raw = await response.read()
        except TRANSPORT_ERRORS as exc:
            return self._transport_error(exc, started=True)
        error = _status_error(response.status, response.headers, raw)
        said = raw[:500].decode("utf-8", "replace")  # for the server log only
        error.__cause__ = ProviderError(f"HTTP {response.status}: {said}")
        return error


class GeminiEvents:
    """The events of one streamed ``streamGenerateContent`` answer, read as the SDK reads
    them: each chunk's text (thoughts left out), its finish reason and usage, an
    ``{"error": ...}`` event raised. An answer that ends without a finish reason was cut."""

    __slots__ = ("_decoder", "finish_reason", "headers", "started", "usage")

    done = False  # the answer ends with the body, not with a marker

    def __init__(self, headers: Mapping[str, str] | None) -> None:
        self._decoder = EventDecoder()
        self.headers: Mapping[str, str] = headers or {}
        self.started = False  # a chunk has been read (the SDK's "started")
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> Iterator[str]:
        """The texts ``data`` completes.

        Raises:
            ProviderError: an error event; ValueError: JSON, UTF-8 or a chunk's shape.
        """
        for _event, payload in self._decoder.feed(data):
            chunk = json_text.loads(payload)
            if isinstance(chunk, dict) and "error" in chunk:
                raise _event_error(chunk, self.headers) from ProviderError(
                    f"error event: {payload[:500]}"
                )
            text, reason, usage = _read_chunk(chunk)
            self.started = True
            self.finish_reason = reason or self.finish_reason
            self.usage = usage or self.usage
            if text:
                yield text

    def close(self) -> None:
        """The body ended. Raises UpstreamConnectionError when the answer had not
        finished, ValueError when its last line is not UTF-8."""
        self._decoder.close()
        if self.finish_reason is None:
            raise UpstreamConnectionError("upstream ended the stream before finishing")

    def last(self) -> Delta:
        return Delta(finish_reason=self.finish_reason, usage=self.usage)


def _body(request: GenerationRequest) -> dict[str, Any]:
    """The JSON google-genai sends for ``generate_content_stream`` with our arguments."""
    system = [request.system] if request.system else []
    contents: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system":
            system.append(message.content)
            continue
        contents.append({"parts": [{"text": message.content}], "role": ROLES[message.role]})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}], "role": "user"}
    config: dict[str, Any] = {}  # sent even when empty, as the SDK sends it
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.max_tokens is not None:
        config["maxOutputTokens"] = request.max_tokens
    body["generationConfig"] = config
    return body


def _event_error(chunk: dict[str, Any], headers: Mapping[str, str]) -> ProviderError:
    """An ``{"error": ...}`` event in the stream, read as the SDK reads it (an
    ``APIError`` of the error's ``code``)."""
    error = chunk.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        name = error.get("status") if isinstance(error, dict) else None
        detail = name if isinstance(name, str) else None
        return status_error(code, retry_after(headers, chunk), detail)
    return ProviderError("upstream reported an error", retryable=True)


def _status_error(status: int, headers: Mapping[str, str], raw: bytes) -> ProviderError:
    """The SDK's ``errors.APIError`` reading: the JSON error's ``status`` names it, its
    ``RetryInfo`` detail (or ``Retry-After``) tells when to retry."""
    try:
        details: Any = json.loads(raw)
    except ValueError:
        details = None
    error = details.get("error") if isinstance(details, dict) else None
    name = error.get("status") if isinstance(error, dict) else None
    detail = name if isinstance(name, str) else None
    return status_error(status, retry_after(headers, details), detail)


def _read_chunk(chunk: Any) -> tuple[str, str | None, Usage | None]:
    """(text, finish_reason, usage) of one ``GenerateContentResponse`` as JSON; thought
    parts are left out.

    Raises:
        ValueError: a chunk of the wrong shape (as the SDK's converters refuse it).
    """
    if not isinstance(chunk, dict):
        raise ValueError("chunk is not an object")
    text = ""
    reason: str | None = None
    candidates = chunk.get("candidates")
    if candidates:
        candidate = _object(candidates[0] if isinstance(candidates, list) else None)
        content = _object(candidate.get("content"), optional=True)
        for raw_part in content.get("parts") or []:
            part = _object(raw_part)
            piece = part.get("text")
            if piece is not None and not isinstance(piece, str):
                raise ValueError("part text is not a string")
            if piece and not part.get("thought"):
                text += piece
        finish = candidate.get("finishReason")
        if finish is not None:
            name = str(finish)
            reason = FINISH_REASONS.get(name, name.lower())
    else:
        feedback = _object(chunk.get("promptFeedback"), optional=True)
        if feedback.get("blockReason") is not None:
            reason = "content_filter"  # the prompt itself was blocked: no candidates
    return text, reason, _usage(chunk.get("usageMetadata"))


def _object(value: Any, *, optional: bool = False) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    meta = _object(raw)
    counts = {
        k: meta.get(k)
        for k in (
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "totalTokenCount",
        )
    }
    if not all(v is None or isinstance(v, int) for v in counts.values()):
        raise ValueError("usage counts are not integers")
    completion = counts["candidatesTokenCount"]
    if counts["thoughtsTokenCount"]:
        completion = (completion or 0) + counts["thoughtsTokenCount"]
    return Usage(
        prompt_tokens=counts["promptTokenCount"],
        completion_tokens=completion,
        total_tokens=counts["totalTokenCount"],
    )


class TranslatedAnswer:
    """A Gemini answer read as an OpenAI one (``RawAnswer``): a stream's chunks become
    ``chat.completion.chunk`` events ending in ``[DONE]``, a whole answer a
    ``chat.completion``. An error answer passes as it came (its JSON names the error)."""

    def __init__(
        self,
        response: Response,
        provider: LeanGeminiProvider,
        model: str,
        streaming: bool,
        include_usage: bool,
    ) -> None:
        self._response = response
        self._provider = provider
        self._model = model
        self._streaming = streaming
        self._include_usage = include_usage
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if not 200 <= self.status < 300:
                async for piece in self._response:
                    yield piece
            elif self._streaming:
                async for piece in self._events():
                    yield piece
            else:
                raw = b"".join([piece async for piece in self._response])
                yield _dump(to_completion(json.loads(raw), self._model))
        except TRANSPORT_ERRORS as exc:
            raise self._provider._transport_error(exc, started=True) from exc
        except ValueError as exc:
            raise UpstreamProtocolError("upstream sent a malformed chunk") from exc

    async def _events(self) -> AsyncIterator[bytes]:
        translation = Translation(self._model, self._include_usage, self.headers)
        async for piece in self._response:
            out = translation.feed(piece)
            if out:
                yield out
        yield translation.end()

    def pipe(
        self,
        on_piece: Callable[[bytes], None],
        on_end: Callable[[ProviderError | None], None],
    ) -> None:
        """A streamed answer pushed from the socket's reads, translated as it comes
        (``base.PipedAnswer``)."""
        translation = Translation(self._model, self._include_usage, self.headers)
        response = self._response
        provider = self._provider

        def piece(data: bytes) -> None:
            try:
                out = translation.feed(data)
            except ProviderError as exc:
                response.abort()
                on_end(exc)
                return
            except ValueError:
                response.abort()
                on_end(provider.malformed())
                return
            if out:
                on_piece(out)

        def ended(error: BaseException | None) -> None:
            if error is not None:
                on_end(provider._transport_error(error, started=True))
                return
            try:
                last = translation.end()
            except ValueError:
                on_end(provider.malformed())
                return
            on_piece(last)
            on_end(None)

        response.pipe(piece, ended)

    def pause(self) -> None:
        self._response.pause()

    def resume(self) -> None:
        self._response.resume()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    async def aclose(self) -> None:
        self._response.close()


class Translation:
    """A streamed Gemini answer's bytes to OpenAI ``chat.completion.chunk`` events."""

    __slots__ = ("_decoder", "_headers", "_translator")

    def __init__(self, model: str, include_usage: bool, headers: Mapping[str, str]) -> None:
        self._translator = ChunkTranslator(model, include_usage=include_usage)
        self._decoder = EventDecoder()
        self._headers = headers

    def feed(self, data: bytes) -> bytes:
        """The events ``data`` completes, translated.

        Raises:
            ProviderError: an error event; ValueError: JSON, UTF-8 or a chunk's shape.
        """
        out = []
        for _event, payload in self._decoder.feed(data):
            chunk = json_text.loads(payload)
            if not isinstance(chunk, dict):
                raise ValueError("chunk is not an object")
            if "error" in chunk:
                raise _event_error(chunk, self._headers)
            out += [b"data: " + _dump(c) + b"\n\n" for c in self._translator.feed(chunk)]
        return b"".join(out)

    def end(self) -> bytes:
        """The closing events and ``[DONE]``. Raises ValueError: a last line not UTF-8."""
        self._decoder.close()
        closing = self._translator.end()
        return b"".join(b"data: " + _dump(c) + b"\n\n" for c in closing) + DONE_EVENT


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
