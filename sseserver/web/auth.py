"""JWT authentication (SPEC §9) with PyJWT: HS256 with a shared secret, or RS256/ES256
with a public key. Tokens come from ``Authorization: Bearer``, a cookie
(``sseserver_token`` or Mercure's ``mercureAuthorization``) or the ``access_token`` query
parameter (EventSource cannot set headers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

import jwt

from ..http.request import Request
from ..wire.errors import HTTPError

COOKIE_NAMES = ("sseserver_token", "mercureAuthorization")
LEEWAY_S = 5  # clock skew tolerated on exp/nbf
WWW_AUTHENTICATE = ("WWW-Authenticate", 'Bearer realm="sseserver"')


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str | None
    publish: tuple[str, ...] | None = None  # Mercure topic selectors; None = claim absent
    subscribe: tuple[str, ...] | None = None
    expires_at: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _selectors(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def token_from(request: Request) -> str | None:
    header = request.header("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    cookie_header = request.header("cookie")
    if cookie_header:
        try:
            cookies = SimpleCookie(cookie_header)
        except CookieError:
            cookies = SimpleCookie()
        for name in COOKIE_NAMES:
            if name in cookies and cookies[name].value:
                return cookies[name].value
    return request.query_param("access_token") or None


class Authenticator:
    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if public_key is not None and not public_key.lstrip().startswith("-----BEGIN"):
            with open(public_key, encoding="utf-8") as f:  # a path to a PEM file
                public_key = f.read()
        self._key: str | None = public_key or secret
        self._algorithms: Sequence[str] = ["RS256", "ES256"] if public_key else ["HS256"]
        self._audience = audience
        self._issuer = issuer

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def decode(self, token: str) -> Claims:
        """Raises HTTPError 401 (with WWW-Authenticate) for a bad or expired token."""
        assert self._key is not None
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"verify_aud": bool(self._audience)},
            )
        except jwt.ExpiredSignatureError:
            raise HTTPError(401, "token_expired", "token has expired", [WWW_AUTHENTICATE]) from None
        except jwt.PyJWTError as exc:
            raise HTTPError(
                401, "invalid_token", f"invalid token: {exc}"[:200], [WWW_AUTHENTICATE]
            ) from None
        mercure_claim = payload.get("mercure")
        mercure: dict[str, Any] = mercure_claim if isinstance(mercure_claim, dict) else {}
        exp = payload.get("exp")
        return Claims(
            subject=str(payload["sub"]) if payload.get("sub") is not None else None,
            publish=_selectors(mercure.get("publish")),
            subscribe=_selectors(mercure.get("subscribe")),
            expires_at=float(exp) if isinstance(exp, (int, float)) else None,
            raw=payload,
        )

    def authenticate(self, request: Request, *, required: bool = True) -> Claims | None:
        """The request's claims; None when auth is off, or no token and not required.

        Raises:
            HTTPError: 401 when a token is required and missing, or any token is bad.
        """
        if not self.enabled:
            return None
        token = token_from(request)
        if token is None:
            if required:
                raise HTTPError(
                    401, "unauthorized", "a bearer token is required", [WWW_AUTHENTICATE]
                )
            return None
        return self.decode(token)
