"""Where a request goes: the origin of a URL, and the proxy (if any) the environment names
for it (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, ``NO_PROXY``), read as curl and the
SDKs read them."""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" | "https"
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """``host[:port]`` as the Host header and a CONNECT target write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Proxy:
    origin: Origin
    authorization: str | None  # the Proxy-Authorization value, from the URL's user:pass


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, target in origin-form) of an absolute http(s) URL.

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    origin = Origin(scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme])
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return origin, target


def proxy_for(origin: Origin) -> Proxy | None:
    """The proxy the environment names for ``origin``, None to go direct (no proxy
    variable, or ``NO_PROXY`` matches the host).

    Raises:
        ValueError: the proxy URL is not an http:// URL.
    """
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(origin.scheme) or proxies.get("all")
    if not url:
        return None
    if urllib.request.proxy_bypass_environment(origin.host, proxies):  # type: ignore[attr-defined]
        return None
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"only http:// proxies are supported, not {url!r}")
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    return Proxy(Origin("http", parts.hostname, parts.port or 80), authorization)
