"""Test helpers for the users of sseserver: a server in a background thread
(``serve_in_background``) and the pytest plugin built on it (``pytest_plugin``, the
``sse_server`` fixture), so that SSE clients can be tested against the scripted wire
scenarios of ``/v1/test/stream``, the synthetic provider and the hub.

Importing this package is cheap: the server itself is imported when one is started.
"""

from __future__ import annotations

from ..wire.scenario_body import Expected
from .background import SSEServer, query_string, serve_in_background

__all__ = ["Expected", "SSEServer", "query_string", "serve_in_background"]
