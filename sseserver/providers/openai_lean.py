"""The ``openai`` provider on the lean upstream client (``--openai-client lean``, the
default): the same request, deltas and errors as the SDK (``openai.py``), without httpx,
httpcore, anyio or a pydantic model per chunk between the socket and the delta.

What it shares with the other clients is in ``openai_wire`` (request body, the events of a
streamed answer, error answers, failures). It retries before the first byte as the SDKs
can (``upstream.UpstreamClient``: connection errors, 408/409/429/5xx, ``Retry-After``
honoured, at most 2 retries); once an answer has begun, nothing is retried.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

from .base import (
    Delta,
    DeltaSink,
    GenerationRequest,
    ProviderError,
    RawAnswer,
    retry_after,
    status_error,
)
from .openai_wire import ChatEvents, OpenAIBase, error_detail, not_json
from .upstream import TRANSPORT_ERRORS, Response, UpstreamClient, UpstreamTimedOut
from .upstream_feed import UpstreamFeed


class LeanOpenAIProvider(OpenAIBase):
    """Streams chat completions over ``UpstreamClient``; one instance (and pool) per server."""

    def _open_pool(self, transport: Any) -> None:
        if transport is not None:
            raise ValueError("the lean client talks to the network only")
        self._client = UpstreamClient(timeout_s=self.timeout_s)
        self._headers = self.api_headers()

    async def relay(self, body: Mapping[str, Any]) -> RawAnswer:
        """``body`` to ``chat/completions`` as it is, over the lean client.

        Raises:
            ProviderError: the upstream could not be reached.
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            response = await self._client.request("POST", self.chat_url, self._headers, payload)
        except TRANSPORT_ERRORS as exc:
            raise self._lean_error(exc, started=False) from exc
        except ValueError as exc:
            raise ProviderError(f"cannot reach the upstream: {exc}") from exc
        return LeanAnswer(response, self)

    async def aclose(self) -> None:
        await self._client.aclose()

    def push(self, request: GenerationRequest, sink: DeltaSink) -> UpstreamFeed:
        """The generation fed from the upstream's socket (``upstream_feed``): the same
        deltas and errors as ``stream``, without a task per generation.

        Raises:
            BadRequest: see ``validate``.
        """
        self.validate(request)
        return UpstreamFeed(self, sink, ChatEvents(), self._call(request))

    def _call(self, request: GenerationRequest) -> Coroutine[Any, Any, Response]:
        body = json.dumps(self._arguments(request), separators=(",", ":"), ensure_ascii=False)
        return self._client.request("POST", self.chat_url, self._headers, body.encode())

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
            raise self._lean_error(exc, started=False) from exc
        except ValueError as exc:  # a base URL or proxy URL the client cannot use
            raise ProviderError(f"cannot reach the upstream: {exc}") from exc
        try:
            if not response.ok:
                raise await self.refusal(response)
            events = ChatEvents()
            try:
                async for data in response:
                    for text in events.feed(data):
                        yield Delta(text=text)
                    if events.done:
                        await response.finish()
                        break
                else:
                    events.close()
            except TRANSPORT_ERRORS as exc:
                raise self._lean_error(exc, started=True) from exc
            except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
                raise not_json() from exc
            yield events.last()
        finally:
            # On cancellation, aclose() and errors too: a body not read to its end (after
            # [DONE] the chunked terminator usually came in the same read) closes its
            # connection; a finished one goes back to the pool. Nothing waits for it.
            response.close()

    def _lean_error(self, exc: BaseException, *, started: bool) -> ProviderError:
        return self._connection_error(
            timed_out=isinstance(exc, UpstreamTimedOut | TimeoutError), started=started
        )

    # -- upstream_feed.Answering -----------------------------------------------------------

    transport_error = _lean_error

    def malformed(self) -> ProviderError:
        return not_json()

    async def refusal(self, response: Response) -> ProviderError:
        """The SDK's reading of an error answer; a connection that fails while its body
        is read is a failed request, as the SDK tells it."""
        try:
            text = (await response.read()).decode("utf-8", "replace")
        except TRANSPORT_ERRORS as exc:
            return self._lean_error(exc, started=False)
        code, message = error_detail(text)
        said = f"Error code: {response.status}" + (f" - {message}" if message else "")
        error = status_error(response.status, retry_after(response.headers), code)
        error.__cause__ = ProviderError(said)  # for the server log, as the SDK words it
        return error


class LeanAnswer:
    """The lean client's ``Response`` as a ``RawAnswer``."""

    def __init__(self, response: Response, provider: LeanOpenAIProvider) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status
        self.headers = response.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._response:
                yield piece
        except TRANSPORT_ERRORS as exc:
            raise self._provider._lean_error(exc, started=True) from exc

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    async def aclose(self) -> None:
        self._response.close()

    def pipe(
        self,
        on_piece: Callable[[bytes], None],
        on_end: Callable[[ProviderError | None], None],
    ) -> None:
        """The body pushed from the socket's reads (``base.PipedAnswer``)."""
        lean_error = self._provider._lean_error

        def ended(error: BaseException | None) -> None:
            on_end(None if error is None else lean_error(error, started=True))

        self._response.pipe(on_piece, ended)

    def pause(self) -> None:
        self._response.pause()

    def resume(self) -> None:
        self._response.resume()
