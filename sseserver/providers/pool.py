"""The upstream connection pool every provider keeps: one ``httpx.AsyncClient`` for the
provider's life, so requests reuse connections instead of opening one each."""

from __future__ import annotations

from typing import Any

import httpx

# Upstream connections are bounded by the server's own stream limits (one per generation);
# a pool limit here would only turn load into pool timeouts reported as upstream timeouts.
MAX_CONNECTIONS: int | None = None
# Idle connections kept for reuse: enough for bursts, few enough to hold little memory.
MAX_KEEPALIVE_CONNECTIONS = 100


def upstream_pool(
    timeout_s: float, transport: httpx.AsyncBaseTransport | None = None, **options: Any
) -> httpx.AsyncClient:
    """The pool, with ``timeout_s`` for connecting and each read (the first byte
    included); ``transport`` replaces the network in unit tests."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
        ),
        **options,
    )
