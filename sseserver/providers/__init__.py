"""Providers registered by name and imported lazily, so an SDK loads only when used."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Provider

PROVIDERS: dict[str, str] = {
    "synthetic": "sseserver.providers.synthetic:SyntheticProvider",
    "openai": "sseserver.providers.openai:OpenAIProvider",
    "gemini": "sseserver.providers.gemini:GeminiProvider",
}

# The classes that can serve a provider under its name, by client (``--openai-client``).
CLIENTS: dict[str, dict[str, str]] = {
    "openai": {
        "sdk": PROVIDERS["openai"],
        "lean": "sseserver.providers.openai_lean:LeanOpenAIProvider",
    },
    "gemini": {
        "sdk": PROVIDERS["gemini"],
        "lean": "sseserver.providers.gemini_lean:LeanGeminiProvider",
    },
}


def load(name: str, *, client: str | None = None, **options: Any) -> Provider:
    """Create the provider registered as ``name``, with the class ``CLIENTS`` names for
    ``client`` if given.

    Raises:
        KeyError: no provider has that name, or it has no such client.
    """
    target = PROVIDERS[name] if client is None else CLIENTS[name][client]
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    provider: Provider = cls(**options)
    return provider
