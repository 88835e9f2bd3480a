"""Server configuration: one frozen dataclass, filled from flags and ``SSESERVER_*`` variables.

Pure: no asyncio, no sockets. Flags win over the environment, which wins over defaults.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

SECONDS = 1.0
KiB = 1024
MiB = 1024 * KiB


# What --hub accepts: each names a backend in sseserver.hub.HUBS (a test keeps the two
# together).
HUB_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# The clients each provider can be reached with (providers.CLIENTS registers them; a
# unit test keeps the two lists equal). The first is the default.
UPSTREAM_CLIENTS = {"openai": ("lean", "sdk"), "gemini": ("lean", "sdk")}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``window_s`` seconds."""

    count: int
    window_s: float


def parse_rate(text: str) -> Rate | None:
    """``"3/60s"`` → Rate(3, 60); ``"off"`` or empty → None. Units: s, m, h (default s)."""
    text = text.strip().lower()
    if text in ("", "off", "none", "0"):
        return None
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|sec|m|min|h)?", text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"rate must look like '3/60s', got {text!r}")
    amount = float(m.group(2) or 1)
    if amount <= 0:
        raise ValueError(f"rate window must be positive, got {text!r}")
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(3) or "s"]
    return Rate(int(m.group(1)), amount * unit)


_BYTE_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB}
_BYTE_UNITS |= {"mib": MiB, "g": 1024 * MiB, "gb": 1024 * MiB, "gib": 1024 * MiB}


def parse_bytes(text: str) -> int:
    """``"268435456"``, ``"256MiB"``, ``"256M"`` or ``"1 GiB"`` → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = _BYTE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"a size must look like '268435456' or '256MiB', got {text!r}")
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    provider: str = "synthetic"
    openai_base_url: str | None = None
    # "lean": the server's own upstream client (providers/upstream); "sdk": the official
    # SDK. The same requests, deltas and errors.
    openai_client: str = "lean"
    gemini_base_url: str | None = None
    gemini_client: str = "lean"
    upstream_timeout_s: float = 30 * SECONDS
    # 15 s: under the 30-60 s idle timeouts of common proxies and load balancers.
    heartbeat_s: float = 15 * SECONDS
    retry_ms: int = 2000
    # 10 s to send a request head: generous for real clients, fatal to slowloris.
    header_timeout_s: float = 10 * SECONDS
    keepalive_timeout_s: float = 5 * SECONDS
    max_connections: int = 100_000
    # 16 KiB: h11's default head limit, and more than any browser sends.
    max_head_bytes: int = 16 * KiB
    max_body_bytes: int = 1 * MiB
    # 256 KiB per connection: ~1000 typical events of slack before a slow reader counts.
    write_buffer_bytes: int = 256 * KiB
    resume_grace_s: float = 0.0
    history: int = 1000
    history_age_s: float = 3600.0
    # 256 MiB for the history of all topics together: ~ a million 100-byte tokens; the
    # oldest go first past it, so memory is flat whatever the traffic (SPEC §8).
    history_bytes: int = 256 * MiB
    # 5 minutes: far longer than EventSource's reconnect delay and a phone's network
    # switch, short enough that ended generations do not pile up.
    resume_window_s: float = 300 * SECONDS
    max_stream_s: float = 0.0  # 0 = no limit
    hub: str = "memory"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # With JWT on, subscribers without a token may still receive public updates (§8).
    anonymous: bool = False
    # The address clients use (behind nginx it differs from the listening one); the
    # Mercure hub's resource identifier is it + /.well-known/mercure.
    public_url: str | None = None
    # Serve the scripted wire scenarios of /v1/test/stream (§6): never on by default.
    test_endpoints: bool = False
    cors_origins: tuple[str, ...] = ()
    rate: Rate | None = None
    max_streams_per_subject: int = 0  # 0 = no cap
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace_s: float = 10 * SECONDS
    log_level: str = "info"
    log_format: str = "text"
    loop: str = "auto"
    static_dir: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> Config:
        """Raise ValueError naming the first option out of range."""
        positive = (
            "heartbeat_s",
            "header_timeout_s",
            "keepalive_timeout_s",
            "max_connections",
            "max_head_bytes",
            "max_body_bytes",
            "write_buffer_bytes",
            "upstream_timeout_s",
            "workers",
            "history_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in (
            "resume_grace_s",
            "shutdown_grace_s",
            "retry_ms",
            "history",
            "max_stream_s",
            "resume_window_s",
            "history_age_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("--public-url must be an http:// or https:// URL")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError("--port must be 0..65535")
        if self.log_format not in ("text", "json"):
            raise ValueError("--log-format must be 'text' or 'json'")
        for provider, clients in UPSTREAM_CLIENTS.items():
            if getattr(self, f"{provider}_client") not in clients:
                names = ", ".join(f"'{c}'" for c in clients)
                raise ValueError(f"--{provider}-client must be one of {names}")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError("--loop must be auto, asyncio or uvloop")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("--log-level must be debug, info, warning, error or critical")
        scheme = self.hub.partition("://")[0] if "://" in self.hub else self.hub
        if scheme not in HUB_SCHEMES or (scheme != "memory" and "://" not in self.hub):
            raise ValueError("--hub must be 'memory', a redis:// URL or a redis+cluster:// URL")
        return self


# Environment variables that are not SSESERVER_<FLAG>.
_ENV_ALIASES = {
    "openai_base_url": ("OPENAI_BASE_URL",),
    "jwt_public_key": ("SSESERVER_JWT_PUBLIC_KEY",),
}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _converter(name: str, default: object) -> object:
    if name in ("cors_origins", "trusted_proxies"):
        return _csv
    if name == "rate":
        return parse_rate
    if name == "history_bytes":
        return parse_bytes
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sseserver",
        description="A lean HTTP/1.1 Server-Sent Events server for LLM streaming and pub/sub.",
    )
    defaults = Config()
    for f in fields(Config):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        env = "SSESERVER_" + f.name.upper()
        shown = "none" if default in (None, ()) else default
        switch: dict[str, object] = {}
        if isinstance(default, bool):  # a switch: `--flag` alone turns it on
            shown = "on" if default else "off"
            switch = {"nargs": "?", "const": True}
        parser.add_argument(
            flag,
            dest=f.name,
            type=_converter(f.name, default),  # type: ignore[arg-type]
            default=None,
            help=f"(env {env}; default {shown})",
            **switch,  # type: ignore[arg-type]
        )
    return parser


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Config:
    """Flags, then environment, then defaults.

    Raises:
        SystemExit: bad flags (argparse's behaviour).
        ValueError: a value out of range or unparsable environment variable.
    """
    args = build_parser().parse_args(argv)
    defaults = Config()
    values: dict[str, object] = {}
    for f in fields(Config):
        if f.name == "extra":
            continue
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        names = ("SSESERVER_" + f.name.upper(), *_ENV_ALIASES.get(f.name, ()))
        for env_name in names:
            if environ.get(env_name):
                convert = _converter(f.name, getattr(defaults, f.name))
                try:
                    values[f.name] = convert(environ[env_name])  # type: ignore[operator]
                except ValueError as exc:
                    raise ValueError(f"{env_name}: {exc}") from None
                break
    return Config(**values).validate()  # type: ignore[arg-type]
