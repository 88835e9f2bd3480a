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


def load(name: str, **options: Any) -> Provider:
    """Create the provider registered as ``name``.

    Raises:
        KeyError: no provider has that name.
    """
    module_name, _, attr = PROVIDERS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    provider: Provider = cls(**options)
    return provider
