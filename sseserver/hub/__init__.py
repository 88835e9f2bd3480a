"""Pub/sub hub: topics, history and fan-out; in-memory and Redis backends."""

from __future__ import annotations

from .base import EARLIEST, Hub, Subscription, Update, selector_matches
from .memory import MemoryHub

__all__ = ["EARLIEST", "Hub", "MemoryHub", "Subscription", "Update", "selector_matches"]
