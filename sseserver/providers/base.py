"""What every provider is: an async iterator of ``Delta``s for one ``GenerationRequest``
(``stream``, pulled by a task) — and, for those that can, a generation pushed to a
``DeltaSink`` from the event loop's own callbacks (``Pushes``), with no task of its own.

Providers know nothing of HTTP or SSE. They release their upstream call in ``finally`` /
``async with`` so that cancelling the consuming task closes the upstream connection; a
pushed one closes it in ``Feed.cancel``.
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# The roles of a chat message every provider accepts (SPEC §6).
ROLES = ("system", "user", "assistant")
# Statuses the official SDKs retry, besides every 5xx; their errors are retryable.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer. The last delta of a stream may carry only the finish reason
    and usage (``text == ""``)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str | None
    messages: tuple[Message, ...]
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    # provider-specific extras (the synthetic provider's tokens/interval_ms/size/ttft_ms)
    params: Mapping[str, Any] = field(default_factory=dict)


class ProviderError(Exception):
    """An upstream failure, told to the client as one ``event: error``."""

    code = "upstream_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s


class UpstreamHTTPError(ProviderError):
    code = "upstream_http_error"


def status_error(
    status: int, retry_after_s: float | None, detail: str | None = None
) -> UpstreamHTTPError:
    """The error for an upstream's HTTP error status, the same for every provider."""
    suffix = f" ({detail})" if detail else ""
    return UpstreamHTTPError(
        f"upstream answered HTTP {status}{suffix}",
        code="rate_limited" if status == 429 else f"upstream_{status}",
        retryable=status >= 500 or status in RETRYABLE_STATUSES,
        status=status,
        retry_after_s=retry_after_s,
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


class UpstreamTimeout(ProviderError):
    code = "upstream_timeout"
    retryable = True


class UpstreamConnectionError(ProviderError):
    code = "upstream_connection_error"
    retryable = True


class UpstreamProtocolError(ProviderError):
    """Malformed chunks or an answer that does not follow the API's wire format."""

    code = "upstream_protocol_error"


class BadRequest(ProviderError):
    """The request cannot be served by this provider (unknown model, bad parameter)."""

    code = "bad_request"


class Provider(Protocol):
    """Streams one generation. Implementations are created once and reused (their HTTP
    clients pool connections); ``stream`` is called per generation."""

    name: str
    default_model: str
    models: tuple[str, ...]  # advertised to the demo page's model picker

    def validate(self, request: GenerationRequest) -> None:
        """Raise BadRequest before anything is sent when the request cannot be served."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]: ...

    async def aclose(self) -> None: ...


class RawAnswer(Protocol):
    """An upstream's answer as it came: status, headers and body bytes (decompressed).
    Reading it raises ``ProviderError`` subclasses only; ``aclose`` closes its connection
    unless the body was read to its end."""

    status: int
    headers: Mapping[str, str]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class PipedAnswer(Protocol):
    """A ``RawAnswer`` whose body can be pushed: ``on_piece`` from the socket's reads,
    then ``on_end`` once (None, or the ``ProviderError`` that cut it short); ``aclose``
    stops both and closes the connection."""

    def pipe(
        self,
        on_piece: Callable[[bytes], None],
        on_end: Callable[[ProviderError | None], None],
    ) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@runtime_checkable
class Relay(Protocol):
    """A provider that can pass a request body to its upstream untouched and hand back
    the answer as it came (SPEC §7: ``/v1/chat/completions`` as a transparent relay)."""

    async def relay(self, body: Mapping[str, Any]) -> RawAnswer:
        """Send ``body`` as the API's request; the answer once its head has arrived.

        Raises:
            ProviderError: the upstream could not be reached (after the client's retries).
        """
        ...


class DeltaSink(Protocol):
    """Where a pushed generation's output goes (``Generations`` is the one user). Called
    from the event loop's callbacks — the upstream socket's reads, the shared clock —
    never from a task of the generation's own."""

    def on_delta(self, text: str) -> None:
        """A piece of the answer's text (never empty)."""
        ...

    def on_end(self, error: ProviderError | None) -> None:
        """The answer is complete (``None``) or failed; called once, never after
        ``Feed.cancel``."""
        ...


class Feed(Protocol):
    """A generation being pushed: what its consumer can do to it."""

    def pause(self) -> None:
        """Stop delivering (a reader is behind): the upstream is throttled in turn."""
        ...

    def resume(self) -> None: ...

    def cancel(self) -> None:
        """Stop now and close the upstream call; the sink hears nothing more."""
        ...


@runtime_checkable
class Pushes(Protocol):
    """A provider that delivers deltas by calling a sink from the event loop's own
    callbacks, so a chunk travels from the upstream socket to every viewer's transport
    with no task switch and no producer task per generation (SPEC §7)."""

    def push(self, request: GenerationRequest, sink: DeltaSink) -> Feed:
        """Start ``request``; deltas and the end go to ``sink``. Validation errors are
        raised here (``BadRequest``); everything later reaches ``sink.on_end``."""
        ...


@functools.cache
def implements(kind: type, protocol: type) -> bool:
    """Whether objects of ``kind`` implement a runtime-checkable ``protocol`` (``Pushes``,
    ``Relay``, ``PipedAnswer``), asked once per class: an ``isinstance`` check against a
    protocol walks its members every time, per request."""
    return issubclass(kind, protocol)
