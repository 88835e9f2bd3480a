"""Error types shared by the layers, and the two shapes errors take on the wire: the short
JSON body every refusal carries, and the data of a stream's ``event: error``."""

from __future__ import annotations

import json
from collections.abc import Sequence

MAX_ERROR_BODY = 2000  # SPEC §3: error bodies stay under 2 KB


class SSEServerError(Exception):
    """Base of the server's own exceptions."""


class ClientGone(SSEServerError, ConnectionError):
    """The peer closed the connection; raised to a producer waiting to write."""


class HTTPError(SSEServerError):
    """Raised by a handler before the response head to answer with a JSON error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = tuple(headers)


def error_body(code: str, message: str, **extra: object) -> bytes:
    """``{"error": {"code", "message", ...}}`` as bytes, truncated to stay under 2 KB."""
    message = message[:1000]
    body = json.dumps({"error": {"code": code, "message": message, **extra}}).encode()
    if len(body) > MAX_ERROR_BODY:
        body = json.dumps({"error": {"code": code, "message": message[:200]}}).encode()
    return body


def error_event_data(code: str, message: str, *, retryable: bool, **extra: object) -> str:
    """The data of an ``event: error`` (SPEC §6): ``{"code", "message", "retryable"}``."""
    return json.dumps(
        {"code": code, "message": message, "retryable": retryable, **extra},
        separators=(",", ":"),
        ensure_ascii=False,
    )
