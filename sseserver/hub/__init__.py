"""Pub/sub hub: topics, history and fan-out, behind one interface (``Hub``).

Backends register by the scheme of ``--hub``'s value, imported only when chosen (as
providers are): a new backend is a module here plus a line in ``HUBS``.
"""

from __future__ import annotations

import importlib

from .base import EARLIEST, Hub, SharedHub, Subscription, Update, selector_matches
from .memory import MemoryHub

HUBS = {
    "memory": "sseserver.hub.memory:MemoryHub",
    "redis": "sseserver.hub.redis:RedisHub",
    "rediss": "sseserver.hub.redis:RedisHub",
    "unix": "sseserver.hub.redis:RedisHub",
    "redis+cluster": "sseserver.hub.redis:RedisHub",
    "rediss+cluster": "sseserver.hub.redis:RedisHub",
}


def scheme_of(url: str) -> str:
    """``redis://host`` -> ``redis``; a bare name (``memory``) is its own scheme."""
    return url.partition("://")[0] if "://" in url else url


def load_hub(
    url: str,
    *,
    history: int,
    history_age_s: float,
    history_bytes: int,
    resume_window_s: float,
) -> Hub:
    """The hub for ``url``. Raises ValueError for a scheme no backend serves."""
    target = HUBS.get(scheme_of(url))
    if target is None:
        known = ", ".join(sorted(HUBS))
        raise ValueError(f"--hub: no backend for {url!r} (schemes: {known})")
    module_name, _, attr = target.partition(":")
    backend = getattr(importlib.import_module(module_name), attr)
    hub: Hub = backend.from_url(
        url,
        history=history,
        history_age_s=history_age_s,
        history_bytes=history_bytes,
        resume_window_s=resume_window_s,
    )
    return hub


__all__ = [
    "EARLIEST",
    "HUBS",
    "Hub",
    "MemoryHub",
    "SharedHub",
    "Subscription",
    "Update",
    "load_hub",
    "selector_matches",
]
