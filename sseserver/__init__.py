"""sseserver: a lean HTTP/1.1 Server-Sent Events server on asyncio and h11."""

from __future__ import annotations

from .config import Config
from .wire.chunked import LAST_CHUNK, Frame, frame
from .wire.errors import ClientGone, HTTPError, SSEServerError
from .wire.sse import ServerSentEvent, encode_comment, encode_event, encode_retry

__all__ = [
    "LAST_CHUNK",
    "ClientGone",
    "Config",
    "Frame",
    "HTTPError",
    "SSEServerError",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "frame",
]
__version__ = "0.1.0"
