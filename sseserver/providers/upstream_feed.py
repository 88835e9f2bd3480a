"""A generation pushed from an upstream's socket (``base.Pushes``) over the lean client.

The call is opened in a short task — connect, retries, the response head, an error
answer's body — and from then on the answer is fed from ``Connection.data_received``: each
network read is decoded (``AnswerReader``) and its texts handed to the sink in the same
callback, so a chunk reaches every viewer's transport with no task switch and the
generation keeps no task at all. Pausing stops reading the socket (TCP then throttles the
upstream); cancelling closes it at once.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from .base import DeltaSink, ProviderError
from .upstream import TRANSPORT_ERRORS, Response


class AnswerReader(Protocol):
    """Reads one API's streamed answer from the body's bytes."""

    @property
    def done(self) -> bool:
        """The answer said it is complete (OpenAI's ``[DONE]``): nothing more is read."""
        ...

    @property
    def started(self) -> bool:
        """An answer chunk has been read (what a dropped connection is then called)."""
        ...

    def feed(self, data: bytes) -> Iterable[str]:
        """The texts ``data`` completes.

        Raises:
            ProviderError: an error in the answer; ValueError: JSON or UTF-8 that does not
            decode, a chunk of the wrong shape.
        """
        ...

    def close(self) -> None:
        """The body ended. Raises as ``feed`` when the answer is incomplete."""
        ...


class Answering(Protocol):
    """What a provider tells its feeds about its API's failures."""

    def transport_error(self, exc: BaseException, *, started: bool) -> ProviderError: ...

    def malformed(self) -> ProviderError:
        """The error for an answer that does not decode (a ValueError from the reader)."""
        ...

    async def refusal(self, response: Response) -> ProviderError:
        """The error for a non-2xx answer, its body read (or what cut that body short)."""
        ...


class UpstreamFeed:
    """One pushed generation: its opening task, then its answer's pieces."""

    __slots__ = ("_api", "_call", "_over", "_paused", "_reader", "_response", "_sink", "_task")

    def __init__(
        self,
        api: Answering,
        sink: DeltaSink,
        reader: AnswerReader,
        call: Coroutine[Any, Any, Response],
    ) -> None:
        self._api = api
        self._sink = sink
        self._reader = reader
        self._response: Response | None = None
        self._paused = False
        self._over = False  # ended or cancelled: the sink hears nothing more
        self._call: Coroutine[Any, Any, Response] | None = call
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._open(call)
        )

    # -- Feed ------------------------------------------------------------------------------

    def pause(self) -> None:
        self._paused = True
        if self._response is not None:
            self._response.pause()

    def resume(self) -> None:
        self._paused = False
        if self._response is not None:
            self._response.resume()

    def cancel(self) -> None:
        self._over = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        call, self._call = self._call, None
        if call is not None and inspect.getcoroutinestate(call) == inspect.CORO_CREATED:
            call.close()  # the task never started it: nothing to undo, nothing to warn of
        response, self._response = self._response, None
        if response is not None:
            response.abort()  # the socket is closed, never pooled

    # -- opening ---------------------------------------------------------------------------

    async def _open(self, call: Coroutine[Any, Any, Response]) -> None:
        api = self._api
        try:
            response = await call
            self._call = None
        except TRANSPORT_ERRORS as exc:
            self._finish(api.transport_error(exc, started=False))
            return
        except ValueError as exc:  # a base URL or proxy URL the client cannot use
            self._finish(ProviderError(f"cannot reach the upstream: {exc}"))
            return
        if self._over:
            response.close()
            return
        if not response.ok:
            try:
                error = await api.refusal(response)
            finally:
                response.close()
            self._finish(error)
            return
        self._task = None
        self._response = response
        if self._paused:
            response.pause()
        response.pipe(self._piece, self._end)

    # -- pushed from the socket ------------------------------------------------------------

    def _piece(self, data: bytes) -> None:
        reader, sink = self._reader, self._sink
        try:
            for text in reader.feed(data):
                sink.on_delta(text)
                if self._over:
                    return
        except ProviderError as exc:
            self._fail(exc)
            return
        except ValueError:
            self._fail(self._api.malformed())
            return
        if reader.done:
            response, self._response = self._response, None
            if response is not None:
                response.finish_soon()  # pooled once the terminator is read
            self._finish(None)

    def _end(self, error: BaseException | None) -> None:
        self._response = None  # closed (pooled if complete) before this is called
        if self._over:
            return
        if error is not None:
            self._finish(self._api.transport_error(error, started=self._reader.started))
            return
        try:
            self._reader.close()
        except ProviderError as exc:
            self._finish(exc)
            return
        except ValueError:
            self._finish(self._api.malformed())
            return
        self._finish(None)

    def _fail(self, error: ProviderError) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.abort()
        self._finish(error)

    def _finish(self, error: ProviderError | None) -> None:
        if not self._over:
            self._over = True
            self._sink.on_end(error)
