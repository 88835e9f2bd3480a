"""Event loop selection, by name: uvloop when importable ("auto"), else asyncio's own."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for ``asyncio.Runner(loop_factory=...)``.

    Raises:
        ImportError: ``"uvloop"`` was asked for and is not installed.
    """
    if name in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if name == "uvloop":
                raise
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop
