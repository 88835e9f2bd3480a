"""What the route handlers share: configuration, hub, generations and providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import Config
from ..generations import Generations
from ..http.protocol import ServerState
from ..hub.base import Hub
from ..metrics import Metrics
from ..providers import load
from ..providers.base import Provider
from .ratelimit import ConcurrencyLimiter

log = logging.getLogger("sseserver")


@dataclass(slots=True)
class Context:
    config: Config
    hub: Hub
    generations: Generations
    providers: dict[str, Provider] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    stream_limiter: ConcurrencyLimiter | None = None  # --max-streams-per-subject
    server_state: ServerState | None = None  # the connections' shared state, once served

    @property
    def shutting_down(self) -> bool:
        """The server's own flag (set as its shutdown begins), not a copy of it."""
        return self.server_state is not None and self.server_state.shutting_down

    def provider(self, name: str | None) -> Provider | None:
        return self.providers.get(name or self.config.provider)


def configured_providers(config: Config, environ: dict[str, str]) -> dict[str, Provider]:
    """The synthetic provider always; OpenAI and Gemini when a key or base URL is set for
    them, or when they are the default. Clients are created once here and reused."""
    providers: dict[str, Provider] = {"synthetic": load("synthetic")}
    timeout = config.upstream_timeout_s
    if config.provider == "openai" or config.openai_base_url or environ.get("OPENAI_API_KEY"):
        providers["openai"] = load(
            "openai",
            client=config.openai_client,
            base_url=config.openai_base_url,
            api_key=environ.get("OPENAI_API_KEY"),
            timeout_s=timeout,
        )
    if (
        config.provider == "gemini"
        or config.gemini_base_url
        or environ.get("GEMINI_API_KEY")
        or environ.get("GOOGLE_API_KEY")
    ):
        providers["gemini"] = load(
            "gemini",
            client=config.gemini_client,
            base_url=config.gemini_base_url,
            api_key=environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY"),
            timeout_s=timeout,
        )
    if config.provider not in providers:
        raise ValueError(f"unknown provider {config.provider!r}")
    return providers
