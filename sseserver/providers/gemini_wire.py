"""What the two Gemini clients (``gemini.py``, the google-genai SDK; ``gemini_lean.py``,
the lean client) share: models, validation, roles, finish reasons and the retry delay an
error tells. No SDK import here: the lean path never loads google-genai."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import BadRequest, GenerationRequest
from .base import retry_after as header_retry_after

PLACEHOLDER_API_KEY = "no-key-required"

# Advertised to the demo page's model picker.
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro")
MAX_TEMPERATURE = 2.0  # Gemini's range is [0, 2]

ROLES = {"user": "user", "assistant": "model", "model": "model"}
FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def validate(request: GenerationRequest) -> None:
    """Refuse what the API would refuse, before anything is sent.

    Raises:
        BadRequest: naming the field.
    """
    turns = 0
    for message in request.messages:
        if message.role != "system" and message.role not in ROLES:
            raise BadRequest(f"gemini has no message role {message.role!r}")
        turns += message.role != "system"
    if not turns:
        raise BadRequest("gemini needs a user message")
    if request.temperature is not None and not 0 <= request.temperature <= MAX_TEMPERATURE:
        raise BadRequest(f"temperature must be between 0 and {MAX_TEMPERATURE:g}")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise BadRequest("max_tokens must be at least 1")


def retry_after(headers: Mapping[str, str], details: Any = None) -> float | None:
    """Seconds from ``Retry-After``, else from a ``google.rpc.RetryInfo`` error detail
    (``"retryDelay": "7s"``), which is how the Gemini API says it on 429."""
    from_headers = header_retry_after(headers)
    if from_headers is not None:
        return from_headers
    error = details.get("error", details) if isinstance(details, dict) else None
    for item in (error or {}).get("details") or []:
        if not isinstance(item, dict) or not str(item.get("@type", "")).endswith(".RetryInfo"):
            continue
        delay = item.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None
