"""The lean upstream client (SPEC §7): HTTP/1.1 on asyncio Protocols, for providers."""

from .client import TRANSPORT_ERRORS, ProxyRefused, Response, UpstreamClient
from .connection import UpstreamClosed, UpstreamTimedOut
from .parse import ResponseError

__all__ = [
    "TRANSPORT_ERRORS",
    "ProxyRefused",
    "Response",
    "ResponseError",
    "UpstreamClient",
    "UpstreamClosed",
    "UpstreamTimedOut",
]
