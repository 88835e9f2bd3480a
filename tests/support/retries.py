"""Short retry backoff for tests whose upstream calls fail in this process.

Every client retries before the first byte (SPEC §7): the lean client and the openai SDK
back off from 0.5 s, google-genai as ``providers/gemini.py`` configures it. ``short_backoff``
starts all three at 1 ms, so a retried failure costs milliseconds, not seconds. What an
upstream says in ``Retry-After`` is still waited for: tests that fail with a status the
clients retry give a short one (``[fake fail=503 retry_after=0.01]``).

``short_backoff`` is an autouse fixture: a test module turns it on by importing it. A
server in another process keeps its real backoff.
"""

from __future__ import annotations

import openai._base_client
import pytest

from sseserver.providers import gemini
from sseserver.providers.upstream import client as lean

BACKOFF_S = 0.001


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client's first retry after ``BACKOFF_S`` (doubling, as before), no jitter
    added (google-genai's)."""
    monkeypatch.setattr(lean, "INITIAL_RETRY_DELAY_S", BACKOFF_S)
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", BACKOFF_S)
    monkeypatch.setattr(gemini, "INITIAL_RETRY_DELAY_S", BACKOFF_S)
    monkeypatch.setattr(gemini, "RETRY_JITTER_S", 0.0)
