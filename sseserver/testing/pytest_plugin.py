"""The pytest plugin of sseserver (entry point ``pytest11``), active wherever sseserver is
installed: the ``sse_server`` fixture, a server on a free loopback port for one test, with
the scripted wire scenarios (``sse_server.scenario(...)``), the synthetic provider and
the hub. Sync and asyncio tests alike can use it (the server has a thread and an event
loop of its own).

Nothing is started, nor even imported, unless a test asks for the fixture. Options go
in ``sse_server_options``, which a conftest or a test module may override::

    @pytest.fixture
    def sse_server_options():
        return {"heartbeat_s": 1.0}

Disable the plugin with ``-p no:sseserver``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .background import SSEServer


@pytest.fixture
def sse_server_options() -> dict[str, Any]:
    """Config overrides for ``sse_server`` (``sseserver.config.Config`` field names)."""
    return {}


@pytest.fixture
def sse_server(sse_server_options: dict[str, Any]) -> Iterator[SSEServer]:
    """A running sseserver with ``/v1/test/stream`` on, for this test only."""
    from .background import serve_in_background

    with serve_in_background(**sse_server_options) as server:
        yield server
